/**
 * @file manager/x86_legacy.hpp
 * Layer: manager (includes base/ and manager/types.hpp only).
 *
 * The PC's legacy first megabyte, as GuestMemoryBuilder::x86_legacy_support splits it and as a
 * VMM's chipset model addresses it: named ranges, the twelve 16 KiB PAM segments, the region
 * names the builder gives them, and the i440FX PAM registers' mapping onto them. A VMM indexes
 * these instead of hard-coding 0xc8000 or parsing region names:
 *
 *     // i440FX config write: PAM register `reg` (0..6, config 0x59 + reg), nibble 0 or 1
 *     if (auto r = x86_legacy::pam_range(reg, nibble))
 *         control.set_ram_visibility(*r, x86_legacy::pam_visibility(value >> (4 * nibble)));
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/units.hpp>
#include <membacking/manager/types.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace membacking::x86_legacy {

/// The end of the legacy area: the builder splits the RAM range that starts at 0 up to here.
inline constexpr std::uint64_t end = 0x100000;

/// Conventional memory, 0-640 KiB.
inline constexpr MemoryRange low_ram = MemoryRange::constant(0, 0xa0000);
/// The VGA window (0xa0000-0xc0000): SMRAM / VGA memory on a PC.
inline constexpr MemoryRange vga_window = MemoryRange::constant(0xa0000, 0xc0000);
/// The size of one PAM segment.
inline constexpr Length pam_segment_size{0x4000};
/// The twelve 16 KiB PAM segments, 0xc0000-0xf0000 (expansion ROMs and shadow RAM).
inline constexpr std::size_t pam_segment_count = 12;
inline constexpr std::array<MemoryRange, pam_segment_count> pam_segments = {
    MemoryRange::constant(0xc0000, 0xc4000), MemoryRange::constant(0xc4000, 0xc8000),
    MemoryRange::constant(0xc8000, 0xcc000), MemoryRange::constant(0xcc000, 0xd0000),
    MemoryRange::constant(0xd0000, 0xd4000), MemoryRange::constant(0xd4000, 0xd8000),
    MemoryRange::constant(0xd8000, 0xdc000), MemoryRange::constant(0xdc000, 0xe0000),
    MemoryRange::constant(0xe0000, 0xe4000), MemoryRange::constant(0xe4000, 0xe8000),
    MemoryRange::constant(0xe8000, 0xec000), MemoryRange::constant(0xec000, 0xf0000),
};
/// The 64 KiB F segment (0xf0000-0x100000): the system BIOS, one PAM attribute as a whole.
inline constexpr MemoryRange f_segment = MemoryRange::constant(0xf0000, end);

/// One controllable range of the split and the name of its RAM region.
struct Range {
    MemoryRange range;
    std::string_view name;
};

/// Every range of the split, in ascending GPA order, with the name of the RAM region the builder
/// creates for it (MemoryMap::find_region finds it by that name). The RAM above 1 MiB that the
/// same range continues into is named as any RAM range is (see GuestMemoryBuilder).
inline constexpr std::array<Range, 3 + pam_segment_count> ranges = {{
    {low_ram, "ram-low"},
    {vga_window, "ram-vga"},
    {pam_segments[0], "ram-pam-0xc0000"},
    {pam_segments[1], "ram-pam-0xc4000"},
    {pam_segments[2], "ram-pam-0xc8000"},
    {pam_segments[3], "ram-pam-0xcc000"},
    {pam_segments[4], "ram-pam-0xd0000"},
    {pam_segments[5], "ram-pam-0xd4000"},
    {pam_segments[6], "ram-pam-0xd8000"},
    {pam_segments[7], "ram-pam-0xdc000"},
    {pam_segments[8], "ram-pam-0xe0000"},
    {pam_segments[9], "ram-pam-0xe4000"},
    {pam_segments[10], "ram-pam-0xe8000"},
    {pam_segments[11], "ram-pam-0xec000"},
    {f_segment, "ram-f-segment"},
}};

/// The index in pam_segments of the segment that holds `gpa`, if one does.
[[nodiscard]] constexpr std::optional<std::size_t> pam_segment_index(Gpa gpa) noexcept
{
    const std::uint64_t g = gpa.value();
    if (g < pam_segments.front().start() || g >= pam_segments.back().end())
        return std::nullopt;
    return static_cast<std::size_t>((g - pam_segments.front().start()) / pam_segment_size.value());
}

/// The i440FX PAM registers: PAM0..PAM6 at PCI config 0x59..0x5f of the host bridge.
inline constexpr std::uint8_t pam_register_count = 7;
inline constexpr std::uint8_t pam_config_offset = 0x59;

/// The range one PAM attribute nibble controls: register `reg` (0 = PAM0), nibble 0 (bits 3:0)
/// or 1 (bits 7:4). PAM0's high nibble is the F segment, its low nibble is reserved (nullopt);
/// PAMn (n = 1..6) covers segments 2(n-1) (low nibble) and 2(n-1)+1 (high nibble). Anything out
/// of range: nullopt.
[[nodiscard]] constexpr std::optional<MemoryRange> pam_range(unsigned reg, unsigned nibble) noexcept
{
    if (reg >= pam_register_count || nibble > 1)
        return std::nullopt;
    if (reg == 0)
        return nibble == 1 ? std::optional<MemoryRange>(f_segment) : std::nullopt;
    return pam_segments[2 * (reg - 1) + nibble];
}

/// What an i440FX PAM attribute nibble asks for: bit 0 is RE (reads from RAM), bit 1 is WE
/// (writes to RAM): 0 unmapped, 1 read_only, 2 write_only, 3 read_write. Higher bits (reserved)
/// are ignored.
[[nodiscard]] constexpr RamVisibility pam_visibility(unsigned attribute) noexcept
{
    switch (attribute & 3U) {
    case 1: return RamVisibility::read_only;
    case 2: return RamVisibility::write_only;
    case 3: return RamVisibility::read_write;
    default: return RamVisibility::unmapped;
    }
}

} // namespace membacking::x86_legacy
