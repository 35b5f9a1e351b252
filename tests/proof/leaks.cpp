// Leaks: 100,000 map/unmap cycles of a region, 10,000 device-region cycles (new region, a new
// object mapped in, placed, written, leased, dropped) and 10,000 lazy-mapper cycles (made,
// faulted in, dropped). Afterwards the process's fd count, the mappings that are ours and the
// resident pages of our reservation are back to their baseline.
//
// "Ours", so that sanitizer runtimes (which map and unmap as they please) cannot move the
// count: the /proc/self/maps lines inside the primary mapper's reservation and the lines of our
// objects anywhere (memfd:membacking-test: VA mappings and lease windows); each lazy mapper's
// reservation must be gone once it is dropped (no line left in its range). Resident pages:
// mincore over the primary's reservation. Each measure is first shown to see what it counts.
#include <membacking/membacking.hpp>

#include "place_device.hpp"
#include "platform.hpp"
#include "test_support.hpp"

#include <cstdint>
#include <cstdio>
#include <dirent.h>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/mman.h>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
using Manager = MockGuestMemoryManager;
constexpr std::uint64_t space = 16 * MiB;

struct Usage {
    std::size_t fds = 0;
    std::size_t lines_in_reservation = 0;
    std::size_t object_lines = 0;
    std::size_t resident_pages = 0;

    friend bool operator==(const Usage&, const Usage&) = default;
    friend std::ostream& operator<<(std::ostream& os, const Usage& u)
    {
        return os << "fds " << u.fds << ", maps lines in the reservation " << u.lines_in_reservation
                  << ", of our objects " << u.object_lines << ", resident pages "
                  << u.resident_pages;
    }
};

/// The /proc/self/maps lines that intersect [lo, lo + len).
std::size_t lines_in(std::uintptr_t lo, std::uint64_t len)
{
    std::size_t n = 0;
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) {
        std::uintptr_t start = 0, end = 0;
        char dash = 0;
        std::istringstream in(line);
        in >> std::hex >> start >> dash >> end;
        n += (start < lo + len && end > lo) ? 1 : 0;
    }
    return n;
}

Usage usage(const std::byte* base)
{
    Usage u;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (::readdir(d) != nullptr)
            ++u.fds;
        ::closedir(d);
    }
    const auto lo = reinterpret_cast<std::uintptr_t>(base);
    const std::uintptr_t hi = lo + space;
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) {
        std::uintptr_t start = 0, end = 0;
        char dash = 0;
        std::istringstream in(line);
        in >> std::hex >> start >> dash >> end;
        if (start < hi && end > lo)
            ++u.lines_in_reservation;
        if (line.find("memfd:membacking-test") != std::string::npos)
            ++u.object_lines;
    }
    std::vector<unsigned char> resident(space / page_size);
    REQUIRE(::mincore(const_cast<std::byte*>(base), space, resident.data()) == 0);
    for (const unsigned char r : resident)
        u.resident_pages += r & 1U;
    return u;
}

constexpr int map_cycles = 100000;
constexpr int device_cycles = 10000;
constexpr int lazy_cycles = 10000;

} // namespace

TEST_CASE("leaks: map/unmap, device-region and lazy-mapper cycles come back to the baseline")
{
    Manager m = must(Manager::builder()
                         .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                         .build(Length{space}));
    auto partition = std::make_shared<MockPartition>();
    partition->set_recording(false);
    must(m.attach_partition(Vtl::vtl0, partition));
    const Manager::Memory mem = m.guest_memory();
    const std::byte* base = mem.mapper()->base();
    const RegionId r =
        must(m.add_region("cycled", range(8 * MiB, 8 * MiB + 0x10000), 1, MappingType::Ram));
    must(m.add_mapping(r, {range(0, 0x10000),
                           MappingBacking::file(test::make_object(0x10000), Offset{0}),
                           true,
                           {}}));
    auto device_cycle = [&](int i) {
        auto dev = test::place_device(m, "dev", Gpa{12 * MiB}, Length{0x10000},
                                      test::make_object(0x10000));
        REQUIRE(
            mem.write_plain<std::uint32_t>(Gpa{12 * MiB + 0x1000}, static_cast<std::uint32_t>(i))
                .has_value());
        auto lease = must(mem.lease(Gpa{12 * MiB}, Length{0x2000}, LeaseAccess::read_write));
        CHECK(lease.spans().size() == 1);
    };
    std::uintptr_t lazy_base = 0;
    auto lazy_cycle = [&] {
        auto lazy = must(m.client().lazy_guest_memory());
        REQUIRE(lazy.read_plain<std::uint64_t>(Gpa{0x1000}).has_value());
        REQUIRE(lazy.read_plain<std::uint64_t>(Gpa{MiB + 0x1000}).has_value());
        lazy_base = reinterpret_cast<std::uintptr_t>(lazy.mapper()->base());
    };
    // One of each first, so that what is made once (the fault handler, RAM pages touched,
    // allocator caches) is in the baseline.
    must(m.map_region(r, {true, false, false}));
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{8 * MiB}, 1).has_value());
    must(m.unmap_region(r));
    device_cycle(0);
    lazy_cycle();
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{0x1000}, 1).has_value());
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{MiB + 0x1000}, 1).has_value());
    const Usage baseline = usage(base);
    MESSAGE("baseline: " << baseline);
    CHECK(baseline.lines_in_reservation > 0);
    {
        // The measures see what they count: a mapped region, an object, resident pages.
        must(m.map_region(r, {true, false, false}));
        REQUIRE(mem.fill(Gpa{8 * MiB}, 1, Length{0x10000}).has_value());
        const Usage mapped = usage(base);
        CHECK(mapped.lines_in_reservation > baseline.lines_in_reservation);
        CHECK(mapped.object_lines > baseline.object_lines);
        CHECK(mapped.resident_pages >= baseline.resident_pages + 16);
        must(m.unmap_region(r));
        CHECK(usage(base) == baseline);
        auto lazy = must(m.client().lazy_guest_memory());
        CHECK(lines_in(reinterpret_cast<std::uintptr_t>(lazy.mapper()->base()), space) > 0);
    }

    for (int i = 0; i < map_cycles; ++i) {
        must(m.map_region(r, {true, false, false}));
        if (i % 1000 == 0)
            REQUIRE(mem.write_plain<std::uint64_t>(Gpa{8 * MiB + 0x100}, 2).has_value());
        must(m.unmap_region(r));
    }
    const Usage after_maps = usage(base);
    MESSAGE("after " << map_cycles << " map/unmap cycles: " << after_maps);
    CHECK(after_maps == baseline);

    for (int i = 0; i < device_cycles; ++i)
        device_cycle(i);
    const Usage after_devices = usage(base);
    MESSAGE("after " << device_cycles << " device-region cycles: " << after_devices);
    CHECK(after_devices == baseline);

    for (int i = 0; i < lazy_cycles; ++i)
        lazy_cycle();
    const Usage after_lazy = usage(base);
    MESSAGE("after " << lazy_cycles << " lazy-mapper cycles: " << after_lazy);
    CHECK(after_lazy == baseline);
    CHECK(lines_in(lazy_base, space) == 0); // the last lazy mapper's reservation is gone
}
