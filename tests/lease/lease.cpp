// Leases and probes (lease/lease.hpp, lease/lease_domain.hpp) through a real manager: what a
// lease holds and refuses, that its memory stays the object's across topology changes and after
// the manager, that windows are reclaimed after the last lease, and two concurrency tests: a
// writer through leases while the topology changes 10,000 times, and preadv/pwritev through
// leases while it changes.
#include <membacking/membacking.hpp>

#include "place_device.hpp"
#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <new>
#include <string>
#include <sys/uio.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

// Counts this thread's allocations, so a test can say that taking a lease allocates nothing.
namespace {
thread_local std::uint64_t allocations = 0;
} // namespace

void* operator new(std::size_t n)
{
    ++allocations;
    if (void* p = std::malloc(n == 0 ? 1 : n))
        return p;
    throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept
{
    ++allocations;
    return std::malloc(n == 0 ? 1 : n);
}
#include "malloc_delete.hpp" // its operator delete pair

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t page = page_size;
using Manager = MockGuestMemoryManager;

Manager ram_guest(std::uint64_t ram = 4 * MiB, bool private_memory = false)
{
    return must(Manager::builder()
                    .add_backing(RamBackingRequest({range(0, ram)}).private_memory(private_memory))
                    .build(Length{64 * MiB}));
}

/// A named memfd, so /proc/self/maps shows where it is mapped.
Mappable named_memfd(const std::string& name, std::uint64_t size)
{
    const int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
    return Mappable::adopt(fd);
}

std::uint64_t pread_u64(const Mappable& object, std::uint64_t offset)
{
    std::uint64_t v = 0;
    REQUIRE(::pread(object.native_handle(), &v, sizeof v, static_cast<off_t>(offset)) ==
            static_cast<ssize_t>(sizeof v));
    return v;
}

/// Lines of /proc/self/maps that name `what`.
int maps_lines_naming(const std::string& what)
{
    std::ifstream maps("/proc/self/maps");
    int n = 0;
    for (std::string line; std::getline(maps, line);)
        n += line.find(what) != std::string::npos ? 1 : 0;
    return n;
}

int open_fds()
{
    int n = 0;
    DIR* d = ::opendir("/proc/self/fd");
    REQUIRE(d != nullptr);
    while (::readdir(d) != nullptr)
        ++n;
    ::closedir(d);
    return n;
}

template <class T>
errc code_of(const Result<T>& r)
{
    REQUIRE_FALSE(r.has_value());
    return static_cast<errc>(r.error().code().value());
}

} // namespace

TEST_CASE("a lease exposes the guest's memory as spans and iovecs")
{
    auto m = ram_guest();
    auto memory = m.guest_memory();
    REQUIRE(memory.write_plain(Gpa{0x3000}, std::uint64_t{0x1122334455667788}));

    auto lease = must(memory.lease(Gpa{0x3000}, Length{2 * page}, LeaseAccess::read_write));
    REQUIRE(lease.spans().size() == 1);
    REQUIRE(lease.iovecs().size() == 1);
    CHECK(lease.spans()[0].size() == 2 * page);
    CHECK(lease.iovecs()[0].iov_len == 2 * page);
    CHECK(lease.iovecs()[0].iov_base == lease.spans()[0].data());
    CHECK(lease.gpa() == Gpa{0x3000});
    CHECK(lease.size() == Length{2 * page});
    // Not the VA mapper's range: the lease window.
    CHECK(lease.spans()[0].data() != memory.mapper()->base() + 0x3000);

    std::uint64_t seen = 0;
    std::memcpy(&seen, lease.spans()[0].data(), sizeof seen);
    CHECK(seen == 0x1122334455667788);
    const std::uint64_t written = 0xa5a5;
    std::memcpy(lease.spans()[0].data() + page, &written, sizeof written);
    CHECK(test::value_of(memory.read_plain<std::uint64_t>(Gpa{0x3000 + page})) == written);

    // Moving transfers the memory; the moved-from lease is empty.
    Lease moved = std::move(lease);
    CHECK(lease.empty()); // NOLINT(bugprone-use-after-move): moved-from state is specified
    CHECK(moved.spans().size() == 1);
    moved.reset();
    CHECK(moved.empty());
}

TEST_CASE("a lease of an unmapped, read-only, out-of-range or private range fails cleanly")
{
    auto m = ram_guest(4 * MiB);
    auto memory = m.guest_memory();

    SUBCASE("unmapped: the error names the first GPA that is not mapped")
    {
        auto r = memory.lease(Gpa{4 * MiB - page}, Length{2 * page}, LeaseAccess::read);
        CHECK(code_of(r) == errc::unmapped);
        CHECK(r.error().full_message().find("0x400000") != std::string::npos);
        CHECK(code_of(memory.lease(Gpa{8 * MiB}, Length{page}, LeaseAccess::read)) ==
              errc::unmapped);
    }
    SUBCASE("read-only: a write lease is refused, a read lease is not")
    {
        auto rom = test::place_device(m, "rom", Gpa{16 * MiB}, Length{2 * page},
                                      test::make_memfd(2 * page), Protection::read_only,
                                      Protection::read_write);
        CHECK(code_of(memory.lease(Gpa{16 * MiB}, Length{page}, LeaseAccess::write)) ==
              errc::read_only);
        CHECK(code_of(memory.lease(Gpa{16 * MiB}, Length{page}, LeaseAccess::read_write)) ==
              errc::read_only);
        CHECK(memory.lease(Gpa{16 * MiB}, Length{2 * page}, LeaseAccess::read).has_value());
    }
    SUBCASE("outside the guest address space, empty")
    {
        CHECK(code_of(memory.lease(Gpa{64 * MiB}, Length{page}, LeaseAccess::read)) ==
              errc::out_of_range);
        CHECK(code_of(memory.lease(Gpa{0}, Length{0}, LeaseAccess::read)) == errc::invalid_range);
    }
    SUBCASE("private memory has no object to lease")
    {
        auto p = ram_guest(4 * MiB, true);
        auto r = p.guest_memory().lease(Gpa{0}, Length{page}, LeaseAccess::read);
        CHECK(code_of(r) == errc::unsupported);
        CHECK(r.error().full_message().find("0x0-0x3fffff") != std::string::npos);
        // The probe sees it all the same.
        CHECK(p.guest_memory().probe(Gpa{0}, Length{page}) ==
              RangeProbe{Length{page}, Length{page}});
    }
}

TEST_CASE("probe says how much of a range is mapped and writable, from its start")
{
    auto m = ram_guest(4 * MiB);
    auto memory = m.guest_memory();
    auto rom = test::place_device(m, "rom", Gpa{4 * MiB}, Length{page}, test::make_memfd(page),
                                  Protection::read_only, Protection::read_write); // right after RAM

    CHECK(memory.probe(Gpa{0}, Length{page}) == RangeProbe{Length{page}, Length{page}});
    // RAM, then the ROM page, then a gap.
    CHECK(memory.probe(Gpa{4 * MiB - page}, Length{4 * page}) ==
          RangeProbe{Length{2 * page}, Length{page}});
    CHECK(memory.probe(Gpa{8 * MiB}, Length{page}) == RangeProbe{});
    // The part beyond the guest address space is unmapped.
    CHECK(memory.probe(Gpa{64 * MiB - page}, Length{4 * page}) == RangeProbe{});
    // Changes show at once.
    must(rom.unmap_from_guest());
    CHECK(memory.probe(Gpa{4 * MiB - page}, Length{4 * page}) ==
          RangeProbe{Length{page}, Length{page}});
}

TEST_CASE("a lease spanning several objects has one piece per object run; many pieces work too")
{
    auto m = ram_guest(4 * MiB);
    auto memory = m.guest_memory();
    constexpr std::uint64_t n = 6; // more than Lease::inline_pieces
    static_assert(n > Lease::inline_pieces);
    std::vector<Mappable> objects;
    auto dev = must(m.device_memory_mapper().new_region("strip", Length{n * page}));
    for (std::uint64_t i = 0; i < n; ++i) {
        objects.push_back(test::make_memfd(page));
        must(dev.map({.offset = Offset{i * page},
                      .length = Length{page},
                      .object = objects.back(),
                      .object_offset = Offset{0},
                      .protection = Protection::read_write}));
    }
    must(dev.map_to_guest(Gpa{16 * MiB}, Protection::read_write));

    auto two = must(memory.lease(Gpa{16 * MiB + page / 2}, Length{page}, LeaseAccess::write));
    REQUIRE(two.iovecs().size() == 2);
    CHECK(two.iovecs()[0].iov_len == page / 2);
    CHECK(two.iovecs()[1].iov_len == page / 2);

    auto all = must(memory.lease(Gpa{16 * MiB}, Length{n * page}, LeaseAccess::write));
    REQUIRE(all.spans().size() == n);
    for (std::uint64_t i = 0; i < n; ++i) {
        const std::uint64_t v = 100 + i;
        std::memcpy(all.spans()[i].data() + 8, &v, sizeof v);
        CHECK(pread_u64(objects[i], 8) == v);
    }
    // Contiguous RAM in one object stays one piece, however many mappings cover it.
    CHECK(must(memory.lease(Gpa{0}, Length{4 * MiB}, LeaseAccess::read)).spans().size() == 1);
}

TEST_CASE("taking and releasing a lease of up to inline_pieces pieces allocates nothing")
{
    auto m = ram_guest(4 * MiB);
    auto memory = m.guest_memory();
    auto dev = must(m.device_memory_mapper().new_region("four", Length{4 * page}));
    for (std::uint64_t i = 0; i < 4; ++i)
        must(dev.map({.offset = Offset{i * page},
                      .length = Length{page},
                      .object = test::make_memfd(page),
                      .object_offset = Offset{0},
                      .protection = Protection::read_write}));
    must(dev.map_to_guest(Gpa{16 * MiB}, Protection::read_write));
    const std::uint64_t before = allocations;
    std::size_t pieces = 0;
    {
        auto one = memory.lease(Gpa{0x1000}, Length{page}, LeaseAccess::read_write);
        auto four = memory.lease(Gpa{16 * MiB}, Length{4 * page}, LeaseAccess::write);
        pieces = one && four ? one->spans().size() + four->spans().size() : 0;
    }
    CHECK(allocations == before);
    CHECK(pieces == 5);
}

TEST_CASE("a lazy mapper's handle leases exactly as the primary's does")
{
    auto m = ram_guest(4 * MiB);
    auto lazy = must(m.client().lazy_guest_memory());
    auto lease = must(lazy.lease(Gpa{0x10000}, Length{page}, LeaseAccess::write));
    const std::uint64_t v = 77;
    std::memcpy(lease.spans()[0].data(), &v, sizeof v);
    CHECK(test::value_of(m.guest_memory().read_plain<std::uint64_t>(Gpa{0x10000})) == v);
}

TEST_CASE("a lease outlives unmapping, remapping elsewhere and the manager; writes land in the "
          "object")
{
    const Mappable object = test::make_memfd(4 * page);
    Lease lease;
    {
        auto m = ram_guest(4 * MiB);
        auto dev = test::place_device(m, "bar", Gpa{16 * MiB}, Length{4 * page}, object);
        lease =
            must(m.guest_memory().lease(Gpa{16 * MiB + page}, Length{page}, LeaseAccess::write));
        must(dev.map_to_guest(Gpa{32 * MiB}, Protection::read_write)); // moved
        std::uint64_t v = 1;
        std::memcpy(lease.spans()[0].data(), &v, sizeof v);
        CHECK(test::value_of(m.guest_memory().read_plain<std::uint64_t>(Gpa{32 * MiB + page})) ==
              v);
        // The guest lost the old GPA at once; the lease did not keep it.
        CHECK(code_of(m.guest_memory().lease(Gpa{16 * MiB}, Length{page}, LeaseAccess::read)) ==
              errc::unmapped);
        CHECK_FALSE(m.guest_memory().read_plain<std::uint64_t>(Gpa{16 * MiB + page}));
        must(dev.unmap_from_guest());
        v = 2;
        std::memcpy(lease.spans()[0].data(), &v, sizeof v);
    }
    // The manager is gone; the lease is still valid until released.
    const std::uint64_t v = 3;
    std::memcpy(lease.spans()[0].data() + 8, &v, sizeof v);
    CHECK(pread_u64(object, page) == 2);
    CHECK(pread_u64(object, page + 8) == 3);
    lease.reset();
}

TEST_CASE("a lease window is reclaimed after the object leaves the guest and the last lease goes")
{
    const std::string name = "membacking-lease-window-test";
    auto m = ram_guest(4 * MiB);
    const std::size_t ram_windows = m.core().lease_window_count();
    CHECK(ram_windows == 1);
    const int fds_before = open_fds();
    {
        auto dev = must(m.device_memory_mapper().new_region("win", Length{2 * page}));
        must(dev.map({.offset = Offset{0},
                      .length = Length{2 * page},
                      .object = named_memfd(name, 2 * page),
                      .object_offset = Offset{0},
                      .protection = Protection::read_write}));
        // Not in an active mapping yet: no window.
        CHECK(m.core().lease_window_count() == ram_windows);
        must(dev.map_to_guest(Gpa{16 * MiB}, Protection::read_write));
        CHECK(m.core().lease_window_count() == ram_windows + 1);
        const int with_window = maps_lines_naming(name);
        CHECK(with_window == 2); // the primary mapper's mapping and the window

        Lease lease = must(m.guest_memory().lease(Gpa{16 * MiB}, Length{page}, LeaseAccess::read));
        Lease second = must(m.guest_memory().lease(Gpa{16 * MiB}, Length{page}, LeaseAccess::read));
        must(dev.unmap_from_guest());
        // Out of the table, but leased: retired, still mapped.
        CHECK(m.core().lease_window_count() == ram_windows);
        CHECK(maps_lines_naming(name) == 1);
        lease.reset();
        CHECK(maps_lines_naming(name) == 1);
        second.reset();
        CHECK(maps_lines_naming(name) == 0);

        // Without a lease, leaving the guest unmaps the window at once.
        must(dev.map_to_guest(Gpa{16 * MiB}, Protection::read_write));
        CHECK(maps_lines_naming(name) == 2);
        must(dev.unmap_from_guest());
        CHECK(maps_lines_naming(name) == 0);
    }
    CHECK(open_fds() == fds_before); // windows hold no descriptor
}

TEST_CASE("a writer through leases while the topology changes 10,000 times: every write lands in "
          "the object it was meant for")
{
    constexpr int changes = 10000;
    constexpr std::uint64_t slots = page / sizeof(std::uint64_t);
    auto m = ram_guest(4 * MiB);
    auto memory = m.guest_memory();
    auto devices = m.device_memory_mapper();

    // "swap": one device region whose single page is object a or object b, swapped by the
    // control thread, and taken out of the guest and put back.
    const Mappable a = test::make_memfd(page);
    const Mappable b = test::make_memfd(page);
    auto swap = must(devices.new_region("swap", Length{page}));
    must(swap.map({.offset = Offset{0},
                   .length = Length{page},
                   .object = a,
                   .object_offset = Offset{0},
                   .protection = Protection::read_write}));
    must(swap.map_to_guest(Gpa{16 * MiB}, Protection::read_write));
    // "moving": a device region moved between two GPAs under one long-lived lease.
    const Mappable c = test::make_memfd(page);
    auto moving = must(devices.new_region("moving", Length{page}));
    must(moving.map({.offset = Offset{0},
                     .length = Length{page},
                     .object = c,
                     .object_offset = Offset{0},
                     .protection = Protection::read_write}));
    must(moving.map_to_guest(Gpa{20 * MiB}, Protection::read_write));
    Lease held = must(memory.lease(Gpa{20 * MiB}, Length{page}, LeaseAccess::write));

    std::atomic<bool> done{false};
    std::uint64_t taken = 0;
    std::uint64_t last_held = 0;
    std::vector<std::uint64_t> last_in_slot(slots, 0);
    std::thread writer([&] {
        std::uint64_t i = 1;
        for (; !done.load(std::memory_order_relaxed); ++i) {
            // The long-lived lease: written continuously, whatever the region's GPA.
            std::memcpy(held.spans()[0].data(), &i, sizeof i);
            last_held = i;
            // A fresh lease of whatever is at the swap GPA now (if anything).
            auto l = memory.lease(Gpa{16 * MiB}, Length{page}, LeaseAccess::write);
            if (!l) {
                CHECK(static_cast<errc>(l.error().code().value()) == errc::unmapped);
                continue;
            }
            const std::uint64_t slot = i % slots;
            std::memcpy(l->spans()[0].data() + slot * sizeof i, &i, sizeof i);
            last_in_slot[slot] = i;
            ++taken;
        }
    });
    for (int k = 0; k < changes; ++k) {
        switch (k % 4) {
        case 0: must(swap.unmap_from_guest()); break;
        case 1: must(swap.map_to_guest(Gpa{16 * MiB}, Protection::read_write)); break;
        case 2:
            must(swap.map({.offset = Offset{0},
                           .length = Length{page},
                           .object = (k / 4) % 2 == 0 ? b : a,
                           .object_offset = Offset{0},
                           .protection = Protection::read_write}));
            break;
        default: break;
        }
        must(moving.map_to_guest(Gpa{(k % 2 == 0 ? 24 : 20) * MiB}, Protection::read_write));
    }
    done = true;
    writer.join();

    CHECK(taken > 0);
    CHECK(pread_u64(c, 0) == last_held);
    // Each slot's last write is in a or b; nothing lands where it was not written.
    for (std::uint64_t s = 0; s < slots; ++s) {
        const std::uint64_t in_a = pread_u64(a, s * 8);
        const std::uint64_t in_b = pread_u64(b, s * 8);
        CHECK(std::max(in_a, in_b) == last_in_slot[s]);
        for (const std::uint64_t v : {in_a, in_b})
            CHECK((v == 0 || v % slots == s));
    }
    held.reset();
    CHECK(m.core().lease_window_count() == 3); // RAM, c, and whichever of a or b is mapped
}

TEST_CASE("preadv into leased guest memory and pwritev back out while the topology changes")
{
    constexpr int rounds = 2000;
    constexpr std::uint64_t len = 3 * page; // two objects: two iovecs
    auto m = ram_guest(4 * MiB);
    auto memory = m.guest_memory();
    auto dev = must(m.device_memory_mapper().new_region("disk-buffer", Length{len}));
    const Mappable first = test::make_memfd(2 * page);
    const Mappable second = test::make_memfd(page);
    must(dev.map({.offset = Offset{0},
                  .length = Length{2 * page},
                  .object = first,
                  .object_offset = Offset{0},
                  .protection = Protection::read_write}));
    must(dev.map({.offset = Offset{2 * page},
                  .length = Length{page},
                  .object = second,
                  .object_offset = Offset{0},
                  .protection = Protection::read_write}));
    must(dev.map_to_guest(Gpa{16 * MiB}, Protection::read_write));

    const int in = ::memfd_create("membacking-disk-in", MFD_CLOEXEC);
    const int out = ::memfd_create("membacking-disk-out", MFD_CLOEXEC);
    REQUIRE(in >= 0);
    REQUIRE(out >= 0);
    std::vector<unsigned char> pattern(len);
    for (std::size_t i = 0; i < len; ++i)
        pattern[i] = static_cast<unsigned char>(i * 7 + 3);

    std::atomic<bool> done{false};
    std::thread topology([&] {
        for (std::uint64_t k = 0; !done.load(std::memory_order_relaxed); ++k) {
            // Move the buffer between two GPAs.
            must(dev.map_to_guest(Gpa{(k % 2 == 0 ? 24 : 16) * MiB}, Protection::read_write));
        }
    });
    int transfers = 0;
    for (int r = 0; r < rounds; ++r) {
        pattern[0] = static_cast<unsigned char>(r);
        pattern[len - 1] = static_cast<unsigned char>(r >> 8);
        REQUIRE(::pwrite(in, pattern.data(), len, 0) == static_cast<ssize_t>(len));
        // The buffer is at one of two GPAs, or in between: try both until one leases (on a
        // loaded machine the topology thread may keep it in between for a while; giving up
        // after a try or two made this test fail without a fault in the code).
        auto l = memory.lease(Gpa{16 * MiB}, Length{len}, LeaseAccess::read_write);
        for (int tries = 0; !l && tries < 10'000'000; ++tries) {
            std::this_thread::yield();
            l = memory.lease(Gpa{(tries % 2 == 0 ? 24 : 16) * MiB}, Length{len},
                             LeaseAccess::read_write);
        }
        REQUIRE(l);
        REQUIRE(l->iovecs().size() == 2);
        const auto n = static_cast<int>(l->iovecs().size());
        REQUIRE(::preadv(in, l->iovecs().data(), n, 0) == static_cast<ssize_t>(len));
        REQUIRE(::pwritev(out, l->iovecs().data(), n, 0) == static_cast<ssize_t>(len));
        std::vector<unsigned char> back(len);
        REQUIRE(::pread(out, back.data(), len, 0) == static_cast<ssize_t>(len));
        CHECK(back == pattern);
        // And through the objects themselves.
        std::vector<unsigned char> objects(len);
        REQUIRE(::pread(first.native_handle(), objects.data(), 2 * page, 0) ==
                static_cast<ssize_t>(2 * page));
        REQUIRE(::pread(second.native_handle(), objects.data() + 2 * page, page, 0) ==
                static_cast<ssize_t>(page));
        CHECK(objects == pattern);
        ++transfers;
    }
    done = true;
    topology.join();
    ::close(in);
    ::close(out);
    CHECK(transfers == rounds);
}
