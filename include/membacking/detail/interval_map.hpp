/**
 * @file detail/interval_map.hpp
 * Internal (namespace membacking::detail); includes base/ only.
 *
 * IntervalMap<V, RangeOf>: the one implementation of "disjoint page ranges keyed by their start"
 * that every layer needs: a region's mappings (region/mapping_list.hpp), the mapping manager's
 * active mappings (mapping/mapping_manager.hpp), and each partition's mapped windows
 * (partition/kvm.hpp, partition/mock.hpp, partition/whp.hpp), and the Windows placeholder
 * policy's books of mapped pieces (va/windows_placeholder.hpp). It does the overlap walk (which
 * entries meet a range, in address order) and the split-out (punch a range out, keeping the parts
 * of the entries it cuts) in one place, so that an off-by-one at an edge is fixed once.
 *
 * Each value carries its own range; `RangeOf` is a stateless callable that reads it
 * (MemoryRange(const V&)). Entries never overlap: inserting one that does is a library bug and
 * fatal (MEMBACKING_CHECK), because every caller has checked or punched the space first. Values
 * reached through a non-const pointer may be changed, but not their range.
 *
 * Splits are two-phase where callers need it: punch_edit() computes an Edit without touching the
 * map (the caller pushes the change to the outside world first), apply() commits it; punch() does
 * both. How a value is cut is the caller's: punch takes a slicer, V(const V&, MemoryRange part).
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <utility>
#include <vector>

namespace membacking::detail {

template <class V, class RangeOf>
class IntervalMap {
public:
    using Map = std::map<std::uint64_t, V>;
    using iterator = typename Map::iterator; ///< values may change through it, ranges not
    using const_iterator = typename Map::const_iterator;

    /// A pending change: the entries to drop (by start), then the entries to add.
    struct Edit {
        std::vector<std::uint64_t> erase;
        std::vector<V> insert;
    };

    /// The entries a range covers: those wholly inside it, in address order, and the first one
    /// it cuts (overlaps without containing), if any.
    struct Cover {
        std::vector<V> inside;
        const V* cut = nullptr;
    };

    [[nodiscard]] static MemoryRange range_of(const V& v) { return RangeOf{}(v); }

    // ---- lookups ----

    /// The entry whose range is exactly r.
    [[nodiscard]] const V* find_exact(const MemoryRange& r) const
    {
        auto it = map_.find(r.start());
        return it != map_.end() && range_of(it->second) == r ? &it->second : nullptr;
    }
    [[nodiscard]] V* find_exact(const MemoryRange& r)
    {
        return const_cast<V*>(std::as_const(*this).find_exact(r));
    }

    /// The entry containing the address `point`.
    [[nodiscard]] const V* containing(std::uint64_t point) const
    {
        auto it = map_.upper_bound(point);
        if (it == map_.begin())
            return nullptr;
        --it;
        return range_of(it->second).contains(point) ? &it->second : nullptr;
    }
    [[nodiscard]] V* containing(std::uint64_t point)
    {
        return const_cast<V*>(std::as_const(*this).containing(point));
    }

    /// The one entry containing all of r (non-empty).
    [[nodiscard]] const V* containing(const MemoryRange& r) const
    {
        if (r.empty())
            return nullptr;
        const V* v = containing(r.start());
        return v != nullptr && range_of(*v).contains(r) ? v : nullptr;
    }

    /// The lowest entry overlapping r.
    [[nodiscard]] const V* first_overlap(const MemoryRange& r) const
    {
        auto it = first_candidate(r);
        if (it != map_.end() && it->first < r.end() && range_of(it->second).overlaps(r))
            return &it->second;
        return nullptr;
    }

    /// The gap around `point`: the largest range inside `bounds` that holds point and meets no
    /// entry. None if an entry holds point, or bounds do not.
    [[nodiscard]] std::optional<MemoryRange> gap_around(std::uint64_t point,
                                                        const MemoryRange& bounds) const
    {
        if (!bounds.contains(point))
            return std::nullopt;
        auto next = map_.upper_bound(point);
        std::uint64_t start = bounds.start();
        if (next != map_.begin()) {
            const MemoryRange before = range_of(std::prev(next)->second);
            if (before.contains(point))
                return std::nullopt;
            start = std::max(start, before.end());
        }
        const std::uint64_t end =
            next == map_.end() ? bounds.end() : std::min(bounds.end(), next->first);
        return MemoryRange::valid_or_abort(start, end);
    }

    /// Calls f(value) for every entry overlapping r, in address order. f must not insert or
    /// erase entries.
    template <class F>
    void for_each_overlapping(const MemoryRange& r, F&& f) const
    {
        for (auto it = first_candidate(r); it != map_.end() && it->first < r.end(); ++it)
            if (range_of(it->second).overlaps(r))
                f(it->second);
    }
    template <class F>
    void for_each_overlapping(const MemoryRange& r, F&& f)
    {
        std::as_const(*this).for_each_overlapping(
            r, [&](const V& v) { f(const_cast<V&>(v)); }); // the map is ours and non-const
    }

    /// The entries r covers wholly, and the first one it cuts (an unmap that must not split).
    [[nodiscard]] Cover cover(const MemoryRange& r) const
    {
        Cover c;
        for_each_overlapping(r, [&](const V& v) {
            if (c.cut != nullptr)
                return;
            if (r.contains(range_of(v)))
                c.inside.push_back(v);
            else
                c.cut = &v;
        });
        return c;
    }

    // ---- changes ----

    /// Adds v, whose range must be non-empty and overlap no entry (fatal otherwise).
    V& insert(V v)
    {
        const MemoryRange r = range_of(v);
        MEMBACKING_CHECK(!r.empty(), "IntervalMap: inserting an empty range");
        MEMBACKING_CHECK(first_overlap(r) == nullptr,
                         "IntervalMap: inserting an overlapping range");
        return map_.emplace(r.start(), std::move(v)).first->second;
    }

    /// Removes the entry that starts at `start` (nothing if there is none).
    void erase(std::uint64_t start) { map_.erase(start); }

    /// The edit that punches r out: every entry overlapping r goes, and the parts of the ones it
    /// cuts that lie outside r come back, cut by slice(value, part).
    template <class Slice>
    [[nodiscard]] Edit punch_edit(const MemoryRange& r, Slice&& slice) const
    {
        Edit edit;
        for_each_overlapping(r, [&](const V& v) {
            const MemoryRange whole = range_of(v);
            edit.erase.push_back(whole.start());
            if (whole.start() < r.start())
                edit.insert.push_back(
                    slice(v, MemoryRange::valid_or_abort(whole.start(), r.start())));
            if (whole.end() > r.end())
                edit.insert.push_back(slice(v, MemoryRange::valid_or_abort(r.end(), whole.end())));
        });
        return edit;
    }

    /// Commits an edit computed on this map (erasures first, then insertions).
    void apply(Edit edit)
    {
        for (std::uint64_t start : edit.erase)
            map_.erase(start);
        for (V& v : edit.insert)
            insert(std::move(v));
    }

    /// punch_edit + apply.
    template <class Slice>
    void punch(const MemoryRange& r, Slice&& slice)
    {
        apply(punch_edit(r, std::forward<Slice>(slice)));
    }

    void clear() noexcept { map_.clear(); }

    // ---- the entries, in address order: (start, value) pairs ----

    [[nodiscard]] std::size_t size() const noexcept { return map_.size(); }
    [[nodiscard]] bool empty() const noexcept { return map_.empty(); }
    [[nodiscard]] const_iterator begin() const noexcept { return map_.begin(); }
    [[nodiscard]] const_iterator end() const noexcept { return map_.end(); }
    [[nodiscard]] iterator begin() noexcept { return map_.begin(); }
    [[nodiscard]] iterator end() noexcept { return map_.end(); }
    /// The entry that starts at `start` (fatal if there is none).
    [[nodiscard]] const V& at(std::uint64_t start) const
    {
        auto it = map_.find(start);
        MEMBACKING_CHECK(it != map_.end(), "IntervalMap::at: no entry starts there");
        return it->second;
    }

private:
    /// The first entry that can overlap r: the one before r.start() if it reaches into r, else
    /// the first that starts at or after r.start().
    const_iterator first_candidate(const MemoryRange& r) const
    {
        auto it = map_.upper_bound(r.start());
        if (it != map_.begin() && range_of(std::prev(it)->second).overlaps(r))
            --it;
        return it;
    }

    Map map_;
};

} // namespace membacking::detail
