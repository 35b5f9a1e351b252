/**
 * @file base/params.hpp
 * Layer: base.
 *
 * Small value types shared by every layer: how a region is mapped (MapParams, Protection), what
 * kind of memory it is (MappingType) and host-side placement hints for a mapping (MemoryPolicy).
 *
 * The structs are meant for designated initializers (`MapParams{.writable = true, .executable =
 * true}`): three positional bools are as easy to swap as three integers.
 */
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace membacking {

/// Whether the guest may write a mapping: what a positional argument says instead of a bare
/// `bool writable` (`map_to_guest(gpa, Protection::read_only)`, not `map_to_guest(gpa, false)`).
/// The zero value is the stricter one, so an omitted field is read-only.
enum class Protection : std::uint8_t { read_only, read_write };

[[nodiscard]] constexpr bool is_writable(Protection p) noexcept
{
    return p == Protection::read_write;
}

/// How a region is exposed while it is mapped.
struct MapParams {
    bool writable = false;
    bool executable = false;
    /// Ask partitions to populate the region's second-level page tables when it is mapped.
    bool prefetch = false;

    friend constexpr bool operator==(const MapParams&, const MapParams&) noexcept = default;
};

/// What a region holds. RAM is guest memory proper (shareable, IOMMU failures fatal); Device is
/// memory a device exposes, such as a BAR or a DAX window.
enum class MappingType : std::uint8_t { Ram, Device };

[[nodiscard]] constexpr std::string_view to_string(MappingType t) noexcept
{
    return t == MappingType::Ram ? "ram" : "device";
}

/// Host-side placement for one mapping. Transparent huge pages are advice: a kernel that
/// refuses it (THP "never") is counted in MappingStats::hint_failures, not an error. A NUMA node
/// is a requirement: memory silently placed on another node is a performance bug nobody would
/// find, so a binding the kernel refuses fails the map, which then changes nothing.
struct MemoryPolicy {
    std::optional<std::uint32_t> numa_node; ///< mbind the pages to this host node
    bool transparent_hugepages = false;     ///< madvise(MADV_HUGEPAGE)
    bool prefetch = false;                  ///< populate the VA when mapped

    friend constexpr bool operator==(const MemoryPolicy&, const MemoryPolicy&) noexcept = default;
};

} // namespace membacking
