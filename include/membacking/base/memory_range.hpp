/**
 * @file base/memory_range.hpp
 * Layer: base.
 *
 * MemoryRange: a half-open, page-aligned [start, end). The only ways to build one from untrusted
 * numbers are the checked factories, which return an error for unaligned, reversed or overflowing
 * bounds; a MemoryRange object therefore always satisfies its invariant. It prints as
 * "0x0-0x100000", the form every error message uses.
 *
 * A MemoryRange is either absolute (GPAs: a region's range) or relative (offsets inside a region:
 * a mapping's range), so its bounds are plain std::uint64_t. The factories that take a start and
 * a size take strong types (Gpa or Offset, and Length), so start and size cannot be swapped:
 *     MemoryRange::from(Gpa{0xfe000000}, 64_KiB)        checked: Result<MemoryRange>
 *     MemoryRange::create(start, end)                    checked: Result<MemoryRange>
 *     MemoryRange::constant(0xc0000, 0xc4000)            consteval: a bad constant does not compile
 *     MemoryRange::valid_or_abort(start, end)            fatal on bad bounds: for bounds already
 *                                                        proven valid, never for input
 */
#pragma once

#include <membacking/base/align.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>

#include <algorithm>
#include <compare>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <utility>

namespace membacking {

namespace detail {
// Not constexpr on purpose: a MemoryRange::constant that reaches it is a compile error naming it.
// (Where constant() is only constexpr, MEMBACKING_CONSTEVAL, one evaluated at run time stops here.)
[[noreturn]] inline void memory_range_constant_is_unaligned_or_reversed() noexcept
{
    fatal("MemoryRange::constant given unaligned or reversed bounds");
}
} // namespace detail

class MemoryRange {
public:
    /// The empty range [0, 0).
    constexpr MemoryRange() noexcept = default;

    /// [start, end), or errc::invalid_range if either bound is unaligned or end < start.
    [[nodiscard]] static Result<MemoryRange> create(std::uint64_t start, std::uint64_t end)
    {
        if (!is_page_aligned(start) || !is_page_aligned(end) || end < start)
            return make_error(errc::invalid_range,
                              "invalid memory range " + hex(start) + "-" + hex(end) +
                                  " (bounds must be 4 KiB aligned and ordered)");
        return MemoryRange(start, end);
    }

    /// The GPAs [start, start + size), or errc::invalid_range if unaligned or it overflows.
    [[nodiscard]] static Result<MemoryRange> from(Gpa start, Length size)
    {
        return from_start_and_size(start.value(), size.value());
    }
    /// The offsets [start, start + size) inside a region or object; errors as above.
    [[nodiscard]] static Result<MemoryRange> from(Offset start, Length size)
    {
        return from_start_and_size(start.value(), size.value());
    }

    /// A compile-time constant [start, end): unaligned or reversed bounds do not compile (the
    /// error names detail::memory_range_constant_is_unaligned_or_reversed).
    [[nodiscard]] static MEMBACKING_CONSTEVAL MemoryRange constant(std::uint64_t start,
                                                                   std::uint64_t end)
    {
        if (!is_page_aligned(start) || !is_page_aligned(end) || start > end)
            detail::memory_range_constant_is_unaligned_or_reversed();
        return MemoryRange(start, end);
    }

    /// [start, end) for bounds the caller has already proven valid: invalid bounds abort the
    /// process (the library's fatal path), so never pass input through here; use create/from.
    [[nodiscard]] static constexpr MemoryRange valid_or_abort(std::uint64_t start,
                                                              std::uint64_t end)
    {
        MEMBACKING_CHECK(is_page_aligned(start) && is_page_aligned(end) && start <= end,
                         "MemoryRange::valid_or_abort given an invalid range");
        return MemoryRange(start, end);
    }

    [[nodiscard]] constexpr std::uint64_t start() const noexcept { return start_; }
    [[nodiscard]] constexpr std::uint64_t end() const noexcept { return end_; }
    [[nodiscard]] constexpr std::uint64_t size() const noexcept { return end_ - start_; }
    /// size() as a Length, for the APIs that take one.
    [[nodiscard]] constexpr Length length() const noexcept { return Length(end_ - start_); }
    [[nodiscard]] constexpr bool empty() const noexcept { return start_ == end_; }

    /// True if the ranges share at least one byte (an empty range overlaps nothing).
    [[nodiscard]] constexpr bool overlaps(const MemoryRange& other) const noexcept
    {
        // The emptiness test matters: [0x1000,0x3000) and [0x2000,0x2000) pass the two bound
        // comparisons, yet share no byte.
        return !empty() && !other.empty() && end_ > other.start_ && start_ < other.end_;
    }
    /// True if other lies entirely inside this range.
    [[nodiscard]] constexpr bool contains(const MemoryRange& other) const noexcept
    {
        return start_ <= other.start_ && end_ >= other.end_;
    }
    [[nodiscard]] constexpr bool contains(std::uint64_t addr) const noexcept
    {
        return addr >= start_ && addr < end_;
    }

    /// The shared part, or the empty range if none.
    [[nodiscard]] constexpr MemoryRange intersection(const MemoryRange& other) const noexcept
    {
        const std::uint64_t s = std::max(start_, other.start_);
        const std::uint64_t e = std::min(end_, other.end_);
        return s < e ? MemoryRange(s, e) : MemoryRange();
    }

    /// Splits at start + offset into [start, start+offset) and [start+offset, end);
    /// errc::invalid_range if offset is unaligned or beyond size().
    [[nodiscard]] Result<std::pair<MemoryRange, MemoryRange>> split(std::uint64_t offset) const
    {
        if (!is_page_aligned(offset) || offset > size())
            return make_error(errc::invalid_range,
                              "cannot split " + to_string() + " at offset " + hex(offset));
        return std::pair{MemoryRange(start_, start_ + offset), MemoryRange(start_ + offset, end_)};
    }

    /// The part of this range at [start + inner.start, start + inner.end): `inner` is relative.
    /// errc::out_of_range if inner does not fit inside size().
    [[nodiscard]] Result<MemoryRange> subrange(const MemoryRange& inner) const
    {
        if (inner.end_ > size())
            return make_error(errc::out_of_range, "offset range " + inner.to_string() +
                                                      " does not fit in " + to_string());
        return MemoryRange(start_ + inner.start_, start_ + inner.end_);
    }

    /// This range moved down by delta (absolute GPA to region offset); delta > start() is a bug.
    [[nodiscard]] constexpr MemoryRange shifted_down(std::uint64_t delta) const
    {
        MEMBACKING_CHECK(delta <= start_, "MemoryRange::shifted_down below zero");
        return valid_or_abort(start_ - delta, end_ - delta);
    }

    /// "0x1000-0x3000".
    [[nodiscard]] std::string to_string() const { return hex(start_) + "-" + hex(end_); }

    friend constexpr bool operator==(const MemoryRange&, const MemoryRange&) noexcept = default;
    friend constexpr auto operator<=>(const MemoryRange&, const MemoryRange&) noexcept = default;

    friend std::ostream& operator<<(std::ostream& os, const MemoryRange& r)
    {
        return os << r.to_string();
    }

    /// "0x1f" style formatting shared by every message that names an address.
    [[nodiscard]] static std::string hex(std::uint64_t v) { return detail::hex_string(v); }

private:
    [[nodiscard]] static Result<MemoryRange> from_start_and_size(std::uint64_t start,
                                                                 std::uint64_t size)
    {
        const auto end = checked_add(start, size);
        if (!end)
            return make_error(errc::invalid_range, "invalid memory range at " + hex(start) +
                                                       " of size " + hex(size) +
                                                       " (overflows the address space)");
        return create(start, *end);
    }

    constexpr MemoryRange(std::uint64_t start, std::uint64_t end) noexcept
        : start_(start), end_(end)
    {}

    std::uint64_t start_ = 0;
    std::uint64_t end_ = 0;
};

} // namespace membacking
