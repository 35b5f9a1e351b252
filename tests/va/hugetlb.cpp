// hugetlb memfds with a chosen page size, mapped through LinuxMmap. Needs a 2 MiB hugetlb pool:
// the test reserves one itself where it can (as root) and otherwise reports itself skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#include <membacking/membacking.hpp>
#include <membacking/va/linux_mmap.hpp>

#include "hugetlb_pool.hpp"
#include "test_support.hpp"

#include <cstdio>
#include <fstream>
#include <string>

using namespace membacking;
using Va = LinuxMmap<>;

namespace {
constexpr std::uint64_t two_mib = std::uint64_t{2} << 20;

/// The KernelPageSize smaps reports for the mapping containing p, in kB (0 if not found).
long kernel_page_kb(const void* p)
{
    std::ifstream smaps("/proc/self/smaps");
    std::string line;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    bool inside = false;
    while (std::getline(smaps, line)) {
        unsigned long lo = 0, hi = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2)
            inside = a >= lo && a < hi;
        long kb = 0;
        if (inside && std::sscanf(line.c_str(), "KernelPageSize: %ld kB", &kb) == 1)
            return kb;
    }
    return 0;
}
} // namespace

TEST_CASE("a hugetlb memfd with 2 MiB pages maps, holds data, and is backed by huge pages")
{
    auto object = Va::create_hugetlb_memory(2 * two_mib, "hugetlb-test", two_mib);
    REQUIRE_MESSAGE(object.has_value(), (object ? "" : object.error().full_message()));
    auto va = Va::reserve(4 * two_mib, two_mib);
    REQUIRE(va.has_value());
    CHECK(reinterpret_cast<std::uintptr_t>(va->base()) % two_mib == 0);
    REQUIRE(va->map_file(two_mib, 2 * two_mib, *object, 0, true).has_value());
    va->base()[two_mib + 12345] = std::byte{0x5a};
    CHECK(va->base()[two_mib + 12345] == std::byte{0x5a});
    CHECK(kernel_page_kb(va->base() + two_mib) == 2048);
}

TEST_CASE("a hugetlb request larger than the pool fails when the object is created, not later")
{
    const long free_pages = test::HugetlbPool::free_pages();
    auto object = Va::create_hugetlb_memory(static_cast<std::uint64_t>(free_pages + 1) * two_mib,
                                            "too-big", two_mib);
    REQUIRE_FALSE(object.has_value());
    CHECK(object.error().code().category() == std::system_category());
    CHECK(test::HugetlbPool::free_pages() == free_pages); // nothing stayed reserved
}

TEST_CASE("a guest memory manager with hugetlb RAM (2 MiB pages)")
{
    using Manager = MockGuestMemoryManager;
    auto m = Manager::builder()
                 .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, 2 * two_mib)})
                                  .hugepages(Length{two_mib}))
                 .build(Length{4 * two_mib});
    REQUIRE_MESSAGE(m.has_value(), (m ? "" : m.error().full_message()));
    auto mem = m->guest_memory();
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{two_mib + 8}, 0x1234).has_value());
    CHECK(mem.read_plain<std::uint64_t>(Gpa{two_mib + 8}).value() == 0x1234);
    CHECK(reinterpret_cast<std::uintptr_t>(mem.mapper()->base()) % two_mib == 0);
    CHECK(kernel_page_kb(mem.mapper()->base()) == 2048);
}

int main(int argc, char** argv)
{
    test::HugetlbPool pool(4);
    if (!pool.ok()) {
        std::printf("SKIPPED: no 2 MiB hugetlb pool: %s\n", pool.why().c_str());
        return 77;
    }
    doctest::Context context(argc, argv);
    return context.run();
}
