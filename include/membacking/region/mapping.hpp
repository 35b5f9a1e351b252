/**
 * @file region/mapping.hpp
 * Layer: region (includes base/ and va/mappable.hpp).
 *
 * The mapping vocabulary: what backs a piece of a region (MappingBacking), a mapping placed inside
 * a region at region-relative offsets (RegionMapping), and the absolute-GPA form the region
 * manager hands to VA mappers (ActiveMapping) and the region form it hands to partitions
 * (RegionActivation).
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/units.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/va/mappable.hpp>

#include <cstdint>
#include <utility>

namespace membacking {

/// What backs a mapping: a range of a mappable object, or private anonymous memory.
struct MappingBacking {
    Mappable object;               ///< empty for private memory
    std::uint64_t file_offset = 0; ///< offset of the mapping's first byte in object

    /// The part of `object` from `offset` on.
    [[nodiscard]] static MappingBacking file(Mappable object, Offset offset)
    {
        return {std::move(object), offset.value()};
    }
    [[nodiscard]] static MappingBacking private_memory() { return {}; }

    [[nodiscard]] bool is_private() const noexcept { return object.empty(); }

    /// The backing of the part that starts delta bytes further in.
    [[nodiscard]] MappingBacking advanced(std::uint64_t delta) const
    {
        return is_private() ? MappingBacking{} : MappingBacking{object, file_offset + delta};
    }

    friend bool operator==(const MappingBacking&, const MappingBacking&) noexcept = default;
};

/// A mapping inside a region; `range` is relative to the region's start. Build it with designated
/// initializers: {.range = MemoryRange::constant(0, 0x10000), .backing =
/// MappingBacking::file(object, Offset{0}), .writable = true}.
struct RegionMapping {
    MemoryRange range;
    MappingBacking backing;
    bool writable = true;
    MemoryPolicy policy;

    /// The part of this mapping covering `part` (which must lie inside `range`).
    [[nodiscard]] RegionMapping slice(const MemoryRange& part) const
    {
        MEMBACKING_CHECK(range.contains(part), "RegionMapping::slice outside the mapping");
        return {part, backing.advanced(part.start() - range.start()), writable, policy};
    }
};

/// A mapping as the VA mappers see it: at absolute GPAs, with its effective writability
/// (mapping writable AND region writable).
struct ActiveMapping {
    MemoryRange gpa;
    MappingBacking backing; ///< file_offset corresponds to gpa.start()
    bool writable = false;
    MappingType type = MappingType::Ram;
    MemoryPolicy policy;
    RegionId region;

    /// The part of this mapping covering `part` (which must lie inside `gpa`).
    [[nodiscard]] ActiveMapping slice(const MemoryRange& part) const
    {
        MEMBACKING_CHECK(gpa.contains(part), "ActiveMapping::slice outside the mapping");
        return {part, backing.advanced(part.start() - gpa.start()), writable, type, policy, region};
    }
};

/// A region as the partitions see it: one GPA window with one set of permissions. Partitions
/// never see individual mappings; they map the VA mapper's linear range.
struct RegionActivation {
    MemoryRange gpa;
    /// The region's params, with writable = region writable AND every mapping in it writable, so
    /// that a read-only mapping is never writable through the hypervisor.
    MapParams params;
    RegionId region;
    MappingType type = MappingType::Ram;
};

} // namespace membacking
