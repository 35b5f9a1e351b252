/**
 * @file manager/types.hpp
 * Layer: manager (includes base/ only).
 *
 * Small value types of the manager's public surface: VTLs, RAM visibility, partition ids.
 */
#pragma once

#include <compare>
#include <cstdint>
#include <ostream>

namespace membacking {

/// Virtual trust level of a partition. VTL2 partitions also get the VTL0 alias map, if one is
/// configured. No per-VTL protections are modelled (as in the reference).
enum class Vtl : std::uint8_t { vtl0 = 0, vtl1 = 1, vtl2 = 2 };

/// What the guest sees in a controllable RAM range (PAM, VGA window). The values are stable
/// (write_only came last); x86_legacy::pam_visibility maps an i440FX PAM nibble onto them.
enum class RamVisibility : std::uint8_t {
    unmapped,   ///< RAM gone: lower regions (device memory) or MMIO show through
    read_only,  ///< reads see RAM; writes exit to the VMM even over device memory
    read_write, ///< plain RAM
    /// PAM WE=1, RE=0 (a BIOS shadowing itself): reads see what lies below (a ROM), which is
    /// exposed read-only, so guest writes exit to the VMM, which forwards them into the hidden
    /// RAM (RamVisibilityControl::shadow_ram_target); with nothing below, reads and writes exit.
    write_only,
};

/// Whether v is one of RamVisibility's enumerators (a value cast from an integer may not be).
[[nodiscard]] constexpr bool is_valid(RamVisibility v) noexcept
{
    switch (v) { // no default: a new enumerator must be added here (-Wswitch)
    case RamVisibility::unmapped:
    case RamVisibility::read_only:
    case RamVisibility::read_write:
    case RamVisibility::write_only: return true;
    }
    return false;
}

/// Identifies one attached partition (both of its mappings, for a VTL2 partition with an alias).
struct PartitionId {
    std::uint64_t value = 0;
    friend constexpr auto operator<=>(const PartitionId&, const PartitionId&) noexcept = default;
    friend std::ostream& operator<<(std::ostream& os, PartitionId id) { return os << id.value; }
};

} // namespace membacking
