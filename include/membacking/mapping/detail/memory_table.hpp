/**
 * @file mapping/detail/memory_table.hpp
 * Internal (namespace membacking::detail); layer: mapping (includes base/, detail/,
 * mapping/memory_piece.hpp).
 *
 * MemoryTable: the active guest memory as maximal pieces (mapping/memory_piece.hpp), kept on the
 * one interval map (detail/interval_map.hpp), and the diff of each VA event against it. The
 * region manager's VA events (add_mapping replaces whatever overlaps it, remove_mappings punches
 * a range out) become TableDiffs in whole pieces:
 * - the affected pieces are those overlapping the event's range and the two that touch its ends
 *   (they may merge with what lands there);
 * - what replaces them is the parts of the affected pieces outside the range, plus the new piece,
 *   merged where one continues the other;
 * - pieces found on both sides unchanged cancel out, so the diff is minimal and a rollback that
 *   puts the same memory back gives back exactly the pieces that were there (no fragments).
 * Computing a diff does not change the table; apply() commits one (the caller delivers it first).
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/detail/interval_map.hpp>
#include <membacking/mapping/memory_piece.hpp>
#include <membacking/region/mapping.hpp>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace membacking::detail {

/// Whole pieces out, whole pieces in (removals first).
struct TableDiff {
    std::vector<MemoryPiece> removed;
    std::vector<MemoryPiece> added;

    [[nodiscard]] bool empty() const noexcept { return removed.empty() && added.empty(); }
    [[nodiscard]] TableDiff inverse() const { return {added, removed}; }
};

class MemoryTable {
public:
    /// The diff of add_mapping(m): m replaces whatever overlaps it.
    [[nodiscard]] TableDiff replace(const ActiveMapping& m) const
    {
        const MemoryPiece piece = MemoryPiece::from(m);
        return diff(m.gpa, &piece);
    }

    /// The diff of remove_mappings(range).
    [[nodiscard]] TableDiff remove(const MemoryRange& range) const { return diff(range, nullptr); }

    /// Commits a diff computed on this table.
    void apply(const TableDiff& d)
    {
        for (const MemoryPiece& p : d.removed) {
            MEMBACKING_CHECK(pieces_.find_exact(p.gpa) != nullptr,
                             "MemoryTable: removing a piece the table does not hold");
            pieces_.erase(p.gpa.start());
        }
        for (const MemoryPiece& p : d.added)
            pieces_.insert(p);
    }

    /// Every piece, by GPA.
    [[nodiscard]] std::vector<MemoryPiece> pieces() const
    {
        std::vector<MemoryPiece> out;
        out.reserve(pieces_.size());
        for (const auto& [start, p] : pieces_)
            out.push_back(p);
        return out;
    }

    [[nodiscard]] std::size_t size() const noexcept { return pieces_.size(); }

private:
    struct RangeOfPiece {
        MemoryRange operator()(const MemoryPiece& p) const noexcept { return p.gpa; }
    };

    [[nodiscard]] TableDiff diff(const MemoryRange& range, const MemoryPiece* put) const
    {
        // The affected pieces, by GPA: the one ending at range.start(), those overlapping range,
        // the one starting at range.end().
        std::vector<MemoryPiece> old;
        if (range.start() > 0)
            if (const MemoryPiece* left = pieces_.containing(range.start() - 1);
                left != nullptr && left->gpa.end() == range.start())
                old.push_back(*left);
        pieces_.for_each_overlapping(range, [&](const MemoryPiece& p) { old.push_back(p); });
        if (const MemoryPiece* right = pieces_.containing(range.end());
            right != nullptr && right->gpa.start() == range.end())
            old.push_back(*right);

        // What takes their place, by GPA: the left parts, the new piece, the right parts.
        std::vector<MemoryPiece> fresh;
        for (const MemoryPiece& p : old)
            if (p.gpa.start() < range.start())
                fresh.push_back(p.slice(MemoryRange::valid_or_abort(
                    p.gpa.start(), std::min(p.gpa.end(), range.start()))));
        if (put != nullptr)
            fresh.push_back(*put);
        for (const MemoryPiece& p : old)
            if (p.gpa.end() > range.end())
                fresh.push_back(p.slice(MemoryRange::valid_or_abort(
                    std::max(p.gpa.start(), range.end()), p.gpa.end())));
        std::vector<MemoryPiece> merged;
        for (MemoryPiece& p : fresh) {
            if (!merged.empty() && merged.back().continued_by(p))
                merged.back().gpa =
                    MemoryRange::valid_or_abort(merged.back().gpa.start(), p.gpa.end());
            else
                merged.push_back(std::move(p));
        }

        // Pieces on both sides are untouched: neither removed nor added.
        TableDiff d;
        for (const MemoryPiece& p : old)
            if (std::find(merged.begin(), merged.end(), p) == merged.end())
                d.removed.push_back(p);
        for (const MemoryPiece& p : merged)
            if (std::find(old.begin(), old.end(), p) == old.end())
                d.added.push_back(p);
        return d;
    }

    IntervalMap<MemoryPiece, RangeOfPiece> pieces_;
};

} // namespace membacking::detail
