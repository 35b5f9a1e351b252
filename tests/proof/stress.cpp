// Access stress: 8 threads read, write and compare-exchange RAM and device memory, through the
// primary mapper and a lazy one, while a control thread performs 10,000 topology changes (2,000
// under TSan and ASan): a RAM segment's visibility toggled, a region mapped and unmapped over
// another, a device region moved between four GPAs and taken out.
//
// What "consistent" means here. The control thread numbers its operations 1..N. Before operation
// k it publishes the state it is about to reach (log[k]), then sets the epoch to 2k-1; after the
// call returns it sets the epoch to 2k. A worker reads the epoch before (e1) and after (e2) each
// access; the topology during the access was one of log[e1/2] .. log[(e2+1)/2]. Each outcome (ok,
// unmapped, read_only) must be the one some state in that window gives for that GPA and
// direction. With e1 == e2 even (no change during the access) it must be exactly that state's.
// Values: each 8-byte slot is written only by its owner, with (writer, seq) in the high half
// and its complement in the low half, so any torn value is seen by every reader. A write, or a
// compare-exchange, followed by a read-back with no change in between must read back what it
// wrote (a write that landed in a stale mapping would not): no stale success.
#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <latch>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
using Manager = MockGuestMemoryManager;

constexpr int workers = 8;
#if defined(__SANITIZE_ADDRESS__)
constexpr bool asan = true;
#elif defined(__has_feature)
constexpr bool asan = __has_feature(address_sanitizer);
#else
constexpr bool asan = false;
#endif
// Fewer changes under the sanitizers (each access costs ten times more there); still every
// kind of change hundreds of times.
constexpr int control_ops = (MEMBACKING_TSAN || asan) ? 2000 : 10000;
constexpr int accesses_per_state = 8; // by each worker, at most

// The three areas.
constexpr std::uint64_t seg_start = 0xc0000; // a PAM segment: its visibility is toggled
constexpr std::uint64_t seg_size = 0x4000;
constexpr std::uint64_t stack_start = 8 * MiB; // a region mapped and unmapped over another
constexpr std::uint64_t stack_size = 0x10000;
constexpr std::uint64_t dev_base = 16 * MiB; // a device region moved between 4 slots
constexpr std::uint64_t dev_stride = MiB;
constexpr std::uint64_t dev_size = 0x10000;
constexpr unsigned dev_slots = 4;
constexpr unsigned dev_unplaced = dev_slots;

/// The topology, packed: visibility (0 unmapped, 1 read-only, 2 read-write), whether the high
/// region is mapped, the device region's slot (dev_unplaced: not in the guest).
struct State {
    unsigned vis = 2;
    bool high = false;
    unsigned dev = dev_unplaced;

    [[nodiscard]] std::uint32_t pack() const { return vis | (high ? 4U : 0U) | (dev << 3); }
    static State unpack(std::uint32_t v) { return {v & 3U, (v & 4U) != 0, v >> 3}; }
};

enum class Outcome : std::uint8_t { ok, unmapped, read_only, other };
enum class Area : std::uint8_t { segment, stack, device };

Outcome expected(const State& s, Area area, unsigned dev_slot, bool write)
{
    switch (area) {
    case Area::segment:
        if (s.vis == 0)
            return Outcome::unmapped;
        return (s.vis == 1 && write) ? Outcome::read_only : Outcome::ok;
    case Area::stack: return Outcome::ok;
    case Area::device: return s.dev == dev_slot ? Outcome::ok : Outcome::unmapped;
    }
    return Outcome::other;
}

template <class T>
Outcome outcome_of(const AccessResult<T>& r)
{
    if (r)
        return Outcome::ok;
    switch (r.error().code) {
    case errc::unmapped: return Outcome::unmapped;
    case errc::read_only: return Outcome::read_only;
    default: return Outcome::other;
    }
}

std::uint64_t encode(unsigned writer, std::uint32_t seq)
{
    const std::uint32_t high = (writer << 24) | (seq & 0xffffffU);
    return (std::uint64_t{high} << 32) | std::uint32_t{~high};
}
bool well_formed(std::uint64_t v)
{
    return v == 0 || static_cast<std::uint32_t>(v) == static_cast<std::uint32_t>(~(v >> 32));
}

struct Counters {
    std::atomic<std::uint64_t> accesses{0}, stable{0}, failed{0}, torn{0}, inconsistent{0},
        stale{0}, readbacks{0}, holes{0};
};

/// The log of states and the epoch, as described at the top.
struct Timeline {
    std::vector<std::atomic<std::uint32_t>> log;
    std::atomic<std::uint64_t> epoch{0};
    explicit Timeline(std::size_t ops) : log(ops + 2) {} // + the state the workers stop in
};

/// One worker's loop.
void work(unsigned id, const Manager::Memory& primary, const Manager::Memory& lazy,
          const Timeline& t, const std::atomic<bool>& done, Counters& c)
{
    std::mt19937_64 rng(0x5eed + id);
    std::uint32_t seq = 0;
    std::uint64_t epoch_seen = ~std::uint64_t{0};
    int in_epoch = 0;
    while (!done.load()) {
        // A few accesses per state, then sleep until the next change: the control thread gets
        // the core it needs, and every state is accessed.
        const std::uint64_t now = t.epoch.load();
        if (now != epoch_seen) {
            epoch_seen = now;
            in_epoch = 0;
        } else if (++in_epoch == accesses_per_state) {
            t.epoch.wait(now);
            continue;
        }
        const auto area = static_cast<Area>(rng() % 3);
        const Manager::Memory& mem = (rng() % 2 == 0) ? primary : lazy;
        unsigned dev_slot = 0;
        std::uint64_t gpa = 0;
        std::uint64_t pages = 0;
        switch (area) {
        case Area::segment:
            gpa = seg_start;
            pages = seg_size / page_size;
            break;
        case Area::stack:
            gpa = stack_start;
            pages = stack_size / page_size;
            break;
        case Area::device:
            dev_slot = static_cast<unsigned>(rng() % dev_slots);
            gpa = dev_base + dev_slot * dev_stride;
            pages = dev_size / page_size;
            break;
        }
        const std::uint64_t page = gpa + (rng() % pages) * page_size;
        const Gpa own{page + id * 8};
        const int kind = static_cast<int>(rng() % 3); // read any slot, write own, CAS own

        // Checks one access against the states of its window; returns true if it was stable.
        const auto check = [&](std::uint64_t e1, std::uint64_t e2, Outcome got, bool write) {
            c.accesses.fetch_add(1, std::memory_order_relaxed);
            if (got != Outcome::ok)
                c.failed.fetch_add(1, std::memory_order_relaxed);
            bool consistent = false;
            for (std::uint64_t k = e1 / 2; k <= (e2 + 1) / 2; ++k)
                consistent = consistent ||
                             expected(State::unpack(t.log[k].load()), area, dev_slot, write) == got;
            // Issue 10, defect 3: between two states that both map the stack, the VA side used
            // to be briefly unmapped. Counted apart (and inconsistent): there must be none.
            const bool stable = e1 == e2 && e1 % 2 == 0;
            if (!consistent && area == Area::stack && got == Outcome::unmapped && !stable)
                c.holes.fetch_add(1, std::memory_order_relaxed);
            if (!consistent && c.inconsistent.fetch_add(1, std::memory_order_relaxed) < 5)
                std::fprintf(stderr,
                             "inconsistent: area %d slot %u %s %s got %d, epochs %llu..%llu, first "
                             "state %u\n",
                             static_cast<int>(area), dev_slot, write ? "write" : "read",
                             &mem == &primary ? "primary" : "lazy", static_cast<int>(got),
                             static_cast<unsigned long long>(e1),
                             static_cast<unsigned long long>(e2), t.log[e1 / 2].load());
            if (stable)
                c.stable.fetch_add(1, std::memory_order_relaxed);
            return stable;
        };

        if (kind == 0) {
            const Gpa any{page + (rng() % workers) * 8};
            const std::uint64_t e1 = t.epoch.load();
            auto r = mem.read_plain<std::uint64_t>(any);
            const std::uint64_t e2 = t.epoch.load();
            check(e1, e2, outcome_of(r), false);
            if (r && !well_formed(*r))
                c.torn.fetch_add(1, std::memory_order_relaxed);
            continue;
        }
        const std::uint64_t value = encode(id, ++seq);
        const std::uint64_t e1 = t.epoch.load();
        bool wrote = false;
        if (kind == 1) {
            auto r = mem.write_plain<std::uint64_t>(own, value);
            wrote = check(e1, t.epoch.load(), outcome_of(r), true) && r.has_value();
        } else {
            // Compare-exchange on the own slot, expecting what a read just saw: with no change
            // in between it must exchange.
            auto seen = mem.read_plain<std::uint64_t>(own);
            const std::uint64_t e_mid = t.epoch.load();
            check(e1, e_mid, outcome_of(seen), false);
            if (!seen)
                continue;
            if (!well_formed(*seen))
                c.torn.fetch_add(1, std::memory_order_relaxed);
            auto r = mem.compare_exchange<std::uint64_t>(own, *seen, value);
            const std::uint64_t e2 = t.epoch.load();
            const bool stable = check(e_mid, e2, outcome_of(r), true) && e1 == e2;
            if (stable && r && !(*r).exchanged)
                c.stale.fetch_add(1, std::memory_order_relaxed);
            wrote = stable && r && (*r).exchanged;
        }
        if (!wrote)
            continue;
        auto back = mem.read_plain<std::uint64_t>(own);
        const std::uint64_t e3 = t.epoch.load();
        if (e3 == e1) {
            c.readbacks.fetch_add(1, std::memory_order_relaxed);
            if (!back || *back != value)
                c.stale.fetch_add(1, std::memory_order_relaxed);
        }
    }
}

} // namespace

TEST_CASE("stress: 8 threads access RAM and device memory while 10,000 topology changes run")
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                         .build(Length{32 * MiB}));
    auto partition = std::make_shared<MockPartition>();
    partition->set_recording(false);
    must(m.attach_partition(Vtl::vtl0, partition));

    const RegionId low = must(
        m.add_region("low", range(stack_start, stack_start + stack_size), 1, MappingType::Ram));
    must(m.add_mapping(low, {range(0, stack_size),
                             MappingBacking::file(test::make_object(stack_size), Offset{0}),
                             true,
                             {}}));
    must(m.map_region(low, {true, false, false}));
    const RegionId high = must(
        m.add_region("high", range(stack_start, stack_start + stack_size), 2, MappingType::Ram));
    must(m.add_mapping(high, {range(0, stack_size),
                              MappingBacking::file(test::make_object(stack_size), Offset{0}),
                              true,
                              {}}));
    auto dev = must(m.device_memory_mapper().new_region("moving", Length{dev_size}));
    must(dev.map({.offset = Offset{0},
                  .length = Length{dev_size},
                  .object = test::make_object(dev_size),
                  .object_offset = Offset{0},
                  .protection = Protection::read_write}));
    auto control = m.ram_visibility_control();
    const MemoryRange segment = range(seg_start, seg_start + seg_size);

    const Manager::Memory primary = m.guest_memory();
    const Manager::Memory lazy = must(m.client().lazy_guest_memory());
    Timeline timeline(control_ops);
    State state;
    timeline.log[0].store(state.pack());
    std::atomic<bool> done{false};
    Counters c;
    std::latch started(workers + 1);
    std::vector<std::thread> threads;
    for (unsigned id = 0; id < workers; ++id)
        threads.emplace_back([&, id] {
            started.arrive_and_wait();
            work(id, primary, lazy, timeline, done, c);
        });

    std::mt19937_64 rng(42);
    int control_failures = 0;
    std::array<int, 3> op_kinds{};
    started.arrive_and_wait();
    for (int k = 1; k <= control_ops; ++k) {
        State next = state;
        const auto op = static_cast<int>(rng() % 3);
        ++op_kinds.at(static_cast<std::size_t>(op));
        if (op == 0)
            next.vis = static_cast<unsigned>(rng() % 3);
        else if (op == 1)
            next.high = !state.high;
        else
            next.dev = static_cast<unsigned>(rng() % (dev_slots + 1));
        timeline.log[static_cast<std::size_t>(k)].store(next.pack());
        timeline.epoch.store(2 * static_cast<std::uint64_t>(k) - 1);
        timeline.epoch.notify_all();
        Result<void> r;
        if (op == 0)
            r = control.set_ram_visibility(segment, static_cast<RamVisibility>(next.vis));
        else if (op == 1)
            r = next.high ? m.map_region(high, {true, false, false}) : m.unmap_region(high);
        else if (next.dev == dev_unplaced)
            r = dev.unmap_from_guest();
        else
            r = dev.map_to_guest(Gpa{dev_base + next.dev * dev_stride}, Protection::read_write);
        if (!r) {
            ++control_failures;
            MESSAGE(r.error().full_message());
        }
        const std::uint64_t seen = c.accesses.load();
        timeline.epoch.store(2 * static_cast<std::uint64_t>(k));
        timeline.epoch.notify_all();
        state = next;
        // Let the workers access the new state before the next change (progress, not time).
        while (c.accesses.load() < seen + workers) {
        }
    }
    done = true;
    timeline.log[control_ops + 1].store(state.pack());
    timeline.epoch.store(2 * static_cast<std::uint64_t>(control_ops) + 2);
    timeline.epoch.notify_all();
    for (auto& t : threads)
        t.join();

    MESSAGE("control operations: " << control_ops << " (visibility " << op_kinds[0]
                                   << ", map/unmap over a region " << op_kinds[1]
                                   << ", device moves " << op_kinds[2] << ")");
    MESSAGE("accesses: " << c.accesses.load() << ", in a stable topology " << c.stable.load()
                         << ", failed " << c.failed.load() << ", read-backs " << c.readbacks.load()
                         << ", transition holes (defect 3, must be 0) " << c.holes.load());
    CHECK(control_failures == 0);
    CHECK(c.torn.load() == 0);
    CHECK(c.stale.load() == 0);
    CHECK(c.holes.load() == 0);
    CHECK(c.inconsistent.load() == 0);
    // The run proved something: accesses in every kind of state, failures among them.
    CHECK(c.accesses.load() >= 10 * static_cast<std::uint64_t>(control_ops));
    CHECK(c.failed.load() > 0);
    CHECK(c.readbacks.load() > 0);

    // Afterwards the books, the partition and the access path agree with the last state.
    const auto map = m.memory_map();
    std::size_t active = 0;
    for (const auto& r : map.regions)
        if (r.active) {
            ++active;
            CHECK(partition->lookup(r.range.start()).has_value());
        }
    CHECK(partition->windows().size() == active);
    for (unsigned s = 0; s < dev_slots; ++s)
        CHECK((outcome_of(primary.read_plain<std::uint64_t>(Gpa{dev_base + s * dev_stride})) ==
               expected(state, Area::device, s, false)));
}
