/**
 * @file base/align.hpp
 * Layer: base.
 *
 * Page and alignment arithmetic. Guest pages are 4 KiB (x86-64); every GPA range the library
 * handles is aligned to that. Overflow-checked variants return std::nullopt instead of wrapping,
 * because a wrapped GPA silently aliases low memory.
 */
#pragma once

#include <bit>
#include <cstdint>
#include <optional>

namespace membacking {

/// The guest page size: the granularity of every range, region and mapping.
inline constexpr std::uint64_t page_size = 4096;

[[nodiscard]] constexpr bool is_power_of_two(std::uint64_t v) noexcept
{
    return std::has_single_bit(v);
}

/// True if v is a multiple of align (align must be a power of two).
[[nodiscard]] constexpr bool is_aligned(std::uint64_t v, std::uint64_t align) noexcept
{
    return (v & (align - 1)) == 0;
}

[[nodiscard]] constexpr bool is_page_aligned(std::uint64_t v) noexcept
{
    return is_aligned(v, page_size);
}

[[nodiscard]] constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t align) noexcept
{
    return v & ~(align - 1);
}

/// Rounds v up to align, or nullopt if that overflows.
[[nodiscard]] constexpr std::optional<std::uint64_t> checked_align_up(std::uint64_t v,
                                                                      std::uint64_t align) noexcept
{
    const std::uint64_t mask = align - 1;
    if (v > UINT64_MAX - mask)
        return std::nullopt;
    return (v + mask) & ~mask;
}

/// a + b, or nullopt on overflow.
[[nodiscard]] constexpr std::optional<std::uint64_t> checked_add(std::uint64_t a,
                                                                 std::uint64_t b) noexcept
{
    if (a > UINT64_MAX - b)
        return std::nullopt;
    return a + b;
}

} // namespace membacking
