// NestedPriority in isolation: registration rules, the dominance forest, and plans.
#include <membacking/region/nested_priority.hpp>

#include "test_support.hpp"

using namespace membacking;
using membacking::test::range;

namespace {
ResolverEntry entry(std::uint64_t id, std::uint64_t start, std::uint64_t end, std::uint8_t prio)
{
    return {RegionId{id}, range(start, end), prio};
}
} // namespace

TEST_CASE("NestedPriority: conflicts follow the containment rule")
{
    NestedPriority np;
    np.insert(entry(1, 0x0, 0x10000, 10));
    // Lower priority inside: fine. Lower priority sticking out: conflict with the container.
    CHECK_FALSE(np.find_conflict(entry(2, 0x1000, 0x2000, 5)).has_value());
    CHECK(np.find_conflict(entry(2, 0x8000, 0x18000, 5)) == RegionId{1});
    // Equal priority: identical range only.
    CHECK_FALSE(np.find_conflict(entry(2, 0x0, 0x10000, 10)).has_value());
    CHECK(np.find_conflict(entry(2, 0x0, 0x8000, 10)) == RegionId{1});
    // Higher priority must contain it.
    CHECK_FALSE(np.find_conflict(entry(2, 0x0, 0x20000, 20)).has_value());
    CHECK(np.find_conflict(entry(2, 0x1000, 0x2000, 20)) == RegionId{1});
    // Disjoint: anything goes.
    CHECK_FALSE(np.find_conflict(entry(2, 0x10000, 0x20000, 10)).has_value());
}

TEST_CASE("NestedPriority: the forest follows dominance, and erase splices children up")
{
    NestedPriority np;
    np.insert(entry(1, 0x4000, 0x5000, 0)); // a device
    np.insert(entry(2, 0x8000, 0x9000, 0)); // another device
    np.insert(entry(3, 0x0, 0x10000, 255)); // RAM registered later, above both
    np.insert(entry(4, 0x0, 0x10000, 255)); // identical RAM alias: dominated by 3 (earlier)
    CHECK(np.parent(RegionId{3}) == std::nullopt);
    CHECK(np.parent(RegionId{4}) == RegionId{3});
    CHECK(np.parent(RegionId{1}) == RegionId{4});
    CHECK(np.parent(RegionId{2}) == RegionId{4});
    np.erase(RegionId{4});
    CHECK(np.parent(RegionId{1}) == RegionId{3});
    CHECK(np.parent(RegionId{2}) == RegionId{3});
    CHECK(np.size() == 3);
}

TEST_CASE("NestedPriority: plans use the mapped frontier only")
{
    NestedPriority np;
    np.insert(entry(1, 0x0, 0x10000, 255));
    np.insert(entry(2, 0x1000, 0x4000, 100));
    np.insert(entry(3, 0x1000, 0x2000, 0));
    np.insert(entry(4, 0x8000, 0x9000, 0));
    np.set_mapped(RegionId{3}, true);
    np.set_mapped(RegionId{4}, true);

    Transition t;
    np.plan_map(RegionId{1}, t);
    REQUIRE(t.deactivate.size() == 2);
    CHECK(t.deactivate[0] == Segment{RegionId{3}, range(0x1000, 0x2000)});
    CHECK(t.deactivate[1] == Segment{RegionId{4}, range(0x8000, 0x9000)});
    REQUIRE(t.activate.size() == 1);
    CHECK(t.activate[0].region == RegionId{1});
    np.set_mapped(RegionId{1}, true);

    // Region 2 is under a mapped ancestor: mapping it changes nothing.
    t.clear();
    np.plan_map(RegionId{2}, t);
    CHECK(t.empty());
    np.set_mapped(RegionId{2}, true);

    // Unmapping RAM brings back 2 (which hides 3) and 4, in start order.
    t.clear();
    np.plan_unmap(RegionId{1}, t);
    REQUIRE(t.activate.size() == 2);
    CHECK(t.activate[0].region == RegionId{2});
    CHECK(t.activate[1].region == RegionId{4});
}
