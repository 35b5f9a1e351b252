// Dirty tracking's system calls go through the seam (access/dirty_bitmap.hpp, os/linux.hpp):
// a kernel whose membarrier lacks a command, and a bitmap whose memfd or mapping cannot be made,
// are clean errors that name what is missing and leave everything as it was; so is an allocation
// that fails (std::bad_alloc) at any point of the bitmap's creation.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_mapper.hpp>
#include <membacking/membacking.hpp>

#include "injecting_syscalls.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <fcntl.h>
#include <linux/membarrier.h>
#include <new>
#include <string>
#include <sys/mman.h>
#include <vector>

// This program's allocation hook: while a test arms it on its thread, the n-th allocation from
// then on throws std::bad_alloc, as operator new does when memory runs out. Unarmed (and on every
// other thread) it is malloc.
namespace {
thread_local long fail_allocation_at = 0; ///< 0: no allocation fails
thread_local long allocations_since_armed = 0;
} // namespace

void* operator new(std::size_t n)
{
    if (fail_allocation_at != 0 && ++allocations_since_armed == fail_allocation_at)
        throw std::bad_alloc();
    if (void* p = std::malloc(n == 0 ? 1 : n))
        return p;
    throw std::bad_alloc();
}
#include "malloc_delete.hpp" // its operator delete pair

namespace mb = membacking;
namespace ipc = membacking::ipc;
using mb::Gpa;
using mb::Length;
using mb::test::must;
using mb::test::range;
using Old = mb::test::InjectingSyscalls;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;

/// A manager over the injecting seam (its VA policy's, which its dirty bitmap uses too).
using Tracked =
    mb::TrackedGuestMemoryManager<mb::NestedPriority, mb::LinuxMmap<Old>, mb::MockPartition>;
using Untracked = mb::MockGuestMemoryManager;

template <class M>
mb::Result<M> build()
{
    return M::builder()
        .add_backing(mb::RamBackingRequest({range(0, 4 * MiB)}))
        .build(Length{16 * MiB});
}

void quiet(const std::string&) {}

ipc::RemoteListenerOptions listener_options()
{
    ipc::RemoteListenerOptions o;
    o.log = &quiet;
    return o;
}

ipc::RemoteMapperOptions mapper_options()
{
    ipc::RemoteMapperOptions o;
    o.log = &quiet;
    return o;
}

/// The pages of a take of the whole guest.
template <class M>
std::vector<std::uint64_t> take_pages(M& m)
{
    std::vector<mb::DirtyRun> runs;
    must(m.take_dirty_runs(range(0, 16 * MiB), runs));
    std::vector<std::uint64_t> pages;
    for (const mb::DirtyRun& r : runs)
        for (std::uint64_t p = r.gpa.value(); p < r.gpa.value() + r.length.value(); p += 4096)
            pages.push_back(p);
    return pages;
}

/// What a memory map shows of its regions: name, range, whether mapped and visible, mappings.
std::string regions_of(const mb::MemoryMap& map)
{
    std::string out;
    for (const auto& r : map.regions) {
        out += r.name;
        out += ' ';
        out += r.range.to_string();
        out += r.params ? " mapped" : " unmapped";
        out += r.active ? " visible " : " hidden ";
        out += std::to_string(r.mappings.size());
        out += '\n';
    }
    return out;
}

bool closed(int fd)
{
    return ::fcntl(fd, F_GETFD) == -1 && errno == EBADF;
}

} // namespace

TEST_CASE("a kernel without MEMBARRIER_CMD_GLOBAL_EXPEDITED: a tracked worker's connect is "
          "refused, naming it; the manager goes on, and later connects work")
{
    Old::reset();
    Tracked m = must(build<Tracked>());
    must(m.start_dirty_tracking());
    (void)take_pages(m); // what building made dirty
    const std::string map_before = regions_of(m.memory_map());

    Old::unknown_membarrier_commands = {MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED,
                                        MEMBARRIER_CMD_GLOBAL_EXPEDITED};
    {
        auto pair = must(ipc::Channel<>::pair());
        auto served = must(m.client().serve_process(std::move(pair.first), "old-kernel-worker",
                                                    listener_options()));
        auto worker = ipc::connect_guest_memory<mb::DirtyTracking, Old>(pair.second.release(),
                                                                        mapper_options());
        REQUIRE_FALSE(worker.has_value());
        CHECK(worker.error().code() == mb::errc::unsupported);
        const std::string why = worker.error().full_message();
        CHECK(why.find("MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED") != std::string::npos);
        CHECK(why.find("Linux 4.16") != std::string::npos);
    }

    // The manager is unchanged: the same memory map, and its own writes are still taken, exactly.
    Old::reset();
    CHECK(regions_of(m.memory_map()) == map_before);
    auto memory = m.guest_memory();
    REQUIRE(memory.write_plain(Gpa{0x3008}, std::uint64_t{0x600d}));
    CHECK(take_pages(m) == std::vector<std::uint64_t>{0x3000});

    // A worker on a kernel that knows the command connects to the same manager, and its writes
    // are marked in the manager's bitmap.
    {
        auto pair = must(ipc::Channel<>::pair());
        auto served =
            must(m.client().serve_process(std::move(pair.first), "worker", listener_options()));
        auto worker = must(ipc::connect_guest_memory<mb::DirtyTracking, Old>(pair.second.release(),
                                                                             mapper_options()));
        CHECK(mb::test::value_of(worker.read_plain<std::uint64_t>(Gpa{0x3008})) == 0x600d);
        REQUIRE(worker.write_plain(Gpa{0x5000}, std::uint64_t{1}));
        CHECK(take_pages(m) == std::vector<std::uint64_t>{0x5000});
    }

    // An untracked worker needs no membarrier at all: it connects on the old kernel.
    Old::unknown_membarrier_commands = {MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED,
                                        MEMBARRIER_CMD_GLOBAL_EXPEDITED};
    Untracked plain = must(build<Untracked>());
    REQUIRE(plain.guest_memory().write_plain(Gpa{0x2000}, std::uint64_t{0xbeef}));
    auto pair = must(ipc::Channel<>::pair());
    auto served =
        must(plain.client().serve_process(std::move(pair.first), "worker", listener_options()));
    auto worker = must(ipc::connect_guest_memory<mb::NoDirtyTracking, Old>(pair.second.release(),
                                                                           mapper_options()));
    CHECK(mb::test::value_of(worker.read_plain<std::uint64_t>(Gpa{0x2000})) == 0xbeef);
    Old::reset();
}

TEST_CASE("the dirty bitmap's creation: each failing step is an error naming it, and nothing is "
          "left open")
{
    using mb::detail::DirtyBitmap;
    struct Step {
        const char* what;
        void (*inject)();
        bool memfd_made;
    };
    const Step steps[] = {
        {"MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED",
         [] { Old::unknown_membarrier_commands = {MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED}; },
         false},
        {"memfd_create",
         [] {
             Old::memfd_plan = {0, EMFILE};
         },
         false},
        {"ftruncate",
         [] {
             Old::ftruncate_plan = {0, ENOSPC};
         },
         true},
        {"F_ADD_SEALS",
         [] {
             Old::seals_plan = {0, EPERM};
         },
         true},
        {"mmap",
         [] {
             Old::mmap_plan = {0, ENOMEM};
         },
         true},
    };
    for (const Step& step : steps) {
        CAPTURE(step.what);
        Old::reset();
        step.inject();
        auto bitmap = DirtyBitmap::create<Old>(16 * MiB);
        REQUIRE_FALSE(bitmap.has_value());
        CHECK(bitmap.error().full_message().find(step.what) != std::string::npos);
        if (step.memfd_made) {
            REQUIRE(Old::last_memfd >= 0);
            CHECK(closed(Old::last_memfd));
        } else {
            CHECK(Old::last_memfd == -1);
        }
    }
    Old::reset();
    CHECK(DirtyBitmap::create<Old>(16 * MiB).has_value());
}

TEST_CASE("the dirty bitmap's creation: an allocation failing at any point, on success or on a "
          "failing step's error path, leaves no memfd open and nothing mapped")
{
    using mb::detail::DirtyBitmap;
    struct Step {
        const char* what;
        void (*inject)();
    };
    // Every way through create() once the memfd exists: success, and each later step failing
    // (whose error message allocates).
    const Step steps[] = {
        {"none", [] {}},
        {"ftruncate",
         [] {
             Old::ftruncate_plan = {0, ENOSPC};
         }},
        {"F_ADD_SEALS",
         [] {
             Old::seals_plan = {0, EPERM};
         }},
        {"mmap",
         [] {
             Old::mmap_plan = {0, ENOMEM};
         }},
    };
    long points = 0;
    for (const Step& step : steps) {
        const std::string what = step.what;
        CAPTURE(what);
        for (long n = 1;; ++n) {
            Old::reset();
            step.inject();
            bool threw = false;
            fail_allocation_at = n;
            allocations_since_armed = 0;
            try {
                (void)DirtyBitmap::create<Old>(16 * MiB); // a bitmap made is destroyed at once
            } catch (const std::bad_alloc&) {
                threw = true;
            }
            fail_allocation_at = 0;
            // Checked before anything else allocates or maps: the memfd is closed, and the
            // mapping (if mmap succeeded) is gone (mincore: ENOMEM over unmapped pages).
            const bool memfd_closed = Old::last_memfd < 0 || closed(Old::last_memfd);
            unsigned char resident = 0; // the bitmap of a 16 MiB guest is one page
            const bool unmapped =
                Old::last_mmap_addr == nullptr ||
                (::mincore(Old::last_mmap_addr, 4096, &resident) == -1 && errno == ENOMEM);
            CAPTURE(n);
            CHECK(memfd_closed);
            CHECK(unmapped);
            if (!threw)
                break; // the n-th allocation was never reached
            ++points;
        }
    }
    // Each way allocates at least once after the memfd exists (the object, or the message).
    CHECK(points >= 4);
    Old::reset();
}

TEST_CASE("a tracked manager's bitmap and harvest barrier go through its VA policy's seam")
{
    // A kernel without the private expedited barrier: no tracked manager (an untracked one
    // needs none).
    Old::reset();
    Old::unknown_membarrier_commands = {MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                                        MEMBARRIER_CMD_PRIVATE_EXPEDITED};
    auto refused = build<Tracked>();
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code() == mb::errc::unsupported);
    CHECK(refused.error().full_message().find("MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED") !=
          std::string::npos);
    CHECK(build<mb::GuestMemoryManager<mb::NestedPriority, mb::LinuxMmap<Old>, mb::MockPartition>>()
              .has_value());

    // A barrier that fails at harvest time is the take's error, not a silent take.
    Old::reset();
    Tracked m = must(build<Tracked>());
    must(m.start_dirty_tracking());
    Old::unknown_membarrier_commands = {MEMBARRIER_CMD_PRIVATE_EXPEDITED};
    std::vector<mb::DirtyRun> runs;
    auto take = m.take_dirty_runs(range(0, 16 * MiB), runs);
    REQUIRE_FALSE(take.has_value());
    CHECK(take.error().full_message().find("membarrier") != std::string::npos);
    Old::reset();
    CHECK(m.take_dirty_runs(range(0, 16 * MiB), runs).has_value());
}
