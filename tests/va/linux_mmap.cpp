// LinuxMmap: the VA conformance suite (the reference's sparse_mmap tests that apply everywhere),
// plus what is Linux's own: THP advice, NUMA binding, VMA names, memfd objects, and the seam
// (injected failures leave the range as it was).
#include <membacking/membacking.hpp>
#include <membacking/va/linux_mmap.hpp>

#include "injecting_syscalls.hpp"
#include "test_support.hpp"
#include "va_conformance.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>

using namespace membacking;
using test::must;
using Va = LinuxMmap<>;
using InjectedVa = LinuxMmap<test::InjectingSyscalls>;

namespace {
/// The /proc/self/maps line for the VMA containing p.
std::string maps_line(const void* p)
{
    std::ifstream maps("/proc/self/maps");
    std::string line;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    while (std::getline(maps, line)) {
        unsigned long lo = 0, hi = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2 && a >= lo && a < hi)
            return line;
    }
    return {};
}

/// The conformance suite's view of LinuxMmap: reserved means a PROT_NONE private VMA.
struct LinuxMmapFixture {
    using Va = LinuxMmap<>;
    static bool reserved_and_inaccessible(const std::byte* p)
    {
        const std::string line = maps_line(p);
        return !line.empty() && line.find("---p") != std::string::npos;
    }
};
} // namespace

TEST_CASE_TEMPLATE_INVOKE(va_conformance, LinuxMmapFixture);

TEST_CASE("madvise(MADV_HUGEPAGE) on private and shared memory")
{
    Va va = must(Va::reserve(std::uint64_t{4} << 20, 1));
    must(va.commit_private(0, std::uint64_t{2} << 20));
    must(va.advise_hugepages(0, std::uint64_t{2} << 20));
    Mappable shm = must(Va::create_shared_memory(std::uint64_t{2} << 20, "thp"));
    must(va.map_file(std::uint64_t{2} << 20, std::uint64_t{2} << 20, shm, 0, true));
    must(va.advise_hugepages(std::uint64_t{2} << 20, std::uint64_t{2} << 20));
    va.base()[(std::uint64_t{2} << 20) + 1] = std::byte{1};
    CHECK(va.base()[(std::uint64_t{2} << 20) + 1] == std::byte{1});
}

TEST_CASE("NUMA binding to node 0 works; an absurd node is an error")
{
    Va va = must(Va::reserve(4 * page_size, 1));
    must(va.commit_private(0, page_size));
    must(va.bind_numa(0, page_size, 0));
    int mode = -1;
    unsigned long mask = 0;
    REQUIRE(os::LinuxSyscalls::get_mempolicy(&mode, &mask, sizeof(mask) * 8, va.base(),
                                             2 /* MPOL_F_ADDR */) == 0);
    CHECK(mode == 2 /* MPOL_BIND */);
    CHECK(mask == 1);
    CHECK(membacking::test::error_of(va.bind_numa(0, page_size, 99999)) == errc::invalid_argument);
}

namespace {
/// Whether this kernel names anonymous VMAs (CONFIG_ANON_VMA_NAME), probed on a scratch mapping.
bool kernel_names_vmas()
{
    void* p = ::mmap(nullptr, page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    const int r = ::prctl(0x53564d41, 0, reinterpret_cast<unsigned long>(p), page_size,
                          reinterpret_cast<unsigned long>("probe"));
    ::munmap(p, page_size);
    return r == 0;
}
} // namespace

TEST_CASE("set_name names the reservation where the kernel can, and reports it where it cannot")
{
    Va va = must(Va::reserve(4 * page_size, 1));
    auto named = va.set_name(0, page_size, "guest-memory");
    if (kernel_names_vmas()) {
        REQUIRE(named.has_value());
        CHECK(maps_line(va.base()).find("[anon:guest-memory]") != std::string::npos);
    } else {
        REQUIRE_FALSE(named.has_value());
        CHECK(membacking::test::error_of(named) == std::errc::invalid_argument);
        CHECK(maps_line(va.base()).find("[anon:") == std::string::npos);
    }
}

TEST_CASE("injected mmap failures leave the range as it was")
{
    test::InjectingSyscalls::reset();
    test::InjectingSyscalls::fail_mmap(1, ENOMEM);
    auto failed = InjectedVa::reserve(4 * page_size, 1);
    REQUIRE_FALSE(failed);
    CHECK(membacking::test::error_of(failed) == std::errc::not_enough_memory);

    InjectedVa va = must(InjectedVa::reserve(4 * page_size, 1));
    Mappable shm = must(InjectedVa::create_shared_memory(page_size, "inject"));
    must(va.map_file(0, page_size, shm, 0, true));
    va.base()[3] = std::byte{9};

    test::InjectingSyscalls::fail_mmap(1, EINVAL);
    auto replace = va.commit_private(0, page_size);
    REQUIRE_FALSE(replace);
    CHECK(membacking::test::error_of(replace) == std::errc::invalid_argument);
    CHECK(va.base()[3] == std::byte{9}); // the file mapping is still there

    test::InjectingSyscalls::fail_mmap(1, ENOMEM);
    REQUIRE_FALSE(va.unmap(0, page_size));
    CHECK(va.base()[3] == std::byte{9});
    test::InjectingSyscalls::reset();
}

namespace {
/// Whether anything at all is mapped at p's page (MAP_FIXED_NOREPLACE fails with EEXIST).
bool page_is_mapped(std::byte* p)
{
    void* got = ::mmap(p, page_size, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (got == MAP_FAILED)
        return errno == EEXIST;
    ::munmap(got, page_size);
    return false;
}

/// Another thread's allocation landing in the first page of the hole.
void intrude(void* addr, std::size_t)
{
    void* got = ::mmap(addr, page_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    REQUIRE(got == addr);
    static_cast<std::byte*>(got)[0] = std::byte{0xab};
}
} // namespace

TEST_CASE("a MAP_FIXED that fails after removing the old mapping leaves the range reserved")
{
    test::InjectingSyscalls::reset();
    InjectedVa va = must(InjectedVa::reserve(4 * page_size, 1));
    Mappable shm = must(InjectedVa::create_shared_memory(4 * page_size, "rereserve"));
    must(va.map_file(0, 4 * page_size, shm, 0, true));
    va.base()[0] = std::byte{1};
    va.base()[3 * page_size] = std::byte{3};

    test::InjectingSyscalls::remove_before_failing = true;
    test::InjectingSyscalls::fail_mmap(1, ENOMEM);
    auto failed = va.commit_private(page_size, 2 * page_size);
    REQUIRE_FALSE(failed);
    CHECK(membacking::test::error_of(failed) == std::errc::not_enough_memory);
    // The hole the kernel left is reserved again, so no mmap(NULL) can land there...
    CHECK(page_is_mapped(va.base() + page_size));
    CHECK(page_is_mapped(va.base() + 2 * page_size));
    CHECK(maps_line(va.base() + page_size).find("---p") != std::string::npos);
    // ...and what the failure did not touch is as it was.
    CHECK(va.base()[0] == std::byte{1});
    CHECK(va.base()[3 * page_size] == std::byte{3});
    test::InjectingSyscalls::reset();
}

TEST_CASE("re-reserving after a failed MAP_FIXED leaves another thread's allocation alone")
{
    test::InjectingSyscalls::reset();
    InjectedVa va = must(InjectedVa::reserve(4 * page_size, 1));
    must(va.commit_private(0, 4 * page_size));
    test::InjectingSyscalls::remove_before_failing = true;
    test::InjectingSyscalls::after_removal = &intrude;
    test::InjectingSyscalls::fail_mmap(1, ENOMEM);
    REQUIRE_FALSE(va.unmap(page_size, 2 * page_size));
    CHECK(va.base()[page_size] == std::byte{0xab});   // the intruder's page, untouched
    CHECK(page_is_mapped(va.base() + 2 * page_size)); // the rest of the hole: reserved again
    CHECK(maps_line(va.base() + 2 * page_size).find("---p") != std::string::npos);
    test::InjectingSyscalls::reset();
}

namespace {
/// How many pages of [p, p + len) are mapped (mincore fails with ENOMEM on an unmapped page).
std::size_t mapped_pages(const void* p, std::size_t len)
{
    std::size_t mapped = 0;
    unsigned char vec = 0;
    for (std::size_t off = 0; off < len; off += page_size)
        // NOLINTNEXTLINE(performance-no-int-to-ptr): walking an address range page by page
        if (::mincore(reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(p) + off), page_size,
                      &vec) == 0)
            ++mapped;
    return mapped;
}
} // namespace

TEST_CASE("a failed trim of a reservation returns it whole: no address space leaks")
{
    // 64 MiB is aligned to 2 MiB: the over-allocation is trimmed at one end or both.
    int failures_injected = 0;
    for (long nth : {1L, 2L}) {
        test::InjectingSyscalls::reset();
        test::InjectingSyscalls::fail_munmap(nth, ENOMEM);
        auto va = InjectedVa::reserve(std::uint64_t{64} << 20, 1);
        const bool fired = test::InjectingSyscalls::munmap_plan.fired;
        // The whole allocation, trimmed ends included, is gone. (Not a count of the process's
        // reservations: sanitizer runtimes map and unmap their own meanwhile.)
        const std::size_t still_mapped = mapped_pages(test::InjectingSyscalls::last_mmap_addr,
                                                      test::InjectingSyscalls::last_mmap_len);
        test::InjectingSyscalls::reset();
        if (!fired) { // the allocation needed only nth - 1 trims: nothing to fail
            CHECK(va.has_value());
            continue;
        }
        ++failures_injected;
        REQUIRE_FALSE(va.has_value());
        CHECK(test::error_of(va) == std::errc::not_enough_memory);
        CHECK(va.error().full_message().find("failed to trim the reservation") !=
              std::string::npos);
        CHECK(still_mapped == 0);
    }
    CHECK(failures_injected >= 1); // there is always at least one end to trim
}

TEST_CASE("a page-aligned file offset beyond 2^63 is reported as such")
{
    Va va = must(Va::reserve(4 * page_size, 1));
    Mappable shm = must(Va::create_shared_memory(page_size, "far"));
    auto far = va.map_file(0, page_size, shm, std::uint64_t{1} << 63, true);
    REQUIRE_FALSE(far);
    CHECK(test::error_of(far) == errc::invalid_argument);
    CHECK(far.error().full_message().find("beyond the largest file offset") != std::string::npos);
    CHECK(far.error().full_message().find("page-aligned") == std::string::npos);
    auto odd = va.map_file(0, page_size, shm, 0x800, true);
    REQUIRE_FALSE(odd);
    CHECK(odd.error().full_message().find("not a page-aligned file offset") != std::string::npos);
}

TEST_CASE("shared memory objects: memfd sizes and hugetlb page-size validation")
{
    Mappable m = must(Va::create_shared_memory(3 * page_size, "sized"));
    struct stat st {};
    REQUIRE(::fstat(m.native_handle(), &st) == 0);
    CHECK(st.st_size == static_cast<off_t>(3 * page_size));
    CHECK(membacking::test::error_of(Va::create_hugetlb_memory(std::uint64_t{2} << 20, "bad",
                                                               3 << 20)) == errc::invalid_argument);
    CHECK(membacking::test::error_of(Va::create_hugetlb_memory(std::uint64_t{2} << 20, "bad",
                                                               2048)) == errc::invalid_argument);
    test::InjectingSyscalls::reset();
    test::InjectingSyscalls::memfd_plan = test::Plan{0, EMFILE};
    CHECK(membacking::test::error_of(InjectedVa::create_shared_memory(page_size, "x")) ==
          std::errc::too_many_files_open);
    test::InjectingSyscalls::reset();
}

namespace {
/// How many pages of [p, p + len) are resident (mincore).
std::size_t resident_pages(const std::byte* p, std::size_t len)
{
    std::vector<unsigned char> vec(len / page_size);
    REQUIRE(::mincore(const_cast<std::byte*>(p), len, vec.data()) == 0);
    std::size_t n = 0;
    for (unsigned char v : vec)
        n += v & 1U;
    return n;
}
} // namespace

TEST_CASE("RamBackingRequest::prefetch populates the host pages of the primary VA mapper")
{
    constexpr std::uint64_t ram = std::uint64_t{2} << 20;
    for (const bool prefetch : {false, true}) {
        CAPTURE(prefetch);
        auto m = must(MockGuestMemoryManager::builder()
                          .add_backing(RamBackingRequest({test::range(0, ram)}).prefetch(prefetch))
                          .build(Length{4 * ram}));
        const std::byte* base = m.guest_memory().mapper()->base();
        // A fresh memfd has no pages until something touches them.
        CHECK(resident_pages(base, ram) == (prefetch ? ram / page_size : 0));
    }
}
