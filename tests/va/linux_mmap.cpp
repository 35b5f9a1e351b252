// LinuxMmap: the VA conformance suite (the reference's sparse_mmap tests that apply everywhere),
// plus what is Linux's own: THP advice, NUMA binding, VMA names, memfd objects, and the seam
// (injected failures leave the range as it was).
#include <membacking/va/linux_mmap.hpp>

#include "injecting_syscalls.hpp"
#include "test_support.hpp"
#include "va_conformance.hpp"

#include <cstring>
#include <fstream>
#include <string>
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
