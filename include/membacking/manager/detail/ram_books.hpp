/**
 * @file manager/detail/ram_books.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/, region/, va/).
 *
 * RamBooks: what the builder created, for the façades that need it later: the RAM regions
 * (RamVisibilityControl finds a controllable range here) and the RAM backings
 * (shared_memory_backing, dumps). Guarded by the manager's control lock.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/va/mappable.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace membacking::detail {

struct RamBooks {
    /// One RAM region created by the builder.
    struct Region {
        MemoryRange range;
        RegionId id;
        bool prefetch = false;
    };

    /// One RAM backing created by the builder.
    struct Backing {
        Mappable object;                 ///< empty for private memory
        std::vector<MemoryRange> ranges; ///< canonical: the object's layout
    };

    std::vector<Region> regions;
    std::vector<Backing> backings;

    /// The RAM region whose range is exactly `range`.
    [[nodiscard]] const Region* find(const MemoryRange& range) const
    {
        auto it = std::find_if(regions.begin(), regions.end(),
                               [&](const Region& r) { return r.range == range; });
        return it == regions.end() ? nullptr : &*it;
    }

    /// As find, or errc::not_found "{range} is not a controllable RAM range".
    [[nodiscard]] Result<const Region*> find_controllable(const MemoryRange& range) const
    {
        if (const Region* r = find(range))
            return r;
        return make_error(errc::not_found, range.to_string() + " is not a controllable RAM range");
    }

    /// `range` cut at every RAM region boundary strictly inside it, in GPA order: each piece
    /// lies inside one RAM region or outside all of them.
    [[nodiscard]] std::vector<MemoryRange> split_at_boundaries(const MemoryRange& range) const
    {
        std::vector<std::uint64_t> cuts = {range.start(), range.end()};
        for (const Region& r : regions)
            for (const std::uint64_t b : {r.range.start(), r.range.end()})
                if (b > range.start() && b < range.end())
                    cuts.push_back(b);
        std::sort(cuts.begin(), cuts.end());
        cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
        std::vector<MemoryRange> out;
        for (std::size_t i = 1; i < cuts.size(); ++i)
            out.push_back(MemoryRange::valid_or_abort(cuts[i - 1], cuts[i]));
        return out;
    }

    /// The single file-backed backing, if there is exactly one.
    [[nodiscard]] std::optional<Backing> sole_shared_backing() const
    {
        if (backings.size() != 1 || backings.front().object.empty())
            return std::nullopt;
        return backings.front();
    }
};

} // namespace membacking::detail
