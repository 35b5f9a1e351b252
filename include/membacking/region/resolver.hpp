/**
 * @file region/resolver.hpp
 * Layer: region.
 *
 * The RegionResolver concept: the policy that decides which mapped region is visible where.
 * The region manager owns names, params, mappings and the events; a resolver owns only geometry
 * (range, priority) and the mapped flag of each region, and answers two questions:
 *
 * - registration: would this region break the overlap rules (find_conflict), and insert / erase;
 * - planning: what becomes visible and invisible if a region becomes mapped (plan_map) or
 *   unmapped (plan_unmap). Planning is const; the region manager applies the plan through its
 *   sinks and only then commits the new mapped flag (set_mapped), so a failed plan leaves the
 *   resolver untouched.
 *
 * A plan is a Transition: segments to deactivate (each exactly a segment activated earlier), then
 * segments to activate, in order. NestedPriority always uses whole regions as segments; a
 * general-overlap resolver (QEMU's flat view) can activate fragments of a region.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/region/region_id.hpp>

#include <concepts>
#include <cstdint>
#include <optional>
#include <vector>

namespace membacking {

/// A region as a resolver sees it.
struct ResolverEntry {
    RegionId id;
    MemoryRange range;
    std::uint8_t priority = 0;
};

/// A GPA window in which one region's contents are visible.
struct Segment {
    RegionId region;
    MemoryRange gpa;
    friend bool operator==(const Segment&, const Segment&) noexcept = default;
};

/// What a map or unmap changes, in the order it must be applied.
struct Transition {
    std::vector<Segment> deactivate;
    std::vector<Segment> activate;

    void clear() noexcept
    {
        deactivate.clear();
        activate.clear();
    }
    [[nodiscard]] bool empty() const noexcept { return deactivate.empty() && activate.empty(); }
};

/// Registration: the overlap rules and the index.
// clang-format off
template <class R>
concept RegionResolver_registry = requires(R& r, const R& cr, const ResolverEntry& e, RegionId id) {
    /// The existing region that e would conflict with, if any.
    { cr.find_conflict(e) } -> std::same_as<std::optional<RegionId>>;
    /// Precondition: find_conflict(e) is empty.
    { r.insert(e) } -> std::same_as<void>;
    /// Precondition: the region is unmapped.
    { r.erase(id) } -> std::same_as<void>;
};

/// Planning: what a change of one region's mapped flag does to visibility.
template <class R>
concept RegionResolver_planning = requires(R& r, const R& cr, RegionId id, bool mapped,
                                           Transition& out) {
    { r.set_mapped(id, mapped) } -> std::same_as<void>;
    /// Precondition: id is unmapped. Appends to out.
    { cr.plan_map(id, out) } -> std::same_as<void>;
    /// Precondition: id is mapped. Appends to out.
    { cr.plan_unmap(id, out) } -> std::same_as<void>;
};

template <class R>
concept RegionResolver =
    std::default_initializable<R> && RegionResolver_registry<R> && RegionResolver_planning<R>;
// clang-format on

namespace detail {
/// RegionResolver<R>, checked one sub-concept at a time with messages that give the members'
/// declarations (GCC 12 reports only that the whole concept "evaluated to false").
template <class R>
consteval bool check_region_resolver()
{
    static_assert(std::default_initializable<R>, "region resolver: needs a default constructor");
    static_assert(RegionResolver_registry<R>,
                  "region resolver: needs `std::optional<RegionId> find_conflict(const "
                  "ResolverEntry&) const`, `void insert(const ResolverEntry&)` and `void "
                  "erase(RegionId)`");
    static_assert(RegionResolver_planning<R>,
                  "region resolver: needs `void set_mapped(RegionId, bool)`, `void "
                  "plan_map(RegionId, Transition&) const` and `void plan_unmap(RegionId, "
                  "Transition&) const`");
    return RegionResolver<R>;
}
} // namespace detail

} // namespace membacking
