// Make-before-break under load (issue 10, defect 3): readers keep reading GPAs that every state
// of a topology change maps, through the primary mapper and a lazy one, while a control thread
// switches between those states thousands of times:
// - a PAM segment toggled over a ROM (RAM read-write, read-only, write-only, unmapped: the RAM
//   or the ROM is always there for a read);
// - a higher region mapped over a lower one and unmapped again (the same range).
// Every read must succeed and return the bytes of one of the two states: a change used to remove
// the old mappings before adding the new ones, and a read in between failed with
// errc::unmapped. The topology changes through the real VA policy (Linux mmap, Windows
// placeholders) and the mock partition.
#include <membacking/membacking.hpp>

#include "place_device.hpp"
#include "platform.hpp"
#include "test_support.hpp"

#include <atomic>
#include <cstdint>
#include <latch>
#include <random>
#include <thread>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
using Manager = MockGuestMemoryManager;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool asan = true;
#elif defined(__has_feature)
constexpr bool asan = __has_feature(address_sanitizer);
#else
constexpr bool asan = false;
#endif
constexpr int changes = (MEMBACKING_TSAN || asan) ? 1000 : 4000;
constexpr unsigned readers = 2;

constexpr std::uint64_t seg_start = 0xc0000; // a PAM segment, a ROM placed under it
constexpr std::uint64_t seg_size = 0x4000;
constexpr std::uint64_t stack_start = 8 * MiB; // a higher region over a lower one
constexpr std::uint64_t stack_size = 0x10000;

// What each object holds at every page start: which state a read saw.
constexpr std::uint64_t ram_value = 0x1111111111111111;
constexpr std::uint64_t rom_value = 0x2222222222222222;
constexpr std::uint64_t low_value = 0x3333333333333333;
constexpr std::uint64_t high_value = 0x4444444444444444;

Mappable object_of(std::uint64_t size, std::uint64_t value)
{
    Mappable object = test::make_object(size);
    for (std::uint64_t off = 0; off < size; off += page_size)
        test::write_object(object, off, &value, sizeof value);
    return object;
}

struct Counters {
    std::atomic<std::uint64_t> reads{0}, unmapped{0}, other_errors{0}, wrong_value{0};
    /// Reads that saw each state: [PAM segment, stack][RAM or low, ROM or high].
    std::atomic<std::uint64_t> saw[2][2]{};
    /// The latest even epoch in which a read started and completed: the control thread waits
    /// for it after each change, so that every state is read at least once (no count here
    /// depends on how the scheduler shares the cores).
    std::atomic<std::uint64_t> read_in{0};
};

/// Odd while a change is in flight, even between changes.
using Epoch = std::atomic<std::uint64_t>;
constexpr int reads_between_changes = 16; // by each reader; during a change, reads never stop

void read_loop(unsigned id, const Manager::Memory& primary, const Manager::Memory& lazy,
               const Epoch& epoch, const std::atomic<bool>& done, Counters& c)
{
    std::mt19937_64 rng(0xb4ea4 + id);
    std::uint64_t seen = ~std::uint64_t{0};
    int burst = 0;
    while (!done.load(std::memory_order_relaxed)) {
        // Read without pause while a change runs; between changes a few reads, then wait for
        // the next change (the control thread gets its core).
        const std::uint64_t now = epoch.load();
        if (now % 2 == 0) {
            if (now != seen) {
                seen = now;
                burst = 0;
            } else if (++burst >= reads_between_changes) {
                epoch.wait(now);
                continue;
            }
        }
        const bool pam = rng() % 2 == 0;
        const std::uint64_t base = pam ? seg_start : stack_start;
        const std::uint64_t pages = (pam ? seg_size : stack_size) / page_size;
        const Gpa gpa{base + (rng() % pages) * page_size};
        const Manager::Memory& mem = (rng() % 2 == 0) ? primary : lazy;
        const auto r = mem.read_plain<std::uint64_t>(gpa);
        c.reads.fetch_add(1, std::memory_order_relaxed);
        if (now % 2 == 0) {
            std::uint64_t last = c.read_in.load();
            while (last < now && !c.read_in.compare_exchange_weak(last, now)) {
            }
            if (last < now)
                c.read_in.notify_all();
        }
        if (!r) {
            (r.error().code == errc::unmapped ? c.unmapped : c.other_errors)
                .fetch_add(1, std::memory_order_relaxed);
            continue;
        }
        const std::uint64_t a = pam ? ram_value : low_value;
        const std::uint64_t b = pam ? rom_value : high_value;
        if (*r != a && *r != b)
            c.wrong_value.fetch_add(1, std::memory_order_relaxed);
        else
            c.saw[pam ? 0 : 1][*r == a ? 0 : 1].fetch_add(1, std::memory_order_relaxed);
    }
}

} // namespace

TEST_CASE("make-before-break: readers of GPAs that both states map never see them unmapped while "
          "PAM toggles over a ROM and a higher region comes and goes over a lower one")
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                         .build(Length{32 * MiB}));
    auto partition = std::make_shared<MockPartition>();
    partition->set_recording(false);
    must(m.attach_partition(Vtl::vtl0, partition));
    const Manager::Memory primary = m.guest_memory();
    const Manager::Memory lazy = must(m.client().lazy_guest_memory());

    // The ROM under the PAM segment, and the segment's RAM with its own bytes.
    auto rom = test::place_device(m, "rom", Gpa{seg_start}, Length{seg_size},
                                  object_of(seg_size, rom_value), Protection::read_only);
    auto control = m.ram_visibility_control();
    const MemoryRange segment = range(seg_start, seg_start + seg_size);
    must(control.set_ram_visibility(segment, RamVisibility::read_write));
    for (std::uint64_t off = 0; off < seg_size; off += page_size)
        REQUIRE(primary.write_plain<std::uint64_t>(Gpa{seg_start + off}, ram_value).has_value());

    const MemoryRange stack = range(stack_start, stack_start + stack_size);
    const RegionId low = must(m.add_region("low", stack, 1, MappingType::Ram));
    must(m.add_mapping(low, {range(0, stack_size),
                             MappingBacking::file(object_of(stack_size, low_value), Offset{0}),
                             true,
                             {}}));
    must(m.map_region(low, {true, false, false}));
    const RegionId high = must(m.add_region("high", stack, 2, MappingType::Ram));
    must(m.add_mapping(high, {range(0, stack_size),
                              MappingBacking::file(object_of(stack_size, high_value), Offset{0}),
                              true,
                              {}}));

    std::atomic<bool> done{false};
    Epoch epoch{0};
    Counters c;
    std::latch started(readers + 1);
    std::vector<std::thread> threads;
    for (unsigned id = 0; id < readers; ++id)
        threads.emplace_back([&, id] {
            started.arrive_and_wait();
            read_loop(id, primary, lazy, epoch, done, c);
        });
    started.arrive_and_wait();

    std::mt19937_64 rng(7);
    int failures = 0;
    bool high_mapped = false;
    for (int k = 0; k < changes; ++k) {
        epoch.fetch_add(1); // odd: a change in flight
        epoch.notify_all();
        Result<void> r;
        if (k % 2 == 0) {
            // Every visibility maps the segment for reads: the RAM, or the ROM below it.
            r = control.set_ram_visibility(segment, static_cast<RamVisibility>(rng() % 4));
        } else {
            high_mapped = !high_mapped;
            r = high_mapped ? m.map_region(high, {true, false, false}) : m.unmap_region(high);
        }
        const std::uint64_t settled = epoch.fetch_add(1) + 1;
        epoch.notify_all();
        // A reader has read in this state before the next change.
        for (std::uint64_t v = c.read_in.load(); v < settled; v = c.read_in.load())
            c.read_in.wait(v);
        if (!r) {
            ++failures;
            MESSAGE(r.error().full_message());
        }
    }
    done = true;
    epoch.fetch_add(2);
    epoch.notify_all();
    for (auto& t : threads)
        t.join();

    MESSAGE("changes: " << changes << ", reads: " << c.reads.load() << " (RAM "
                        << c.saw[0][0].load() << ", ROM " << c.saw[0][1].load() << ", low "
                        << c.saw[1][0].load() << ", high " << c.saw[1][1].load() << "), unmapped: "
                        << c.unmapped.load() << ", other errors: " << c.other_errors.load()
                        << ", wrong values: " << c.wrong_value.load());
    CHECK(failures == 0);
    CHECK(c.unmapped.load() == 0);
    CHECK(c.other_errors.load() == 0);
    CHECK(c.wrong_value.load() == 0);
    // The run proved something: a read in every state between changes (the handshake), and
    // both states of each area were read.
    CHECK(c.reads.load() >= static_cast<std::uint64_t>(changes));
    for (const auto& area : c.saw)
        for (const auto& state : area)
            CHECK(state.load() > 0);
}
