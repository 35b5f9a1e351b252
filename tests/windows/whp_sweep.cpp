// The fault-injection sweep of tests/proof/faults.cpp, through the Windows composition: a
// GuestMemoryManager over placeholder VA mappers (their address-space calls behind the injecting
// seam, test::InjectingWindows) and a WhpPartition over the stand-in WinHvPlatform.dll. The guest
// and the operations are the Linux sweeps' (sweep_guest.hpp: one populate(), one
// shared_operations()). For each operation, the n-th WHP call fails, for n = 1, 2, ... until the
// operation succeeds without reaching it; then the same with the n-th address-space call. After
// each failure the memory-map dump, the health, the ranges the stand-in holds mapped (GPA, size,
// flags, pinned) and the bytes through the primary and a lazy mapper are as before, and a retry
// succeeds and reaches what the operation reaches without injection; a failure the operation
// absorbs must reach that state too. Single failures only: persistent ones need a child process
// per point (fork), which Windows has not; their rule (no fatal(), quarantine reported) is the
// Linux sweep's and the WHP policy's own test (whp.cpp) for its rollbacks.
#include <membacking/membacking.hpp>

#include "injecting_windows.hpp"
#include "standin.hpp"
#include "sweep_guest.hpp"
#include "test_support.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

using namespace membacking;
using namespace membacking::test::sweep;
using test::must;
using test::range;

namespace {

using Va = WindowsPlaceholder<test::InjectingWindows>;
using Manager = GuestMemoryManager<NestedPriority, Va, WhpPartition>;

/// The sweeps' guest with a WHP partition over the stand-in attached.
struct WhpSweepFixture : GuestFixture<Manager> {
    using GuestFixture::GuestFixture;
    std::shared_ptr<WhpPartition> partition;
};

/// The stand-in's state is the DLL's: one Standin, reset for every fixture.
test::Standin& standin()
{
    static test::Standin s;
    return s;
}

std::unique_ptr<WhpSweepFixture> make_fixture()
{
    test::InjectingWindows::reset();
    standin().fail_from_nth_call(0, S_OK);
    standin().reset();
    auto f = std::make_unique<WhpSweepFixture>(
        must(Manager::builder()
                 .x86_legacy_support(true)
                 .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                 .build(Length{32 * MiB})));
    f->partition = must(WhpPartition::create(test::handle));
    f->id = must(f->m.attach_partition(Vtl::vtl0, f->partition));
    populate(*f);
    return f;
}

using Operation = SweepOperation<WhpSweepFixture>;

std::unique_ptr<WhpSweepFixture> fresh(const Operation& op)
{
    auto f = make_fixture();
    if (op.prepare)
        must(op.prepare(*f));
    return f;
}

std::vector<Operation> operations()
{
    std::vector<Operation> ops = {
        {"attach_partition (WHP)", [](WhpSweepFixture& f) { return f.m.detach_partition(f.id); },
         [](WhpSweepFixture& f) {
             return drop_value(f.m.attach_partition(Vtl::vtl0, f.partition));
         }},
    };
    std::ranges::move(shared_operations<WhpSweepFixture>(" (WHP)"), std::back_inserter(ops));
    return ops;
}

/// What must not change when an operation fails.
struct Snapshot {
    std::string map;
    bool healthy = true;
    /// The stand-in's mapped ranges: GPA, size, flags, pinned.
    std::vector<std::tuple<std::uint64_t, std::uint64_t, std::uint32_t, std::uint32_t>> mapped;
    /// Per mapper (primary, lazy), per probe: the value read, or -errc.
    std::vector<std::vector<std::int64_t>> bytes;
    friend bool operator==(const Snapshot&, const Snapshot&) = default;
};

Snapshot snapshot(const WhpSweepFixture& f)
{
    Snapshot s;
    s.map = f.m.memory_map().to_text();
    s.healthy = f.m.health().ok();
    for (const StandinCall& c : standin().mapped())
        s.mapped.emplace_back(c.gpa, c.size, c.flags, c.advice);
    const Manager::Memory primary = f.m.guest_memory();
    for (const Manager::Memory* mem : {&primary, &f.lazy}) {
        auto& out = s.bytes.emplace_back();
        for (const std::uint64_t g : probe_gpas()) {
            auto v = mem->read_plain<std::uint64_t>(Gpa{g});
            out.push_back(v ? static_cast<std::int64_t>(*v)
                            : -static_cast<std::int64_t>(v.error().code));
        }
    }
    return s;
}

/// Where the sweep's failure is injected.
enum class Source { whp, address_space };

const char* name_of(Source s)
{
    return s == Source::whp ? "WHP call" : "address-space call";
}

/// Prints where two snapshots differ first (for the failure report).
bool same(const Snapshot& got, const Snapshot& want)
{
    if (got.map != want.map)
        MESSAGE("dump differs:\n" << got.map << "\n--- expected:\n" << want.map);
    else if (got.healthy != want.healthy)
        MESSAGE("health differs");
    else if (got.mapped != want.mapped)
        MESSAGE("the stand-in's mapped ranges differ (" << got.mapped.size() << ", expected "
                                                        << want.mapped.size() << ")");
    else if (got.bytes != want.bytes)
        MESSAGE("bytes through a mapper differ");
    return got == want;
}

} // namespace

TEST_CASE("fault injection through the Windows composition (placeholders, WHP): every single "
          "failure of a WHP or address-space call is all-or-nothing")
{
    const HRESULT injected = static_cast<HRESULT>(0x80370301); // any failure
    long points = 0, absorbed = 0;
    const std::vector<Operation> ops = operations();
    for (const Operation& op : ops) {
        Snapshot after;
        {
            auto f = fresh(op);
            must(op.run(*f));
            after = snapshot(*f);
        }
        for (const Source source : {Source::whp, Source::address_space}) {
            long n = 1;
            for (;; ++n) {
                CAPTURE(op.name);
                CAPTURE(name_of(source));
                CAPTURE(n);
                auto f = fresh(op);
                const Snapshot before = snapshot(*f);
                const std::uint32_t calls_before = standin().count();
                if (source == Source::whp)
                    standin().fail_nth_call(static_cast<std::uint64_t>(n), injected);
                else
                    test::InjectingWindows::fail_nth(n);
                Result<void> r = op.run(*f);
                const bool reached =
                    source == Source::whp
                        ? standin().count() >= calls_before + static_cast<std::uint32_t>(n)
                        : test::InjectingWindows::fired;
                standin().fail_from_nth_call(0, S_OK);
                test::InjectingWindows::reset();
                if (!reached) {
                    CHECK(r.has_value());
                    break;
                }
                ++points;
                if (r) { // absorbed: the state is the one reached without injection
                    ++absorbed;
                    CHECK(same(snapshot(*f), after));
                    continue;
                }
                CHECK(same(snapshot(*f), before));
                const Result<void> again = op.run(*f);
                CHECK_MESSAGE(again.has_value(), "the retry failed");
                CHECK(same(snapshot(*f), after));
            }
            MESSAGE(op.name << ", " << name_of(source) << "s: " << n - 1 << " injection points");
        }
    }
    MESSAGE("operations: " << ops.size() << ", single-failure injection points: " << points
                           << " (absorbed: " << absorbed << ")");
    CHECK(points > 50);
    // Most failures must be seen to fail: were the stand-in's injection to stop working, every
    // point would count as absorbed.
    CHECK(absorbed * 10 < points);
}
