// A live migration in one process, without a hypervisor: a source guest whose memory VMM
// threads keep writing through GuestMemory (copies, fills, atomics, write leases) and a simulated
// vCPU keeps writing behind the library's back, logging through the mock partition's dirty log
// (as KVM does); a loop copies the dirty pages into a destination guest, pass after pass, while a
// PAM segment toggles (read-write, read-only, hidden) and a device BAR moves. With everything
// stopped and one last pass, the destination's memory equals the source's byte for byte. Runs under
// TSan in CI.
#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t page = page_size;
constexpr std::uint64_t space = 32 * MiB;
constexpr std::uint64_t ram_end = 8 * MiB;
constexpr std::uint64_t bar_size = 64 * 1024;
/// The BAR's two places, in the MMIO space above RAM.
constexpr std::array<std::uint64_t, 2> bar_places{16 * MiB, 24 * MiB};
using Manager = TrackedMockGuestMemoryManager;

/// One side of the migration: RAM with the PC's legacy ranges, and a placed BAR.
struct Side {
    Manager m;
    Manager::Memory mem;
    Manager::Device bar;
    std::shared_ptr<MockPartition> partition = std::make_shared<MockPartition>();

    static Side make()
    {
        auto m = must(Manager::builder()
                          .x86_legacy_support(true)
                          .add_backing(RamBackingRequest({range(0, ram_end)}))
                          .build(Length{space}));
        auto bar = must(m.device_memory_mapper().new_region("bar", Length{bar_size}));
        auto object = test::make_object(bar_size);
        must(bar.map({.offset = Offset{0},
                      .length = Length{bar_size},
                      .object = object,
                      .object_offset = Offset{0},
                      .protection = Protection::read_write}));
        must(bar.map_to_guest(Gpa{bar_places[0]}, Protection::read_write));
        auto mem = m.guest_memory();
        return Side{std::move(m), std::move(mem), std::move(bar)};
    }
};

/// Copies every page of the runs from src to dst through GuestMemory. A page that is not
/// readable on the source (nothing mapped there now) is skipped: nothing is there on either side.
void copy_runs(const std::vector<DirtyRun>& runs, Side& src, Side& dst)
{
    std::array<std::byte, page> buf{};
    for (const DirtyRun& run : runs)
        for (std::uint64_t off = 0; off < run.length.value(); off += page) {
            const Gpa at = run.gpa + Length{off};
            if (!src.mem.read(at, buf))
                continue;
            REQUIRE(dst.mem.write(at, buf));
        }
}

} // namespace

TEST_CASE("migration without a hypervisor: VMM writers, a logged guest writer, PAM and a BAR")
{
    Side src = Side::make();
    Side dst = Side::make();
    const PartitionId id = must(src.m.attach_partition(Vtl::vtl0, src.partition));
    (void)id;
    const MemoryRange pam = *x86_legacy::pam_range(1, 0);
    const MemoryRange all = range(0, space);

    must(src.m.start_dirty_tracking());
    // Pass 0: everything (what the first pass of a migration copies).
    copy_runs({{Gpa{0}, Length{space}}}, src, dst);

    std::atomic<bool> stop{false};
    std::vector<std::thread> writers;
    for (unsigned t = 0; t < 3; ++t)
        writers.emplace_back([&, t] {
            std::mt19937_64 rng(t + 1);
            auto mem = src.mem; // each device has its own handle
            std::vector<std::uint8_t> chunk(3 * page);
            while (!stop.load(std::memory_order_relaxed)) {
                // Anywhere in the address space: RAM, the PAM segment (read-only at times), the
                // BAR wherever it is, or nothing (an error, ignored).
                const std::uint64_t gpa = rng() % space;
                const auto value = static_cast<std::uint8_t>(rng());
                switch (rng() % 5) {
                case 0:
                    std::memset(chunk.data(), value, chunk.size());
                    (void)mem.write(Gpa{gpa}, std::span(chunk).first(rng() % chunk.size()));
                    break;
                case 1: (void)mem.fill(Gpa{gpa}, value, Length{rng() % (2 * page)}); break;
                case 2: (void)mem.write_plain<std::uint64_t>(Gpa{gpa}, rng()); break;
                case 3: (void)mem.fetch_add<std::uint32_t>(Gpa{gpa & ~std::uint64_t{3}}, 1); break;
                default:
#if MEMBACKING_OS_LINUX
                    // Each thread leases its own megabyte of RAM: two plain memsets of the same
                    // bytes from two threads would be a data race of the test's own.
                    if (auto lease = mem.lease(Gpa{MiB + t * MiB + gpa % (MiB - page)},
                                               Length{page}, LeaseAccess::write))
                        for (const auto& span : lease->spans())
                            std::memset(span.data(), value, span.size());
#endif
                    break;
                }
            }
        });
    // The vCPU: writes RAM above the legacy megabyte through the host VA, as a guest does, and
    // the hypervisor (the mock) logs it by GPA.
    std::thread guest([&] {
        std::mt19937_64 rng(99);
        std::byte* const base = src.m.core().primary()->base();
        while (!stop.load(std::memory_order_relaxed)) {
            const std::uint64_t gpa = MiB + rng() % (ram_end - MiB - 8);
            const std::uint64_t value = rng();
            std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(base + (gpa & ~7U)))
                .store(value, std::memory_order_relaxed);
            src.partition->mark_dirty(gpa);
        }
    });

    std::vector<DirtyRun> runs;
    RamVisibility pam_state = RamVisibility::read_write;
    std::size_t bar_place = 0;
    std::uint64_t copied = 0;
    for (int pass = 1; pass <= 40; ++pass) {
        runs.clear();
        must(src.m.take_dirty_runs(all, runs));
        for (const DirtyRun& r : runs)
            copied += r.length.value();
        copy_runs(runs, src, dst);
        if (pass % 3 == 0) { // the chipset toggles PAM on the source; the state migrates at the end
            // read-write, read-only, unmapped (the RAM hidden), and round again
            pam_state = pam_state == RamVisibility::read_write  ? RamVisibility::read_only
                        : pam_state == RamVisibility::read_only ? RamVisibility::unmapped
                                                                : RamVisibility::read_write;
            must(src.m.ram_visibility_control().set_ram_visibility(pam, pam_state));
        }
        if (pass % 4 == 0) { // the guest moves the BAR: the destination's device moves with it
            bar_place = 1 - bar_place;
            must(src.bar.map_to_guest(Gpa{bar_places[bar_place]}, Protection::read_write));
            must(dst.bar.map_to_guest(Gpa{bar_places[bar_place]}, Protection::read_write));
        }
    }
    stop.store(true);
    for (auto& w : writers)
        w.join();
    guest.join();
    runs.clear();
    must(src.m.take_dirty_runs(all, runs)); // the last pass, everything stopped
    copy_runs(runs, src, dst);
    must(dst.m.ram_visibility_control().set_ram_visibility(pam, pam_state));
    must(src.m.stop_dirty_tracking());
    CHECK(copied > 0);

    // Byte for byte, page by page: readable on both sides or on neither, and equal.
    std::array<std::byte, page> a{};
    std::array<std::byte, page> b{};
    std::uint64_t compared = 0;
    std::uint64_t differing = 0;
    for (std::uint64_t gpa = 0; gpa < space; gpa += page) {
        const bool ra = static_cast<bool>(src.mem.read(Gpa{gpa}, a));
        const bool rb = static_cast<bool>(dst.mem.read(Gpa{gpa}, b));
        REQUIRE(ra == rb);
        if (!ra)
            continue;
        ++compared;
        if (std::memcmp(a.data(), b.data(), page) != 0)
            ++differing;
    }
    // RAM (the PAM segment ends read-only: 13 toggles) and the BAR.
    CHECK(pam_state == RamVisibility::read_only);
    CHECK(compared == (ram_end + bar_size) / page);
    CHECK(differing == 0);
}

TEST_CASE("the loop's check has teeth: without the partitions' logs, guest writes are lost")
{
    // The same source with only the VMM's marks (a copy loop that reads the bitmap alone): a
    // guest write logged by the partition but never copied leaves the destination different.
    Side src = Side::make();
    Side dst = Side::make();
    must(src.m.attach_partition(Vtl::vtl0, src.partition));
    must(src.m.start_dirty_tracking());
    copy_runs({{Gpa{0}, Length{space}}}, src, dst);
    std::byte* const base = src.m.core().primary()->base();
    base[0x300000] = std::byte{0x42}; // the "guest" writes
    src.partition->mark_dirty(0x300000);
    std::vector<DirtyRun> runs;
    must(src.m.take_dirty_runs(range(0, space), runs));
    REQUIRE(runs.size() == 1);
    CHECK(runs[0] == DirtyRun{Gpa{0x300000}, Length{page}});
    CHECK(dst.mem.read_plain<std::uint8_t>(Gpa{0x300000}).value_or(0) == 0); // not yet copied
    copy_runs(runs, src, dst);
    CHECK(dst.mem.read_plain<std::uint8_t>(Gpa{0x300000}).value_or(0) == 0x42);
}
