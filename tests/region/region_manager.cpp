// Region manager behaviour: the applicable tests of the reference's region_manager.rs (§11), one
// test per rule of the priority semantics, and one per reference quirk that we fix (§12).
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>

#include "recording_sink.hpp"
#include "test_support.hpp"

#include <functional>
#include <map>
#include <string>
#include <vector>

using namespace membacking;
using membacking::test::range;
using membacking::test::RecordingSink;
using Log = std::vector<std::string>;
using Pages = std::map<std::uint64_t, RecordingSink::Page>;

namespace {

constexpr MapParams rw{true, true, false};
constexpr MapParams ro{false, true, false};

struct Fixture {
    RecordingSink sink;
    RegionManager<NestedPriority, RecordingSink> rm{sink};
    Mappable fd = test::make_memfd(0x100000);

    RegionId add(const std::string& name, std::uint64_t start, std::uint64_t end, std::uint8_t prio,
                 MappingType type = MappingType::Device)
    {
        auto id = rm.add_region(name, range(start, end), prio, type);
        REQUIRE_MESSAGE(id.has_value(), (id ? "" : id.error().full_message()));
        return *id;
    }

    /// A region with one file mapping over its whole range, mapped rw.
    RegionId add_mapped(const std::string& name, std::uint64_t start, std::uint64_t end,
                        std::uint8_t prio)
    {
        const RegionId id = add(name, start, end, prio);
        REQUIRE(rm.add_mapping(id, file_mapping(0, end - start)).has_value());
        REQUIRE(rm.map_region(id, rw).has_value());
        return id;
    }

    RegionMapping file_mapping(std::uint64_t off, std::uint64_t end, std::uint64_t file_off = 0,
                               bool writable = true)
    {
        return RegionMapping{
            range(off, end), MappingBacking::file(fd, Offset{file_off}), writable, {}};
    }

    bool active(RegionId id) const { return rm.find(id)->active(); }
};

} // namespace

TEST_CASE("reference test_region_overlap: the containment rules, step by step")
{
    Fixture f;
    const RegionId high = f.add("high", 0x1000, 0x3000, 1);
    REQUIRE(f.rm.map_region(high, rw).has_value());

    auto partial_low = f.rm.add_region("p0", range(0x2000, 0x4000), 0, MappingType::Device);
    REQUIRE_FALSE(partial_low);
    CHECK(membacking::test::error_of(partial_low) == errc::overlap);
    CHECK(
        partial_low.error().message() ==
        "memory region 'p0' (0x2000-0x4000) overlaps with existing region 'high' (0x1000-0x3000)");

    const RegionId low = f.add("low", 0x1000, 0x3000, 0); // shadowed by high
    CHECK_FALSE(f.active(low));
    REQUIRE(f.rm.map_region(low, rw).has_value());
    CHECK_FALSE(f.active(low));
    REQUIRE(f.rm.remove_region(high).has_value());
    CHECK(f.active(low));

    CHECK_FALSE(f.rm.add_region("p1", range(0x2000, 0x4000), 1, MappingType::Device));
    CHECK_FALSE(f.rm.add_region("p1", range(0x2000, 0x3000), 1, MappingType::Device));
    const RegionId big = f.add("big", 0x0, 0x10000, 1);
    REQUIRE(f.rm.map_region(big, rw).has_value());
    CHECK(f.active(big));
    CHECK_FALSE(f.active(low)); // disabled by the bigger, higher region
    REQUIRE(f.rm.remove_region(low).has_value());
    CHECK_FALSE(f.rm.add_region("p0", range(0x0, 0x20000), 0, MappingType::Device));
    CHECK(f.rm.add_region("p0", range(0x1000, 0x8000), 0, MappingType::Device).has_value());
}

TEST_CASE("an empty region is rejected (the reference creates one for RAM ending at 1 MiB)")
{
    Fixture f;
    auto r = f.rm.add_region("empty", range(0x100000, 0x100000), 255, MappingType::Ram);
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::invalid_range);
    CHECK(f.rm.regions().empty());
}

TEST_CASE("the highest-priority mapped region is active; equal priorities go to the earliest")
{
    Fixture f;
    const RegionId first = f.add_mapped("first", 0x0, 0x4000, 5);
    const RegionId second = f.add_mapped("second", 0x0, 0x4000, 5);
    const RegionId lower = f.add_mapped("lower", 0x1000, 0x2000, 3);
    CHECK(f.active(first));
    CHECK_FALSE(f.active(second));
    CHECK_FALSE(f.active(lower));
    REQUIRE(f.sink.page(0x1000).has_value());
    CHECK(f.sink.page(0x1000)->region == first);

    // Mapping a higher one on top takes over the whole range.
    const RegionId top = f.add_mapped("top", 0x0, 0x4000, 9);
    CHECK(f.active(top));
    CHECK_FALSE(f.active(first));
    CHECK(f.sink.page(0x1000)->region == top);
}

TEST_CASE("mapping under an active higher-priority region only records the params")
{
    Fixture f;
    f.add_mapped("ram", 0x0, 0x10000, 255);
    const RegionId dev = f.add("dev", 0x4000, 0x8000, 0);
    REQUIRE(f.rm.add_mapping(dev, f.file_mapping(0, 0x4000)).has_value());
    f.sink.clear_log();
    REQUIRE(f.rm.map_region(dev, rw).has_value());
    CHECK(f.sink.log().empty());
    CHECK(f.rm.find(dev)->mapped());
    CHECK_FALSE(f.active(dev));
}

TEST_CASE("unmapping the active region makes the best mapped lower regions reappear, by start")
{
    Fixture f;
    const RegionId ram = f.add_mapped("ram", 0x0, 0x10000, 255);
    // Registered out of address order on purpose.
    const RegionId c = f.add_mapped("c", 0x8000, 0xa000, 0);
    const RegionId a = f.add_mapped("a", 0x1000, 0x2000, 0);
    const RegionId mid = f.add_mapped("mid", 0x4000, 0x6000, 100);
    const RegionId b_under_mid = f.add_mapped("b", 0x4000, 0x5000, 0);
    f.sink.clear_log();

    REQUIRE(f.rm.unmap_region(ram).has_value());
    // Make-before-break: the regions below replace RAM in place; only the GPAs that nothing maps
    // afterwards are removed, before the partitions get the new windows.
    CHECK(f.sink.log() == Log{"part- 0x0-0x10000", "va+ 0x1000-0x2000 rw", "va+ 0x4000-0x6000 rw",
                              "va+ 0x8000-0xa000 rw", "va- 0x0-0x1000", "va- 0x2000-0x4000",
                              "va- 0x6000-0x8000", "va- 0xa000-0x10000", "part+ 0x1000-0x2000 rw",
                              "part+ 0x4000-0x6000 rw", "part+ 0x8000-0xa000 rw"});
    CHECK(f.active(a));
    CHECK(f.active(mid));
    CHECK(f.active(c));
    CHECK_FALSE(f.active(b_under_mid)); // still under "mid"

    // Map RAM back: the partitions drop everything under it, then RAM replaces it in place.
    f.sink.clear_log();
    REQUIRE(f.rm.map_region(ram, rw).has_value());
    CHECK(f.sink.log() == Log{"part- 0x1000-0x2000", "part- 0x4000-0x6000", "part- 0x8000-0xa000",
                              "va+ 0x0-0x10000 rw", "part+ 0x0-0x10000 rw"});
    CHECK(f.active(ram));
}

TEST_CASE("removing the active region lets lower ones reappear")
{
    Fixture f;
    const RegionId ram = f.add_mapped("ram", 0x0, 0x10000, 255);
    const RegionId dev = f.add_mapped("dev", 0x2000, 0x3000, 0);
    REQUIRE(f.rm.remove_region(ram).has_value());
    CHECK(f.rm.find(ram) == nullptr);
    CHECK(f.active(dev));
    CHECK(f.sink.partition.windows().size() == 1);
    CHECK(f.sink.partition.lookup(0x2000).has_value());
    CHECK_FALSE(f.sink.partition.lookup(0x0).has_value());
}

TEST_CASE("re-mapping: same params is a no-op, different params change permissions in place")
{
    Fixture f;
    const RegionId r = f.add_mapped("r", 0x0, 0x2000, 10);
    f.sink.clear_log();
    REQUIRE(f.rm.map_region(r, rw).has_value());
    CHECK(f.sink.log().empty());

    // Stricter: partitions first (KVM re-creates the slot), then the VA in place (no unmap).
    REQUIRE(f.rm.map_region(r, ro).has_value());
    CHECK(f.sink.log() == Log{"part- 0x0-0x2000", "part+ 0x0-0x2000 ro", "va+ 0x0-0x2000 ro"});
    CHECK(f.rm.find(r)->map_params == ro);
    CHECK_FALSE(f.sink.page(0x0)->writable);
    CHECK_FALSE(f.sink.partition.lookup(0x0)->writable);

    // More permissive: the VA first, partitions last.
    f.sink.clear_log();
    REQUIRE(f.rm.map_region(r, rw).has_value());
    CHECK(f.sink.log() == Log{"va+ 0x0-0x2000 rw", "part- 0x0-0x2000", "part+ 0x0-0x2000 rw"});

    // Only prefetch differs: nothing a partition or VA mapper holds changes.
    f.sink.clear_log();
    REQUIRE(f.rm.map_region(r, {true, true, true}).has_value());
    CHECK(f.sink.log().empty());
    CHECK(f.rm.find(r)->map_params->prefetch);
}

TEST_CASE("mappings: file-backed and private, added live, removed by range")
{
    Fixture f;
    const RegionId r = f.add("r", 0x10000, 0x20000, 10, MappingType::Ram);
    REQUIRE(f.rm.map_region(r, rw).has_value());
    f.sink.clear_log();
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x1000, 0x3000, 0x5000)).has_value());
    REQUIRE(
        f.rm.add_mapping(
                r, RegionMapping{range(0x8000, 0xa000), MappingBacking::private_memory(), true, {}})
            .has_value());
    // Partitions are not told: they already map the whole region's VA.
    CHECK(f.sink.log() == Log{"va+ 0x11000-0x13000 rw", "va+ 0x18000-0x1a000 rw"});
    REQUIRE(f.sink.page(0x12000).has_value());
    CHECK(f.sink.page(0x12000)->object == f.fd.identity());
    CHECK(f.sink.page(0x12000)->file_offset == 0x6000);
    CHECK(f.sink.page(0x18000)->object == 0);

    f.sink.clear_log();
    REQUIRE(f.rm.remove_mappings(r, range(0x0, 0x4000)).has_value());
    CHECK(f.sink.log() == Log{"va- 0x11000-0x13000"});
    CHECK_FALSE(f.sink.page(0x12000).has_value());
    CHECK(f.rm.find(r)->mappings.size() == 1);
}

TEST_CASE("mapping offsets are validated against the region when added (the reference does not)")
{
    Fixture f;
    const RegionId r = f.add("small", 0x10000, 0x12000, 10); // unmapped: still validated
    auto past_end = f.rm.add_mapping(r, f.file_mapping(0x1000, 0x3000));
    REQUIRE_FALSE(past_end);
    CHECK(membacking::test::error_of(past_end) == errc::out_of_range);
    CHECK(past_end.error().message() == "mapping range 0x1000-0x3000 does not fit in region "
                                        "'small' (0x10000-0x12000) of size 0x2000");
    CHECK(f.rm.find(r)->mappings.empty());

    auto unknown = f.rm.add_mapping(RegionId{999}, f.file_mapping(0, 0x1000));
    REQUIRE_FALSE(unknown);
    CHECK(membacking::test::error_of(unknown) == errc::not_found);
}

TEST_CASE("effective writability is mapping AND region, for VA mappers and partitions alike")
{
    Fixture f;
    const RegionId r = f.add("r", 0x0, 0x4000, 10);
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x0, 0x2000, 0, true)).has_value());
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x2000, 0x4000, 0x2000, false)).has_value());
    REQUIRE(f.rm.map_region(r, rw).has_value());
    CHECK(f.sink.page(0x0)->writable);
    CHECK_FALSE(f.sink.page(0x2000)->writable);
    // Quirk fix: the reference maps the partition writable here because the region is writable,
    // although part of it is read-only in the VA; a guest write there would fault in the host.
    CHECK_FALSE(f.sink.partition.lookup(0x0)->writable);

    // Removing the read-only mapping relaxes the partition, after the VA change.
    f.sink.clear_log();
    REQUIRE(f.rm.remove_mappings(r, range(0x2000, 0x4000)).has_value());
    CHECK(f.sink.log() == Log{"va- 0x2000-0x4000", "part- 0x0-0x4000", "part+ 0x0-0x4000 rw"});
    CHECK(f.sink.partition.lookup(0x0)->writable);

    // Adding a read-only mapping makes the partition stricter first, then changes the VA.
    f.sink.clear_log();
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x3000, 0x4000, 0, false)).has_value());
    CHECK(f.sink.log() == Log{"part- 0x0-0x4000", "part+ 0x0-0x4000 ro", "va+ 0x3000-0x4000 ro"});

    // A read-only region makes every mapping read-only.
    REQUIRE(f.rm.map_region(r, ro).has_value());
    CHECK_FALSE(f.sink.page(0x0)->writable);
}

TEST_CASE("overlapping mappings are an atomic replacement that splits the old ones")
{
    Fixture f;
    const RegionId r = f.add("dax", 0x100000, 0x110000, 0);
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x0, 0x8000, 0x40000)).has_value());
    REQUIRE(f.rm.map_region(r, rw).has_value());
    Mappable other = test::make_memfd(0x10000);
    f.sink.clear_log();

    // Replace the middle: one VA event, no unmap window in between.
    REQUIRE(f.rm.add_mapping(r, RegionMapping{range(0x2000, 0x4000),
                                              MappingBacking::file(other, Offset{0x1000}),
                                              true,
                                              {}})
                .has_value());
    CHECK(f.sink.log() == Log{"va+ 0x102000-0x104000 rw"});
    const auto& maps = f.rm.find(r)->mappings;
    REQUIRE(maps.size() == 3);
    CHECK(maps.at(0x0).range == range(0x0, 0x2000));
    CHECK(maps.at(0x0).backing.file_offset == 0x40000);
    CHECK(maps.at(0x2000).backing.object == other);
    CHECK(maps.at(0x4000).range == range(0x4000, 0x8000));
    CHECK(maps.at(0x4000).backing.file_offset == 0x44000); // the kept tail keeps its offset
    CHECK(f.sink.page(0x101000)->object == f.fd.identity());
    CHECK(f.sink.page(0x103000)->object == other.identity());
    CHECK(f.sink.page(0x103000)->file_offset == 0x2000);
    CHECK(f.sink.page(0x105000)->file_offset == 0x45000);

    // remove_mappings over a partial overlap splits too (the reference panics).
    REQUIRE(f.rm.remove_mappings(r, range(0x3000, 0x5000)).has_value());
    CHECK(f.rm.find(r)->mappings.size() == 3);
    CHECK_FALSE(f.sink.page(0x103000).has_value());
    CHECK_FALSE(f.sink.page(0x104000).has_value());
    CHECK(f.sink.page(0x105000)->file_offset == 0x45000);
}

TEST_CASE("event ordering: VA before partitions when enabling, partitions first when disabling")
{
    Fixture f;
    const RegionId r = f.add("r", 0x0, 0x4000, 10);
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x0, 0x1000)).has_value());
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x2000, 0x3000)).has_value());
    REQUIRE(f.rm.map_region(r, rw).has_value());
    CHECK(f.sink.log() == Log{"va+ 0x0-0x1000 rw", "va+ 0x2000-0x3000 rw", "part+ 0x0-0x4000 rw"});
    f.sink.clear_log();
    REQUIRE(f.rm.unmap_region(r).has_value());
    CHECK(f.sink.log() == Log{"part- 0x0-0x4000", "va- 0x0-0x4000"});
}

TEST_CASE("enable rollback: each mapping that got in is taken out exactly once (reference 11/12)")
{
    Fixture f;
    const RegionId r = f.add("r", 0x0, 0x18000, 10);
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x0, 0x4000)).has_value());
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x4000, 0x8000)).has_value());
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x8000, 0xc000)).has_value());
    f.sink.fail_call(3);
    auto res = f.rm.map_region(r, rw);
    REQUIRE_FALSE(res);
    CHECK(membacking::test::error_of(res) == errc::resource_exhausted);
    CHECK(res.error().full_message() ==
          "failed to map region 'r' (0x0-0x18000): failed to map 0x8000-0xc000 of region "
          "'r' (0x0-0x18000): injected sink failure");
    CHECK(f.sink.log() == Log{"va+ 0x0-0x4000 rw", "va+ 0x4000-0x8000 rw",
                              "va+ 0x8000-0xc000 rw [injected failure]", "va- 0x4000-0x8000",
                              "va- 0x0-0x4000"});
    CHECK_FALSE(f.active(r));
    CHECK(f.sink.pages().empty());
    CHECK(f.sink.partition.windows().empty());
}

TEST_CASE("quirk fix: a failed map leaves the region unmapped, so a retry really retries")
{
    Fixture f;
    const RegionId r = f.add("r", 0x0, 0x2000, 10);
    REQUIRE(f.rm.add_mapping(r, f.file_mapping(0x0, 0x2000)).has_value());
    f.sink.fail_call(2); // the partition map
    REQUIRE_FALSE(f.rm.map_region(r, rw));
    CHECK_FALSE(f.rm.find(r)->mapped());
    CHECK_FALSE(f.active(r));
    CHECK(f.sink.pages().empty());
    // In the reference the same call is now a silent no-op; here it maps.
    REQUIRE(f.rm.map_region(r, rw).has_value());
    CHECK(f.active(r));
    CHECK(f.sink.partition.lookup(0x1000).has_value());
}

TEST_CASE("quirk fix: a partition failure while re-enabling lower regions is an error, not a panic")
{
    Fixture f;
    const RegionId ram = f.add_mapped("ram", 0x0, 0x10000, 255);
    const RegionId dev = f.add_mapped("dev", 0x4000, 0x8000, 0);
    f.sink.clear_log();
    f.sink.fail_call(5); // part-, va+ dev, va- below it, va- above it, part+ dev <- fails
    auto res = f.rm.unmap_region(ram);
    REQUIRE_FALSE(res);
    CHECK(membacking::test::error_of(res) == errc::resource_exhausted);
    CHECK(f.sink.log().at(4) == "part+ 0x4000-0x8000 rw [injected failure]");
    // Everything is as before: RAM still mapped and visible, the device still shadowed.
    CHECK(f.rm.find(ram)->mapped());
    CHECK(f.active(ram));
    CHECK_FALSE(f.active(dev));
    CHECK(f.sink.page(0x5000)->region == ram);
    CHECK(f.sink.partition.windows().size() == 1);
    CHECK(f.sink.partition.lookup(0x5000)->gpa == 0x0);
}

TEST_CASE("quirk fix: private memory is never discarded as a side effect")
{
    Fixture f;
    const RegionId ram = f.add("ram", 0x0, 0x4000, 100, MappingType::Ram);
    REQUIRE(
        f.rm.add_mapping(
                ram, RegionMapping{range(0, 0x4000), MappingBacking::private_memory(), true, {}})
            .has_value());
    REQUIRE(f.rm.map_region(ram, rw).has_value());

    // A higher region over it would transiently disable it (the reference asserts).
    const RegionId over = f.add("over", 0x0, 0x4000, 200);
    auto res = f.rm.map_region(over, rw);
    REQUIRE_FALSE(res);
    CHECK(membacking::test::error_of(res) == errc::conflict);
    CHECK(f.active(ram));
    CHECK_FALSE(f.rm.find(over)->mapped());

    // Unmapping it would too. Changing its permissions does not: that happens in place.
    CHECK(membacking::test::error_of(f.rm.unmap_region(ram)) == errc::conflict);
    REQUIRE(f.rm.map_region(ram, ro).has_value());
    CHECK_FALSE(f.sink.page(0x0)->writable);
    CHECK(f.sink.page(0x0)->object == 0); // still the private memory
    REQUIRE(f.rm.map_region(ram, rw).has_value());
    // Replacing it inside the visible region would lose it.
    CHECK(membacking::test::error_of(f.rm.add_mapping(ram, f.file_mapping(0x1000, 0x2000))) ==
          errc::conflict);
    // A read-only private mapping makes no sense, and private memory cannot share a region with
    // read-only mappings (the partition permissions could not be rolled back exactly).
    CHECK(f.rm.add_mapping(
                  ram, RegionMapping{range(0, 0x1000), MappingBacking::private_memory(), false, {}})
              .error()
              .code() == errc::invalid_argument);

    // Removing the region is the one way to discard it.
    REQUIRE(f.rm.remove_region(ram).has_value());
    CHECK(f.sink.pages().empty());
}

TEST_CASE("unknown region ids are errors, not panics")
{
    Fixture f;
    CHECK(membacking::test::error_of(f.rm.map_region(RegionId{42}, rw)) == errc::not_found);
    CHECK(membacking::test::error_of(f.rm.unmap_region(RegionId{42})) == errc::not_found);
    CHECK(membacking::test::error_of(f.rm.remove_region(RegionId{42})) == errc::not_found);
    CHECK(membacking::test::error_of(f.rm.remove_mappings(RegionId{42}, range(0, 0x1000))) ==
          errc::not_found);
}

TEST_CASE("active_mappings and active_regions describe the live state for replay")
{
    Fixture f;
    f.add_mapped("ram", 0x0, 0x10000, 255);
    const RegionId dev = f.add_mapped("dev", 0x20000, 0x22000, 0);
    REQUIRE(f.rm.map_region(dev, ro).has_value());
    const auto maps = f.rm.active_mappings();
    REQUIRE(maps.size() == 2);
    CHECK(maps[0].gpa == range(0x0, 0x10000));
    CHECK(maps[1].gpa == range(0x20000, 0x22000));
    CHECK_FALSE(maps[1].writable);
    const auto regions = f.rm.active_regions();
    REQUIRE(regions.size() == 2);
    CHECK(regions[1].region == dev);
    CHECK_FALSE(regions[1].params.writable);
}

namespace {

/// The pages that the sink removed although both `a` and `b` map them: the holes that
/// make-before-break rules out.
std::vector<std::uint64_t> holes(const RecordingSink& sink, const Pages& a, const Pages& b)
{
    std::vector<std::uint64_t> out;
    for (const MemoryRange& r : sink.removals())
        for (const std::uint64_t gpa : membacking::test::pages_of(r))
            if (a.contains(gpa) && b.contains(gpa))
                out.push_back(gpa);
    return out;
}

} // namespace

TEST_CASE("make-before-break: a GPA that both states map is replaced in place, never removed, "
          "nor by a rollback (issue 10, defect 3)")
{
    Fixture f;
    // PAM over a ROM: a RAM segment (priority 1) over a ROM (0) on the same range.
    const RegionId rom = f.add_mapped("rom", 0xc0000, 0xc4000, 0);
    const RegionId pam = f.add("pam", 0xc0000, 0xc4000, 1, MappingType::Ram);
    REQUIRE(f.rm.add_mapping(pam, f.file_mapping(0x0, 0x4000, 0x10000)).has_value());
    // A higher region over a lower one inside it, with a hole in its own mappings.
    const RegionId high = f.add("high", 0x100000, 0x110000, 1);
    REQUIRE(f.rm.add_mapping(high, f.file_mapping(0x0, 0x6000, 0x20000)).has_value());
    REQUIRE(f.rm.add_mapping(high, f.file_mapping(0x8000, 0x10000, 0x30000)).has_value());
    const RegionId low = f.add_mapped("low", 0x104000, 0x10c000, 0);

    struct Step {
        const char* what;
        std::function<Result<void>()> setup; ///< the state the change starts from, if any
        std::function<Result<void>()> change;
        std::function<Result<void>()> back;
        Log log; ///< the events of the change
    };
    const std::vector<Step> steps = {
        {"PAM toggled over the ROM",
         nullptr,
         [&] { return f.rm.map_region(pam, rw); },
         [&] { return f.rm.unmap_region(pam); },
         {"part- 0xc0000-0xc4000", "va+ 0xc0000-0xc4000 rw", "part+ 0xc0000-0xc4000 rw"}},
        {"PAM unmapped from over the ROM",
         [&] { return f.rm.map_region(pam, rw); },
         [&] { return f.rm.unmap_region(pam); },
         [&] { return f.rm.map_region(pam, rw); },
         {"part- 0xc0000-0xc4000", "va+ 0xc0000-0xc4000 rw", "part+ 0xc0000-0xc4000 rw"}},
        {"a higher region mapped over a lower one",
         nullptr,
         [&] { return f.rm.map_region(high, rw); },
         [&] { return f.rm.unmap_region(high); },
         {"part- 0x104000-0x10c000", "va+ 0x100000-0x106000 rw", "va+ 0x108000-0x110000 rw",
          "va- 0x106000-0x108000", "part+ 0x100000-0x110000 rw"}},
        {"a higher region unmapped over a lower one",
         [&] { return f.rm.map_region(high, rw); },
         [&] { return f.rm.unmap_region(high); },
         [&] { return f.rm.map_region(high, rw); },
         {"part- 0x100000-0x110000", "va+ 0x104000-0x10c000 rw", "va- 0x100000-0x104000",
          "va- 0x10c000-0x110000", "part+ 0x104000-0x10c000 rw"}},
    };
    std::size_t failure_points = 0;
    for (const Step& step : steps) {
        CAPTURE(step.what);
        if (step.setup)
            REQUIRE(step.setup().has_value());
        const Pages before = f.sink.pages();
        const auto windows = f.sink.partition.windows().size();
        f.sink.clear_log();
        REQUIRE(step.change().has_value());
        CHECK(f.sink.log() == step.log);
        const Pages after = f.sink.pages();
        CHECK(holes(f.sink, before, after).empty());
        REQUIRE(step.back().has_value());
        REQUIRE(f.sink.pages() == before);

        // Every sink call of the change fails in turn: all is as before, and the rollback put
        // the old memory back in place without a hole either.
        for (std::size_t n = 1;; ++n) {
            CAPTURE(n);
            f.sink.clear_log();
            f.sink.fail_call(n);
            if (step.change().has_value()) {
                f.sink.clear_failure();
                REQUIRE(step.back().has_value());
                break;
            }
            ++failure_points;
            CHECK(f.sink.pages() == before);
            CHECK(f.sink.partition.windows().size() == windows);
            CHECK(holes(f.sink, before, after).empty());
        }
    }
    CHECK(failure_points == 3 + 3 + 5 + 5);
    // Every change went back: the unmaps' steps left PAM and the higher region mapped.
    CHECK(f.active(pam));
    CHECK_FALSE(f.active(rom));
    CHECK(f.active(high));
    CHECK_FALSE(f.active(low));
}
