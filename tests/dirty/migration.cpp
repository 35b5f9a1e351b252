// A live migration in one process, without a hypervisor: a source guest whose memory VMM
// threads keep writing through GuestMemory (copies, fills, atomics, write leases) and a simulated
// vCPU keeps writing behind the library's back, logging through the mock partition's dirty log
// (as KVM does); a loop copies the dirty pages into a destination guest, pass after pass, while a
// PAM segment toggles (read-write, read-only, hidden) and a device BAR moves. With everything
// stopped and one last pass, the destination's memory equals the source's byte for byte. Runs under
// TSan in CI.
#include <membacking/membacking.hpp>

#include "migration_loop.hpp"
#include "test_support.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <thread>
#include <vector>

using namespace membacking;
using namespace membacking::test::migration;
using test::must;
using test::range;

namespace {
using Manager = TrackedMockGuestMemoryManager;
using MockSide = Side<Manager>;
using ByteMapSide = Side<ByteMapTrackedMockGuestMemoryManager>;
} // namespace

TEST_CASE_TEMPLATE(
    "migration without a hypervisor: VMM writers, a logged guest writer, PAM and a BAR", S,
    MockSide, ByteMapSide)
{
    S src = S::make();
    S dst = S::make();
    auto partition = std::make_shared<MockPartition>();
    must(src.m.attach_partition(Vtl::vtl0, partition));

    must(src.m.start_dirty_tracking());
    // Pass 0: everything (what the first pass of a migration copies).
    copy_runs({{Gpa{0}, Length{space}}}, src, dst);

    std::atomic<bool> stop{false};
    std::vector<std::thread> writers = start_vmm_writers(src.mem, stop);
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
            partition->mark_dirty(gpa);
        }
    });

    const PassesDone done = run_passes(src, dst, 40);
    stop.store(true);
    for (auto& w : writers)
        w.join();
    guest.join();
    last_pass(src, dst, done);
    CHECK(done.copied > 0);

    std::uint64_t compared = 0;
    const std::uint64_t differing = differing_pages(src, dst, compared);
    // RAM (the PAM segment ends read-only: 13 toggles) and the BAR.
    CHECK(done.pam_state == RamVisibility::read_only);
    CHECK(compared == (ram_end + bar_size) / page);
    CHECK(differing == 0);
}

TEST_CASE("the loop's check has teeth: without the partitions' logs, guest writes are lost")
{
    // The same source with only the VMM's marks (a copy loop that reads the bitmap alone): a
    // guest write logged by the partition but never copied leaves the destination different.
    MockSide src = MockSide::make();
    MockSide dst = MockSide::make();
    auto partition = std::make_shared<MockPartition>();
    must(src.m.attach_partition(Vtl::vtl0, partition));
    must(src.m.start_dirty_tracking());
    copy_runs({{Gpa{0}, Length{space}}}, src, dst);
    std::byte* const base = src.m.core().primary()->base();
    base[0x300000] = std::byte{0x42}; // the "guest" writes
    partition->mark_dirty(0x300000);
    std::vector<DirtyRun> runs;
    must(src.m.take_dirty_runs(range(0, space), runs));
    REQUIRE(runs.size() == 1);
    CHECK(runs[0] == DirtyRun{Gpa{0x300000}, Length{page}});
    CHECK(dst.mem.read_plain<std::uint8_t>(Gpa{0x300000}).value_or(0) == 0); // not yet copied
    copy_runs(runs, src, dst);
    CHECK(dst.mem.read_plain<std::uint8_t>(Gpa{0x300000}).value_or(0) == 0x42);
}
