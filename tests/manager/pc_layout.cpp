// The PC's legacy layout as a VMM sees it (x86_legacy.hpp: the ranges, the PAM registers), the
// RAM regions' names, the canonical layout of a backing's object, and restoring a manager from
// several backings (one per host NUMA node), with a mismatched layout refused.
#include <membacking/membacking.hpp>

#include "test_support.hpp"

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unistd.h>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t pg = page_size;
using Manager = MockGuestMemoryManager;

RamBackingRequest ram(std::vector<MemoryRange> ranges)
{
    return RamBackingRequest(std::move(ranges));
}

} // namespace

// ---- x86_legacy.hpp ----

static_assert(x86_legacy::pam_segments[2] == MemoryRange::constant(0xc8000, 0xcc000));
static_assert(x86_legacy::pam_range(2, 0) == MemoryRange::constant(0xc8000, 0xcc000));
static_assert(!x86_legacy::pam_range(0, 0).has_value()); // PAM0's low nibble is reserved

TEST_CASE("x86_legacy: the PAM registers' nibbles cover the twelve segments and the F segment")
{
    // Every i440FX PAM nibble, as the datasheet lists them (PAM0..PAM6 at config 0x59..0x5f).
    const std::vector<std::pair<std::pair<unsigned, unsigned>, std::uint64_t>> datasheet = {
        {{0, 1}, 0xf0000}, {{1, 0}, 0xc0000}, {{1, 1}, 0xc4000}, {{2, 0}, 0xc8000},
        {{2, 1}, 0xcc000}, {{3, 0}, 0xd0000}, {{3, 1}, 0xd4000}, {{4, 0}, 0xd8000},
        {{4, 1}, 0xdc000}, {{5, 0}, 0xe0000}, {{5, 1}, 0xe4000}, {{6, 0}, 0xe8000},
        {{6, 1}, 0xec000}};
    for (const auto& [reg_nibble, start] : datasheet) {
        const auto r = x86_legacy::pam_range(reg_nibble.first, reg_nibble.second);
        REQUIRE(r.has_value());
        CHECK(r->start() == start);
        CHECK(r->size() == (start == 0xf0000 ? 0x10000 : 0x4000));
    }
    CHECK_FALSE(x86_legacy::pam_range(0, 0).has_value());
    CHECK_FALSE(x86_legacy::pam_range(7, 0).has_value());
    CHECK_FALSE(x86_legacy::pam_range(1, 2).has_value());
    CHECK(x86_legacy::pam_config_offset == 0x59);

    CHECK(x86_legacy::pam_segment_index(Gpa{0xc0000}) == std::optional<std::size_t>(0));
    CHECK(x86_legacy::pam_segment_index(Gpa{0xcbfff}) == std::optional<std::size_t>(2));
    CHECK(x86_legacy::pam_segment_index(Gpa{0xeffff}) == std::optional<std::size_t>(11));
    CHECK_FALSE(x86_legacy::pam_segment_index(Gpa{0xbffff}).has_value());
    CHECK_FALSE(x86_legacy::pam_segment_index(Gpa{0xf0000}).has_value());
}

TEST_CASE("x86_legacy::ranges is what the builder creates, names included, and is controllable")
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(ram({range(0, 4 * MiB)}))
                         .build(Length{4 * MiB}));
    const MemoryMap map = m.memory_map();
    REQUIRE(map.regions.size() == x86_legacy::ranges.size() + 1);
    for (std::size_t i = 0; i < x86_legacy::ranges.size(); ++i) {
        CHECK(map.regions[i].range == x86_legacy::ranges[i].range);
        CHECK(map.regions[i].name == x86_legacy::ranges[i].name);
    }
    // Contiguous, from 0 to 1 MiB.
    CHECK(x86_legacy::ranges.front().range.start() == 0);
    for (std::size_t i = 1; i < x86_legacy::ranges.size(); ++i)
        CHECK(x86_legacy::ranges[i].range.start() == x86_legacy::ranges[i - 1].range.end());
    CHECK(x86_legacy::ranges.back().range.end() == x86_legacy::end);
    // Every range, and every PAM nibble's range, is a controllable RAM range.
    auto control = m.ram_visibility_control();
    for (const auto& r : x86_legacy::ranges)
        must(control.set_ram_visibility(r.range, RamVisibility::read_only));
    for (unsigned reg = 0; reg < x86_legacy::pam_register_count; ++reg)
        for (unsigned nibble : {0U, 1U})
            if (auto r = x86_legacy::pam_range(reg, nibble))
                must(control.set_ram_visibility(*r, RamVisibility::read_write));
}

// ---- names ----

TEST_CASE("each RAM range has its own name: 'ram', then 'ram-<i>' in ascending GPA order")
{
    // Two backings (two NUMA nodes), ranges interleaved and listed out of order.
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(6 * MiB, 8 * MiB), range(0, 2 * MiB)}))
                         .add_backing(ram({range(2 * MiB, 3 * MiB), range(4 * MiB, 6 * MiB)}))
                         .build(Length{8 * MiB}));
    const MemoryMap map = m.memory_map();
    const std::vector<std::pair<std::string, MemoryRange>> want = {
        {"ram", range(0, 2 * MiB)},
        {"ram-1", range(2 * MiB, 3 * MiB)},
        {"ram-2", range(4 * MiB, 6 * MiB)},
        {"ram-3", range(6 * MiB, 8 * MiB)}};
    for (const auto& entry : want) { // not a structured binding: clang 14 cannot capture one
        const MemoryMap::Region* found = map.find_region(entry.first);
        REQUIRE_MESSAGE(found != nullptr, entry.first);
        CHECK(found->range == entry.second);
    }
    // No two regions share a name.
    for (std::size_t i = 0; i < map.regions.size(); ++i)
        for (std::size_t j = i + 1; j < map.regions.size(); ++j)
            CHECK(map.regions[i].name != map.regions[j].name);
}

TEST_CASE("with x86 legacy support, RAM above 1 MiB is 'ram' and the next range 'ram-1'")
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(ram({range(0, 3 * MiB), range(4 * MiB, 6 * MiB)}))
                         .build(Length{8 * MiB}));
    const MemoryMap map = m.memory_map();
    REQUIRE(map.find_region("ram") != nullptr);
    CHECK(map.find_region("ram")->range == range(x86_legacy::end, 3 * MiB));
    REQUIRE(map.find_region("ram-1") != nullptr);
    CHECK(map.find_region("ram-1")->range == range(4 * MiB, 6 * MiB));
}

// ---- canonical layout and restore ----

TEST_CASE("a backing's ranges are laid out in ascending GPA order, whatever the listed order")
{
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(0x40000, 0x41000), range(0x10000, 0x12000)}))
                         .build(Length{0x100000}));
    const MemoryMap map = m.memory_map();
    CHECK(map.region_at(Gpa{0x10000})->mappings.at(0).file_offset == 0);
    CHECK(map.region_at(Gpa{0x40000})->mappings.at(0).file_offset == 0x2000);
    const auto backing = m.shared_memory_backing();
    REQUIRE(backing.has_value());
    CHECK(backing->ranges() ==
          std::vector<MemoryRange>{range(0x10000, 0x12000), range(0x40000, 0x41000)});
    CHECK(backing->offset_of(Gpa{0x40010}) == std::optional<Offset>(Offset{0x2010}));
    CHECK(backing->offset_of(Gpa{0x11fff}) == std::optional<Offset>(Offset{0x1fff}));
    CHECK_FALSE(backing->offset_of(Gpa{0x12000}).has_value());
}

namespace {

constexpr std::array<std::uint64_t, 8> numa_pages = {0, 1, 2, 3, 4, 5, 8, 9};

/// Two backings (two NUMA nodes), two ranges each; every page holds its own GPA.
Manager numa_guest()
{
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(0, 2 * pg), range(4 * pg, 6 * pg)}))
                         .add_backing(ram({range(2 * pg, 4 * pg), range(8 * pg, 10 * pg)}))
                         .build(Length{16 * pg}));
    auto mem = m.guest_memory();
    for (const std::uint64_t p : numa_pages)
        REQUIRE(mem.write_plain<std::uint64_t>(Gpa{p * pg}, p * pg + 1).has_value());
    return m;
}

void check_numa_contents(const Manager& m)
{
    auto mem = m.guest_memory();
    for (const std::uint64_t p : numa_pages)
        CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{p * pg})) == p * pg + 1);
}

} // namespace

TEST_CASE("restore from several backings, the ranges listed in another order: the same memory")
{
    std::vector<SharedMemoryBacking> backings;
    {
        Manager first = numa_guest();
        backings = must(first.shared_memory_backings());
    }
    REQUIRE(backings.size() == 2);
    CHECK(backings[0].ranges() ==
          std::vector<MemoryRange>{range(0, 2 * pg), range(4 * pg, 6 * pg)});
    CHECK(backings[1].ranges() ==
          std::vector<MemoryRange>{range(2 * pg, 4 * pg), range(8 * pg, 10 * pg)});
    // Each backing's ranges reversed, one of them split in two: the same layout.
    Manager second = must(
        Manager::builder()
            .add_backing(ram({range(4 * pg, 6 * pg), range(pg, 2 * pg), range(0, pg)})
                             .existing_mappable(backings[0]))
            .add_backing(
                ram({range(8 * pg, 10 * pg), range(2 * pg, 4 * pg)}).existing_mappable(backings[1]))
            .build(Length{16 * pg}));
    check_numa_contents(second);
    // Also with the plain object (no check), since the layout is canonical.
    Manager third = must(Manager::builder()
                             .add_backing(ram({range(4 * pg, 6 * pg), range(0, 2 * pg)})
                                              .existing_mappable(backings[0].mappable()))
                             .add_backing(ram({range(8 * pg, 10 * pg), range(2 * pg, 4 * pg)})
                                              .existing_mappable(backings[1].mappable()))
                             .build(Length{16 * pg}));
    check_numa_contents(third);
}

TEST_CASE("restore with other ranges than the backing holds is refused, naming both layouts")
{
    std::vector<SharedMemoryBacking> backings;
    {
        Manager first = numa_guest();
        backings = must(first.shared_memory_backings());
    }
    // The backings swapped between the two requests.
    auto swapped =
        Manager::builder()
            .add_backing(
                ram({range(0, 2 * pg), range(4 * pg, 6 * pg)}).existing_mappable(backings[1]))
            .add_backing(
                ram({range(2 * pg, 4 * pg), range(8 * pg, 10 * pg)}).existing_mappable(backings[0]))
            .build(Length{16 * pg});
    REQUIRE_FALSE(swapped.has_value());
    CHECK(swapped.error().code() == build_errc::restore_layout_mismatch);
    CHECK(swapped.error().message() ==
          "backing 0: RAM ranges [0x0-0x2000, 0x4000-0x6000] do not match the restored "
          "backing's [0x2000-0x4000, 0x8000-0xa000]");
    // A range missing.
    auto shorter = Manager::builder()
                       .add_backing(ram({range(0, 2 * pg)}).existing_mappable(backings[0]))
                       .build(Length{16 * pg});
    REQUIRE_FALSE(shorter.has_value());
    CHECK(shorter.error().code() == build_errc::restore_layout_mismatch);
}

TEST_CASE("shared_memory_backings: private memory cannot be shared")
{
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(0, 2 * pg)}))
                         .add_backing(ram({range(2 * pg, 4 * pg)}).private_memory(true))
                         .build(Length{4 * pg}));
    auto backings = m.shared_memory_backings();
    REQUIRE_FALSE(backings.has_value());
    CHECK(backings.error().code() == errc::unsupported);
    CHECK(backings.error().message() == "RAM backing 1 is private memory, which cannot be shared");
}

// ---- a ROM over several PAM segments ----

namespace {

/// A 64 KiB ROM image whose 16 KiB quarters start with 'A', 'B', 'C', 'D'.
Mappable rom_image()
{
    Mappable rom = test::make_memfd(0x10000);
    for (std::uint64_t q = 0; q < 4; ++q) {
        const char c = static_cast<char>('A' + q);
        REQUIRE(::pwrite(rom.native_handle(), &c, 1, static_cast<off_t>(q * 0x4000)) == 1);
    }
    return rom;
}

Manager pc_guest()
{
    return must(Manager::builder()
                    .x86_legacy_support(true)
                    .add_backing(ram({range(0, 4 * MiB)}))
                    .build(Length{16 * MiB}));
}

} // namespace

TEST_CASE("a 64 KiB ROM under four PAM segments: one region is refused, place_split works")
{
    Manager m = pc_guest();
    auto p = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, p));
    const Mappable rom = rom_image();
    const Gpa at{x86_legacy::pam_segments[2].start()}; // 0xc8000..0xd8000: segments 2 to 5

    // One device region across four RAM regions breaks the nested priority rule.
    auto whole = must(m.device_memory_mapper().new_region("rom", Length{0x10000}));
    must(whole.map({.offset = Offset{0},
                    .length = Length{0x10000},
                    .object = rom,
                    .object_offset = Offset{0}}));
    auto refused = whole.map_to_guest(at, Protection::read_only);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().full_message().find("overlaps with existing region 'ram-pam-0xc8000'") !=
          std::string::npos);

    auto pieces = must(m.device_memory_mapper().place_split({.name = "rom",
                                                             .gpa = at,
                                                             .length = Length{0x10000},
                                                             .object = rom,
                                                             .object_offset = Offset{0}}));
    REQUIRE(pieces.size() == 4);
    for (std::size_t i = 0; i < 4; ++i) {
        CHECK(pieces[i].placement() == x86_legacy::pam_segments[2 + i]);
        CHECK(pieces[i].name() ==
              "rom@" + MemoryRange::hex(x86_legacy::pam_segments[2 + i].start()));
    }
    // RAM hides it until the PAM segments let go; then each quarter shows at its own segment.
    auto mem = m.guest_memory();
    auto control = m.ram_visibility_control();
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(at)) == 0);
    for (std::size_t i = 2; i < 6; ++i)
        must(control.set_ram_visibility(x86_legacy::pam_segments[i], RamVisibility::unmapped));
    for (std::uint64_t q = 0; q < 4; ++q) {
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(at + Length{q * 0x4000})) ==
              static_cast<std::uint8_t>('A' + q));
        const auto window = p->lookup(at.value() + q * 0x4000);
        REQUIRE(window.has_value());
        CHECK(window->size == 0x4000);
        CHECK_FALSE(window->writable);
    }
    // Only one segment back to RAM: the others still show the ROM.
    must(control.set_ram_visibility(x86_legacy::pam_segments[3], RamVisibility::read_write));
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(at + Length{0x4000})) == 0);
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(at + Length{0x8000})) == 'C');
    // Dropping the handles takes the ROM out.
    pieces.clear();
    CHECK(test::error_of(mem.read_plain<std::uint8_t>(at)) == errc::unmapped);
}

TEST_CASE("place_split is all or nothing, and a piece outside RAM is one region")
{
    Manager m = pc_guest();
    const Mappable rom = rom_image();
    // Something at device priority with another range where the fourth piece would go.
    auto blocker = must(m.device_memory_mapper().new_region("blocker", Length{0x2000}));
    must(blocker.map_to_guest(Gpa{0xd4000}, Protection::read_only));
    auto failed = m.device_memory_mapper().place_split({.name = "rom",
                                                        .gpa = Gpa{0xc8000},
                                                        .length = Length{0x10000},
                                                        .object = rom,
                                                        .object_offset = Offset{0}});
    REQUIRE_FALSE(failed.has_value());
    CHECK(failed.error().message().find("device placement 'rom'") != std::string::npos);
    const MemoryMap map = m.memory_map();
    for (const auto& r : map.regions)
        CHECK(r.name.rfind("rom@", 0) == std::string::npos);

    // Across the end of RAM (4 MiB): the piece above RAM is not cut further.
    auto pieces =
        must(m.device_memory_mapper().place_split({.name = "high",
                                                   .gpa = Gpa{4 * MiB - 0x4000},
                                                   .length = Length{0x10000},
                                                   .object = rom,
                                                   .object_offset = Offset{0},
                                                   .protection = Protection::read_write}));
    REQUIRE(pieces.size() == 2);
    CHECK(pieces[1].placement() == range(4 * MiB, 4 * MiB + 0xc000));
    auto mem = m.guest_memory();
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{4 * MiB})) == 'B');
    CHECK(mem.write_plain<std::uint8_t>(Gpa{4 * MiB + 0x4000}, 'x').has_value());
}

// ---- write-only RAM (i440FX PAM WE=1, RE=0) ----

static_assert(x86_legacy::pam_visibility(0) == RamVisibility::unmapped);
static_assert(x86_legacy::pam_visibility(1) == RamVisibility::read_only);  // RE
static_assert(x86_legacy::pam_visibility(2) == RamVisibility::write_only); // WE
static_assert(x86_legacy::pam_visibility(3) == RamVisibility::read_write);
static_assert(x86_legacy::pam_visibility(0x32) == RamVisibility::write_only); // one nibble only
static_assert(is_valid(RamVisibility::write_only));

TEST_CASE("write-only: the guest and GuestMemory read the ROM, writes exit, the VMM forwards them")
{
    Manager m = pc_guest();
    auto p = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, p));
    const Mappable rom = rom_image();
    const MemoryRange seg = x86_legacy::pam_segments[2]; // 0xc8000
    auto pieces = must(m.device_memory_mapper().place_split({.name = "rom",
                                                             .gpa = Gpa{seg.start()},
                                                             .length = Length{0x10000},
                                                             .object = rom,
                                                             .object_offset = Offset{0},
                                                             .protection = Protection::read_only}));
    auto control = m.ram_visibility_control();
    auto mem = m.guest_memory();
    must(control.set_ram_visibility(seg, x86_legacy::pam_visibility(2))); // WE=1, RE=0
    CHECK(must(control.ram_visibility(seg)) == RamVisibility::write_only);
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{seg.start()})) == 'A');
    const auto window = p->lookup(seg.start());
    REQUIRE(window.has_value());
    CHECK_FALSE(window->writable); // so a guest write exits to the VMM
    const auto refused = mem.write_plain<std::uint8_t>(Gpa{seg.start() + 0x10}, 'x');
    CHECK(test::error_of(refused) == errc::read_only);
    CHECK(refused.error().gpa == Gpa{seg.start() + 0x10});
    CHECK(refused.error().message().find("write at 0xc8010") != std::string::npos);

    // The exiting write, forwarded into the hidden shadow RAM.
    const auto target = must(control.shadow_ram_target(Gpa{seg.start() + 0x10}, Length{1}));
    const auto backing = m.shared_memory_backing();
    REQUIRE(backing.has_value());
    CHECK(target.object.identity() == backing->mappable().identity());
    CHECK(target.offset == *backing->offset_of(Gpa{seg.start() + 0x10}));
    CHECK(target.ram == seg);
    const char copied = 'S';
    REQUIRE(::pwrite(target.object.native_handle(), &copied, 1,
                     static_cast<off_t>(target.offset.value())) == 1);
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{seg.start() + 0x10})) == 0); // the ROM's

    // Only bytes inside one write-only range are forwarded.
    const auto outside = control.shadow_ram_target(Gpa{seg.end() - 1}, Length{2});
    CHECK(test::error_of(outside) == errc::not_found);
    CHECK(outside.error().full_message().find("is not inside a write-only RAM range") !=
          std::string::npos);
    CHECK(test::error_of(control.shadow_ram_target(Gpa{seg.end()}, Length{1})) ==
          errc::not_found); // segment 3 is read_write
    CHECK(test::error_of(control.shadow_ram_target(Gpa{seg.start()}, Length{0})) ==
          errc::invalid_range);

    // The memory map shows the cap on the RAM region and the ROM active below it.
    const std::string text = m.memory_map().to_text();
    CHECK(text.find("ram-pam-0xc8000 [caps below read-only]") != std::string::npos);
    CHECK(m.memory_map().to_json().find("\"name\":\"ram-pam-0xc8000\"") != std::string::npos);
    CHECK(m.memory_map().to_json().find("\"read_only_cap\":true") != std::string::npos);
    const MemoryMap map = m.memory_map();
    const MemoryMap::Region* rom_piece = map.region_at(Gpa{seg.start()});
    REQUIRE(rom_piece != nullptr);
    CHECK(rom_piece->name == "rom@0xc8000");

    // RE=1 again: the shadow RAM holds what the guest wrote.
    must(control.set_ram_visibility(seg, RamVisibility::read_only));
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{seg.start() + 0x10})) == 'S');
    CHECK(test::error_of(control.shadow_ram_target(Gpa{seg.start()}, Length{1})) ==
          errc::not_found);
    CHECK(m.memory_map().to_json().find("\"read_only_cap\":true") == std::string::npos);
}

TEST_CASE("write-only with nothing below: no memory for the guest or the VMM")
{
    Manager m = pc_guest();
    auto p = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, p));
    const MemoryRange seg = x86_legacy::pam_segments[4];
    auto control = m.ram_visibility_control();
    auto mem = m.guest_memory();
    REQUIRE(mem.write_plain<std::uint8_t>(Gpa{seg.start()}, 'R').has_value());
    must(control.set_ram_visibility(seg, RamVisibility::write_only));
    CHECK_FALSE(p->lookup(seg.start()).has_value()); // reads and writes exit (open bus)
    CHECK(test::error_of(mem.read_plain<std::uint8_t>(Gpa{seg.start()})) == errc::unmapped);
    CHECK(test::error_of(mem.write_plain<std::uint8_t>(Gpa{seg.start()}, 'x')) == errc::unmapped);
    const auto target = must(control.shadow_ram_target(Gpa{seg.start()}, Length{1}));
    const char forwarded = 'W';
    REQUIRE(::pwrite(target.object.native_handle(), &forwarded, 1,
                     static_cast<off_t>(target.offset.value())) == 1);
    must(control.set_ram_visibility(seg, RamVisibility::read_write));
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{seg.start()})) == 'W');
}
