/**
 * @file region/mapping_list.hpp
 * Layer: region.
 *
 * MappingList: the mappings of one region (or of a device region's local replay list), keyed by
 * region-relative offset, never overlapping, with mmap semantics: placing a mapping replaces the
 * covered parts of older ones, splitting them; removing a range splits mappings at its edges.
 *
 * Changes are two-phase: replace_edit / remove_edit compute an Edit without touching the list,
 * callers push the change to the outside world, and apply(edit) commits only once that worked.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/detail/interval_map.hpp>
#include <membacking/region/mapping.hpp>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace membacking {

class MappingList {
    struct RangeOfMapping {
        MemoryRange operator()(const RegionMapping& m) const noexcept { return m.range; }
    };
    using Intervals = detail::IntervalMap<RegionMapping, RangeOfMapping>;

public:
    /// A pending change: entries to drop (by offset) and entries to add.
    struct Edit : Intervals::Edit {
        bool removes_private = false; ///< some private memory is covered
    };

    struct Counts {
        std::size_t readonly = 0; ///< mappings with writable == false
        std::size_t private_memory = 0;
    };

    /// Calls f for every mapping overlapping `rel`, in offset order.
    template <class F>
    void for_each_overlapping(const MemoryRange& rel, F&& f) const
    {
        map_.for_each_overlapping(rel, std::forward<F>(f));
    }

    /// The edit that punches `rel` out of the list, keeping the parts outside it.
    [[nodiscard]] Edit remove_edit(const MemoryRange& rel) const
    {
        Edit edit{map_.punch_edit(rel, [](const RegionMapping& old, const MemoryRange& part) {
            return old.slice(part);
        })};
        map_.for_each_overlapping(rel, [&](const RegionMapping& old) {
            edit.removes_private = edit.removes_private || old.backing.is_private();
        });
        return edit;
    }

    /// The edit that places m, replacing whatever it covers.
    [[nodiscard]] Edit replace_edit(const RegionMapping& m) const
    {
        Edit edit = remove_edit(m.range);
        edit.insert.push_back(m);
        return edit;
    }

    [[nodiscard]] Counts counts() const noexcept { return counts_; }

    /// The counts the list would have after `edit`.
    [[nodiscard]] Counts counts_after(const Edit& edit) const
    {
        Counts c = counts_;
        for (std::uint64_t key : edit.erase)
            sub(c, map_.at(key));
        for (const RegionMapping& m : edit.insert)
            add(c, m);
        return c;
    }

    void apply(const Edit& edit)
    {
        counts_ = counts_after(edit);
        map_.apply(edit);
    }

    /// The mappings in offset order, as (offset, RegionMapping) pairs.
    [[nodiscard]] std::size_t size() const noexcept { return map_.size(); }
    [[nodiscard]] bool empty() const noexcept { return map_.empty(); }
    [[nodiscard]] Intervals::const_iterator begin() const noexcept { return map_.begin(); }
    [[nodiscard]] Intervals::const_iterator end() const noexcept { return map_.end(); }
    [[nodiscard]] const RegionMapping& at(std::uint64_t offset) const { return map_.at(offset); }

private:
    static void add(Counts& c, const RegionMapping& m)
    {
        c.readonly += m.writable ? 0U : 1U;
        c.private_memory += m.backing.is_private() ? 1U : 0U;
    }
    static void sub(Counts& c, const RegionMapping& m)
    {
        c.readonly -= m.writable ? 0U : 1U;
        c.private_memory -= m.backing.is_private() ? 1U : 0U;
    }

    Intervals map_;
    Counts counts_;
};

} // namespace membacking
