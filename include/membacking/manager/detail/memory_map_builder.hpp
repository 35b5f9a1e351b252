/**
 * @file manager/detail/memory_map_builder.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/, manager/memory_map.hpp).
 *
 * Builds the MemoryMap snapshot (manager/memory_map.hpp) from the region manager's books, the
 * attached partitions (PartitionSet::describe) and the VA mapper count. What each partition was
 * given for a visible region is the window the partition set maps into every attached partition
 * (RegionActivation: the region's params narrowed by its mappings), at each partition's offset. The
 * manager calls it under its control lock; it only reads.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/units.hpp>
#include <membacking/manager/memory_map.hpp>
#include <membacking/region/mapping.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace membacking::detail {

/// The map of `regions` (a RegionManager), with these partitions and VA mappers.
template <class Regions>
[[nodiscard]] MemoryMap build_memory_map(const Regions& regions,
                                         std::vector<MemoryMap::Partition> partitions,
                                         std::size_t va_mappers, Gpa max_address)
{
    MemoryMap map;
    map.max_address = max_address;
    map.va_mappers = va_mappers;
    for (const auto& [id, r] : regions.regions()) {
        MemoryMap::Region out{id,           r.name,     r.range,         r.priority, r.type,
                              r.map_params, r.active(), r.read_only_cap, {},         {}};
        // What the VA side and partitions get: a read-only cap above makes mappings read-only.
        const bool writable = !r.map_params || regions.exposed_params(r, *r.map_params).writable;
        for (const auto& [off, m] : r.mappings)
            out.mappings.push_back({MemoryRange::valid_or_abort(r.range.start() + m.range.start(),
                                                                r.range.start() + m.range.end()),
                                    m.writable && writable, m.backing.is_private(),
                                    m.backing.object.identity(), m.backing.file_offset});
        map.regions.push_back(std::move(out));
    }
    // Regions are still in id order here (regions() is a map by id): find each window's region.
    for (const RegionActivation& act : regions.active_regions()) {
        const auto it = std::ranges::lower_bound(map.regions, act.region, std::less<>{},
                                                 &MemoryMap::Region::id);
        if (it == map.regions.end() || it->id != act.region)
            continue;
        for (const MemoryMap::Partition& p : partitions)
            it->given.push_back({p.id, p.offset, act.params.writable, act.params.executable});
    }
    map.partitions = std::move(partitions);
    map.sort();
    return map;
}

} // namespace membacking::detail
