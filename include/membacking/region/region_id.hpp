/**
 * @file region/region_id.hpp
 * Layer: region.
 *
 * RegionId: the identity of a registered region. Ids start at 1, grow monotonically and are never
 * reused, so a stale id can only ever name "no region" (errc::not_found), never another region.
 * Their order is registration order, which breaks ties between equal-priority regions.
 */
#pragma once

#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <ostream>

namespace membacking {

struct RegionId {
    std::uint64_t value = 0; ///< 0 is never a registered region

    friend constexpr auto operator<=>(const RegionId&, const RegionId&) noexcept = default;
    friend std::ostream& operator<<(std::ostream& os, RegionId id) { return os << id.value; }
};

} // namespace membacking

template <>
struct std::hash<membacking::RegionId> {
    std::size_t operator()(membacking::RegionId id) const noexcept
    {
        return std::hash<std::uint64_t>{}(id.value);
    }
};
