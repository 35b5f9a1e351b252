/**
 * @file region/nested_priority.hpp
 * Layer: region.
 *
 * NestedPriority: OpenVMM's region-priority rules, as a RegionResolver.
 *
 * Rules (reference inventory §3):
 * - A higher-priority region must contain every lower-priority region it overlaps; equal
 *   priorities may overlap only with identical ranges. Anything else is a conflict.
 * - The highest-priority mapped region is visible; among equal priorities (identical ranges) the
 *   earliest registered wins: the lowest id, so a region re-inserted under its old id (an undo
 *   step, RegionManager::restore_region) takes back its old place. Mapping a region under a visible
 * higher one only records that it is mapped; it reappears, with the other best mapped regions
 * below, when the higher one goes.
 *
 * Those rules make the regions a laminar family: any two are disjoint or nested. We keep them as a
 * forest in which a node's parent is the region that *dominates* it (contains it, with higher
 * priority, or equal priority and earlier registration). Siblings are pairwise disjoint and kept
 * sorted by start. A region is visible iff it is mapped and no ancestor is mapped. So:
 * - find_conflict / insert walk down one path: O(depth · log n);
 * - plan_map / plan_unmap touch only the region's ancestors and the mapped "frontier" of its
 *   subtree, pruned by a per-node count of mapped descendants; nothing scans all regions, which is
 *   what keeps a remap flat from 100 to 10000 regions (bench/region_remap.cpp).
 * Deep walks use explicit stacks, never recursion.
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/region/resolver.hpp>

#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace membacking {

class NestedPriority {
public:
    [[nodiscard]] std::optional<RegionId> find_conflict(const ResolverEntry& e) const
    {
        return descend(e).conflict;
    }

    void insert(const ResolverEntry& e)
    {
        const Placement place = descend(e);
        MEMBACKING_CHECK(!place.conflict, "NestedPriority::insert given a conflicting region");
        MEMBACKING_CHECK(!nodes_.contains(e.id), "NestedPriority::insert given a duplicate id");
        Node node;
        node.range = e.range;
        node.priority = e.priority;
        node.parent = place.parent;
        Level& level = level_of(place.parent);
        // Every overlapping sibling at the insertion level is dominated by the new region.
        for (RegionId child : place.dominated) {
            Node& c = nodes_.at(child);
            level.erase(c.range.start());
            c.parent = e.id;
            node.mapped_below += c.mapped_below + (c.mapped ? 1 : 0);
            node.children.emplace(c.range.start(), child);
        }
        level.emplace(e.range.start(), e.id);
        nodes_.emplace(e.id, std::move(node));
    }

    void erase(RegionId id)
    {
        auto it = nodes_.find(id);
        MEMBACKING_CHECK(it != nodes_.end(), "NestedPriority::erase of an unknown region");
        MEMBACKING_CHECK(!it->second.mapped, "NestedPriority::erase of a mapped region");
        Node& node = it->second;
        Level& level = level_of(node.parent);
        level.erase(node.range.start());
        // The children move up one level; counts above are unchanged (node itself was unmapped).
        for (auto& [start, child] : node.children) {
            nodes_.at(child).parent = node.parent;
            level.emplace(start, child);
        }
        nodes_.erase(it);
    }

    void set_mapped(RegionId id, bool mapped)
    {
        Node& node = nodes_.at(id);
        if (node.mapped == mapped)
            return;
        node.mapped = mapped;
        for (auto p = node.parent; p; p = nodes_.at(*p).parent) {
            auto& below = nodes_.at(*p).mapped_below;
            below = mapped ? below + 1 : below - 1;
        }
    }

    void plan_map(RegionId id, Transition& out) const
    {
        const Node& node = nodes_.at(id);
        MEMBACKING_CHECK(!node.mapped, "NestedPriority::plan_map of a mapped region");
        if (has_mapped_ancestor(node))
            return; // shadowed: mapping it only records the params
        // The visible regions below it are exactly the mapped frontier of its subtree.
        for_each_frontier(node, [&](RegionId r, const Node& n) {
            out.deactivate.push_back({r, n.range});
        });
        out.activate.push_back({id, node.range});
    }

    void plan_unmap(RegionId id, Transition& out) const
    {
        const Node& node = nodes_.at(id);
        MEMBACKING_CHECK(node.mapped, "NestedPriority::plan_unmap of an unmapped region");
        if (has_mapped_ancestor(node))
            return; // it was not visible, so nothing changes
        out.deactivate.push_back({id, node.range});
        // The best mapped regions inside it reappear, in ascending start order.
        for_each_frontier(node, [&](RegionId r, const Node& n) {
            out.activate.push_back({r, n.range});
        });
    }

    /// The region's dominating region, if any (for dumps and tests).
    [[nodiscard]] std::optional<RegionId> parent(RegionId id) const { return nodes_.at(id).parent; }
    [[nodiscard]] std::size_t size() const noexcept { return nodes_.size(); }

private:
    using Level = std::map<std::uint64_t, RegionId>; // sibling start -> id; siblings are disjoint

    struct Node {
        MemoryRange range;
        std::uint8_t priority = 0;
        bool mapped = false;
        std::uint64_t mapped_below = 0; ///< mapped nodes in the subtree, excluding this one
        std::optional<RegionId> parent;
        Level children;
    };

    struct Placement {
        std::optional<RegionId> parent;   ///< where the new region goes
        std::vector<RegionId> dominated;  ///< siblings at that level it will contain
        std::optional<RegionId> conflict; ///< the region it clashes with, if any
    };

    Level& level_of(const std::optional<RegionId>& parent)
    {
        return parent ? nodes_.at(*parent).children : roots_;
    }
    const Level& level_of(const std::optional<RegionId>& parent) const
    {
        return parent ? nodes_.at(*parent).children : roots_;
    }

    /// Existing region `n` (id `n_id`) dominates the new entry `e`: higher priority, or equal
    /// priority on an identical range and registered earlier (a lower id; new regions always
    /// have the highest, a restored one its old id).
    static bool dominates(RegionId n_id, const Node& n, const ResolverEntry& e)
    {
        return n.range.contains(e.range) &&
               (n.priority > e.priority ||
                (n.priority == e.priority && n.range == e.range && n_id < e.id));
    }

    /// The new entry `e` dominates existing region `n` (id `n_id`).
    static bool dominated_by(RegionId n_id, const Node& n, const ResolverEntry& e)
    {
        return e.range.contains(n.range) &&
               (e.priority > n.priority ||
                (e.priority == n.priority && e.range == n.range && e.id < n_id));
    }

    /// Walks down from the roots along the regions that dominate e. At the level where none
    /// does, every overlapping sibling must be dominated by e, or that sibling is the conflict.
    [[nodiscard]] Placement descend(const ResolverEntry& e) const
    {
        Placement place;
        if (e.range.empty())
            return place; // an empty range overlaps nothing (callers reject empty regions)
        for (;;) {
            const Level& level = level_of(place.parent);
            std::vector<RegionId> overlapping;
            auto it = level.upper_bound(e.range.start());
            if (it != level.begin()) {
                auto prev = std::prev(it);
                if (nodes_.at(prev->second).range.overlaps(e.range))
                    it = prev;
            }
            for (; it != level.end() && it->first < e.range.end(); ++it)
                overlapping.push_back(it->second);

            if (overlapping.size() == 1 &&
                dominates(overlapping.front(), nodes_.at(overlapping.front()), e)) {
                place.parent = overlapping.front();
                continue;
            }
            for (RegionId r : overlapping) {
                if (!dominated_by(r, nodes_.at(r), e)) {
                    place.conflict = r;
                    return place;
                }
            }
            place.dominated = std::move(overlapping);
            return place;
        }
    }

    [[nodiscard]] bool has_mapped_ancestor(const Node& node) const
    {
        for (auto p = node.parent; p; p = nodes_.at(*p).parent)
            if (nodes_.at(*p).mapped)
                return true;
        return false;
    }

    /// Visits, in ascending start order, the mapped descendants of `node` that have no mapped
    /// node between them and `node`. Subtrees without mapped nodes are skipped unvisited.
    template <class F>
    void for_each_frontier(const Node& node, F&& visit) const
    {
        if (node.mapped_below == 0)
            return;
        // A stack of sibling iterators; the top is the level being walked.
        std::vector<std::pair<Level::const_iterator, Level::const_iterator>> stack;
        stack.emplace_back(node.children.begin(), node.children.end());
        while (!stack.empty()) {
            auto& [it, end] = stack.back();
            if (it == end) {
                stack.pop_back();
                continue;
            }
            const RegionId id = it->second;
            const Node& child = nodes_.at(id);
            ++it;
            if (child.mapped)
                visit(id, child);
            else if (child.mapped_below > 0)
                stack.emplace_back(child.children.begin(), child.children.end());
        }
    }

    std::unordered_map<RegionId, Node> nodes_;
    Level roots_;
};

static_assert(RegionResolver<NestedPriority>);

} // namespace membacking
