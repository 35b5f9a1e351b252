/**
 * @file manager/shared_backing.hpp
 * Layer: manager (includes base/, va/mappable.hpp).
 *
 * SharedMemoryBacking: one file-backed RAM backing of a manager, the object and the GPA ranges
 * it backs, for restarting a VMM (servicing) with the same memory. The ranges are laid out back
 * to back in the object in ascending GPA order (the builder's canonical layout, whatever order a
 * RamBackingRequest lists them in), so offset_of(gpa) is where a guest byte lives in the object.
 *
 * Restore: pass each backing to RamBackingRequest::existing_mappable(const SharedMemoryBacking&)
 * of the new manager (GuestMemoryManager::shared_memory_backings() gives one per backing, for
 * example one per host NUMA node). The new request's ranges must be the same GPA ranges (in any
 * order, adjacent ranges merged or split as you like: the layout is the same); otherwise the
 * build fails with build_errc::restore_layout_mismatch. Only one manager should use a backing at
 * a time. Reference inventory §2.7.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/units.hpp>
#include <membacking/va/mappable.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace membacking {

namespace detail {
/// The canonical form of a backing's ranges: sorted by GPA, adjacent ranges merged. Two lists
/// with the same canonical form give the same object layout.
[[nodiscard]] inline std::vector<MemoryRange> canonical_ram_ranges(std::vector<MemoryRange> ranges)
{
    std::sort(ranges.begin(), ranges.end());
    std::vector<MemoryRange> out;
    for (const MemoryRange& r : ranges) {
        if (r.empty())
            continue;
        if (!out.empty() && out.back().end() == r.start())
            out.back() = MemoryRange::valid_or_abort(out.back().start(), r.end());
        else
            out.push_back(r);
    }
    return out;
}
} // namespace detail

class SharedMemoryBacking {
public:
    /// A backing of `object` laid out as `ranges` (in any order; see the file comment). Without
    /// ranges, a restore checks nothing about the layout.
    [[nodiscard]] static SharedMemoryBacking from_mappable(Mappable object,
                                                           std::vector<MemoryRange> ranges = {})
    {
        return SharedMemoryBacking(std::move(object),
                                   detail::canonical_ram_ranges(std::move(ranges)));
    }
    [[nodiscard]] const Mappable& mappable() const noexcept { return object_; }
    /// The GPA ranges this object backs, in canonical form (ascending, adjacent ones merged):
    /// the object holds them back to back in this order.
    [[nodiscard]] const std::vector<MemoryRange>& ranges() const noexcept { return ranges_; }
    /// Where the byte of guest memory at `gpa` lives in the object, if this backing holds it.
    [[nodiscard]] std::optional<Offset> offset_of(Gpa gpa) const noexcept
    {
        std::uint64_t offset = 0;
        for (const MemoryRange& r : ranges_) {
            if (r.contains(gpa.value()))
                return Offset{offset + (gpa.value() - r.start())};
            offset += r.size();
        }
        return std::nullopt;
    }

private:
    SharedMemoryBacking(Mappable object, std::vector<MemoryRange> ranges)
        : object_(std::move(object)), ranges_(std::move(ranges))
    {}
    Mappable object_;
    std::vector<MemoryRange> ranges_;
};

} // namespace membacking
