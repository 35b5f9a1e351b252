// KvmPartition against a fake kernel behind its syscall seam, so that it runs on every machine
// (no /dev/kvm needed; tests/kvm runs the real one in the emulated VM): a host whose KVM keeps
// failing (every ioctl from the n-th on refused) never brings the partition to fatal() while it
// undoes its own steps (issue 10, defect 7). After each failure the partition's books (slots())
// are the kernel's slots; a failure it could undo leaves everything as before, one it could not
// is errc::quarantined, naming both; through the manager, that partition is marked failed.
#include <membacking/membacking.hpp>

#include "fake_kvm.hpp"
#include "test_support.hpp"

#include <cerrno>
#include <cstdint>
#include <fcntl.h>
#include <linux/kvm.h>
#include <map>
#include <memory>
#include <string>
#include <unistd.h>
#include <vector>

using namespace membacking;
using test::FakeKvm;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t pg = page_size;
constexpr std::uint64_t MiB = std::uint64_t{1} << 20;

using Kvm = KvmPartition<FakeKvm>;

/// A partition over the fake VM (a /dev/null descriptor stands for the VM's), of a kernel
/// with KVM_SET_USER_MEMORY_REGION2 and manual protect if `modern`.
std::shared_ptr<Kvm> make_partition(bool modern = false)
{
    FakeKvm::reset();
    FakeKvm::modern = modern;
    const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    auto p = must(Kvm::create(fd));
    ::close(fd);
    return p;
}

/// Whether the partition's books are the kernel's slots, slot for slot.
bool books_follow_kernel(const Kvm& p)
{
    std::map<std::uint32_t, FakeKvm::Slot> books;
    for (const Kvm::SlotInfo& s : p.slots())
        books[s.slot] = {s.gpa, s.size,
                         FakeKvm::slots.count(s.slot) ? FakeKvm::slots[s.slot].flags : ~0U,
                         reinterpret_cast<std::uint64_t>(s.host_va)};
    return books == FakeKvm::slots;
}

alignas(4096) std::byte host[8 * 4096];

/// A partition with three slots of two pages at 1, 2 and 3 MiB, their dirty logging on if
/// `logging`.
std::shared_ptr<Kvm> three_slots(bool logging)
{
    auto p = make_partition();
    for (std::uint64_t i = 0; i < 3; ++i)
        must(p->map_range(host + i * 2 * pg, (i + 1) * MiB, 2 * pg, true, false));
    if (logging)
        must(p->set_dirty_logging(true));
    return p;
}

/// op() with every fake ioctl from the n-th on failing; `reached`: whether one failed.
template <class Op>
auto failing_from(long n, bool& reached, Op op)
{
    FakeKvm::fail_from_now(n);
    auto r = op();
    reached = FakeKvm::failed > 0;
    FakeKvm::fail_from = 0;
    return r;
}

struct Outcomes {
    long rolled_back = 0, quarantined = 0;
};

} // namespace

TEST_CASE("KVM: an unmap of several slots under a kernel that keeps refusing never reaches "
          "fatal(); a slot it cannot add back stays deleted, and says so")
{
    for (const bool logging : {false, true}) {
        CAPTURE(logging);
        Outcomes seen;
        for (long n = 1;; ++n) {
            CAPTURE(n);
            auto p = three_slots(logging);
            const auto before = p->slots();
            bool reached = false;
            auto r =
                failing_from(n, reached, [&] { return p->unmap_range(MiB, 2 * MiB + 2 * pg); });
            CHECK(books_follow_kernel(*p));
            if (!reached) {
                REQUIRE(r.has_value());
                CHECK(p->slots().empty());
                break;
            }
            REQUIRE_FALSE(r.has_value());
            if (r.error().code() != errc::quarantined) {
                ++seen.rolled_back;
                CHECK(p->slots() == before);
                continue;
            }
            ++seen.quarantined;
            CHECK(p->slots().size() < before.size());
            CHECK(r.error().full_message().find("could not be added back") != std::string::npos);
            // What is left still works: the books let it be unmapped, and slots reused.
            must(p->unmap_range(MiB, 2 * MiB + 2 * pg));
            CHECK(FakeKvm::slots.empty());
            must(p->map_range(host, MiB, 2 * pg, true, false));
            CHECK(books_follow_kernel(*p));
        }
        // Failing the first call changes nothing; failing any later one finds a slot deleted.
        CHECK(seen.rolled_back >= 1);
        CHECK(seen.quarantined >= 1);
    }
}

TEST_CASE("KVM: dirty logging switched under a kernel that keeps refusing never reaches "
          "fatal(); flags it cannot restore put the dirty log out of service")
{
    for (const bool enable : {true, false}) {
        CAPTURE(enable);
        Outcomes seen;
        for (long n = 1;; ++n) {
            CAPTURE(n);
            auto p = three_slots(!enable);
            const auto kernel_before = FakeKvm::slots;
            bool reached = false;
            auto r = failing_from(n, reached, [&] { return p->set_dirty_logging(enable); });
            CHECK(books_follow_kernel(*p));
            if (!reached) {
                REQUIRE(r.has_value());
                break;
            }
            REQUIRE_FALSE(r.has_value());
            if (r.error().code() != errc::quarantined) {
                ++seen.rolled_back;
                CHECK(FakeKvm::slots == kernel_before);
                continue;
            }
            ++seen.quarantined;
            CHECK(FakeKvm::slots != kernel_before); // a slot kept its new flags
            CHECK(r.error().full_message().find("could not be restored") != std::string::npos);
            // Out of service for good, with the cause; the slots can still be unmapped.
            CHECK(p->set_dirty_logging(!enable).error().code() == errc::quarantined);
            CHECK(p->set_dirty_logging(enable).error().code() == errc::quarantined);
            CHECK(p->take_dirty_log(MiB, 2 * pg).error().code() == errc::quarantined);
            must(p->unmap_range(MiB, 2 * MiB + 2 * pg));
            CHECK(FakeKvm::slots.empty());
        }
        CHECK(seen.rolled_back >= 1);
        CHECK(seen.quarantined >= 1);
    }
}

TEST_CASE("KVM under a manager: a partition whose dirty logging cannot be restored is marked "
          "failed, reported by health() and the memory map, and can be detached")
{
    using Manager = TrackedGuestMemoryManager<NestedPriority, DefaultVaPolicy, Kvm>;
    Outcomes seen;
    for (long n = 1;; ++n) {
        CAPTURE(n);
        auto p = make_partition();
        auto m = must(Manager::builder()
                          .x86_legacy_support(true) // 16 windows: 16 slots
                          .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                          .build(Length{16 * MiB}));
        const PartitionId id = must(m.attach_partition(Vtl::vtl0, p));
        REQUIRE(FakeKvm::slots.size() == 16);
        bool reached = false;
        auto r = failing_from(n, reached, [&] { return m.start_dirty_tracking(); });
        CHECK(books_follow_kernel(*p));
        if (!reached) {
            REQUIRE(r.has_value());
            break;
        }
        REQUIRE_FALSE(r.has_value());
        const Health health = m.health();
        if (r.error().code() != errc::quarantined) {
            ++seen.rolled_back;
            CHECK(health.ok());
            must(m.start_dirty_tracking()); // the retry
            continue;
        }
        ++seen.quarantined;
        REQUIRE(health.failed_partitions.size() == 1);
        CHECK(health.failed_partitions[0].id == id);
        CHECK(health.failed_partitions[0].cause.find("could not be restored") != std::string::npos);
        CHECK(m.memory_map().to_text().find("partition #" + std::to_string(id.value) +
                                            " failed: ") != std::string::npos);
        // The manager serves on; a migration refuses until the partition is detached.
        CHECK(m.start_dirty_tracking().error().code() == errc::quarantined);
        must(m.detach_partition(id));
        CHECK(m.health().ok());
        CHECK(FakeKvm::slots.empty());
        must(m.start_dirty_tracking());
    }
    CHECK(seen.rolled_back >= 1);
    CHECK(seen.quarantined >= 1);
}

namespace {

alignas(4096) std::byte big_host[256 * 4096];

} // namespace

TEST_CASE("KVM, both kernel generations (fake): a take returns exactly the pages the guest "
          "wrote in the part; manual protect clears only those, clear-on-read keeps the rest "
          "pending")
{
    for (const bool modern : {false, true}) {
        CAPTURE(modern);
        auto p = make_partition(modern);
        CHECK(p->capabilities().user_memory2 == modern);
        CHECK(p->capabilities().manual_dirty_log_protect == modern);
        CHECK(FakeKvm::manual_protect == modern);
        // The modern fake refuses KVM_SET_USER_MEMORY_REGION, the old one ..._REGION2: the slot
        // exists only if the partition used the call of its kernel.
        must(p->map_range(host, MiB, 8 * pg, true, false));
        REQUIRE(FakeKvm::slots.size() == 1);
        must(p->set_dirty_logging(true));
        for (const std::uint64_t page : {std::uint64_t{1}, std::uint64_t{2}, std::uint64_t{6}})
            REQUIRE(FakeKvm::dirty(MiB + page * pg));

        const auto part = must(p->take_dirty_log(range(MiB, MiB + 4 * pg)));
        CHECK(test::pages_in(part) == std::vector<std::uint64_t>{1, 2});
        // Page 6 lies outside the part: still in KVM's log under manual protect, in the
        // partition's pending log after a clear-on-read.
        CHECK(FakeKvm::logged_pages() == (modern ? 1U : 0U));
        CHECK(p->pending_dirty_pages() == (modern ? 0U : 1U));

        const auto rest = must(p->take_dirty_log(range(MiB, MiB + 8 * pg)));
        CHECK(test::pages_in(rest) == std::vector<std::uint64_t>{6});
        CHECK(FakeKvm::logged_pages() == 0);
        CHECK(p->pending_dirty_pages() == 0);
        CHECK(test::pages_in(must(p->take_dirty_log(range(MiB, MiB + 8 * pg)))).empty());
    }
}

TEST_CASE("KVM, manual protect: a take that fails at any ioctl loses no page; the chunks KVM "
          "cleared before a KVM_CLEAR_DIRTY_LOG failed wait in the pending log")
{
    // 256 pages in chunks of 64, a dirty page in each chunk: one KVM_GET_DIRTY_LOG, then four
    // KVM_CLEAR_DIRTY_LOG. Failing each call in turn, and then every call after it.
    const std::vector<std::uint64_t> written{3, 70, 140, 200};
    long failures = 0;
    for (long n = 1;; ++n) {
        CAPTURE(n);
        auto p = make_partition(true);
        p->set_clear_chunk_pages(64);
        must(p->map_range(big_host, 4 * MiB, 256 * pg, true, false));
        must(p->set_dirty_logging(true));
        for (const std::uint64_t page : written)
            REQUIRE(FakeKvm::dirty(4 * MiB + page * pg));
        const auto all = range(4 * MiB, 4 * MiB + 256 * pg);
        bool reached = false;
        auto r = failing_from(n, reached, [&] { return p->take_dirty_log(all); });
        if (!reached) {
            REQUIRE(r.has_value());
            CHECK(test::pages_in(*r) == written);
            break;
        }
        ++failures;
        REQUIRE_FALSE(r.has_value());
        CHECK(r.error().full_message().find(n == 1 ? "KVM_GET_DIRTY_LOG" : "KVM_CLEAR_DIRTY_LOG") !=
              std::string::npos);
        // Every page is still somewhere: KVM's log (not cleared) or the pending log (cleared by
        // a chunk that succeeded).
        CHECK(FakeKvm::logged_pages() + p->pending_dirty_pages() == written.size());
        // The next take, with the kernel well again, returns them all, once.
        CHECK(test::pages_in(must(p->take_dirty_log(all))) == written);
        CHECK(test::pages_in(must(p->take_dirty_log(all))).empty());
    }
    CHECK(failures == 5); // the read and the four clears
}
