/**
 * @file base/units.hpp
 * Layer: base (includes base/fatal.hpp only).
 *
 * Strong types for the three kinds of number the public API takes, so that passing one where
 * another belongs (a length as an address, a file offset as a region offset) does not compile:
 * - Gpa: a guest physical address.
 * - Length: a byte count: the size of a range, how far apart two addresses are.
 * - Offset: a byte offset inside a region or inside a mappable object.
 *
 * Each is one std::uint64_t with an explicit constructor and value(); trivially copyable and
 * standard layout, so it travels in one general register exactly like the integer (x86-64 SysV
 * and Windows x64 pass 8-byte trivially copyable classes in registers): they cost nothing on the
 * access path (bench/count_instructions.sh counts the same instructions per access as before).
 *
 * Only the arithmetic that means something exists: Gpa + Length -> Gpa, Gpa - Length -> Gpa,
 * Gpa - Gpa -> Length, Offset + Length -> Offset, Offset - Offset -> Length, Length + Length,
 * Length - Length, Length * count; comparisons within one type. It is std::uint64_t's arithmetic,
 * modulo 2^64 and never fatal, because the operands are often guest-supplied: use checked_add
 * (std::nullopt on overflow) before trusting a sum computed from guest values. (The library
 * checks every range it is given; a wrapped sum is an error there, never memory.)
 *
 * They print in hex ("0x1000"), as MemoryRange and every error message do. User-defined
 * literals are in membacking::literals: 0xfe000000_gpa, 4_KiB, 2_MiB, 1_GiB (the last three are
 * Lengths; an overflowing one is a compile error).
 */
#pragma once

#include <membacking/base/fatal.hpp>

#include <compare>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <ostream>
#include <string>
#include <type_traits>

namespace membacking {

namespace detail {
/// "0x1f": the one hex formatting of every address, length and offset the library prints.
[[nodiscard]] inline std::string hex_string(std::uint64_t v)
{
    char buf[2 + 16 + 1];
    (void)std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
    return buf;
}
} // namespace detail

/// A byte count.
class Length {
public:
    constexpr Length() noexcept = default;
    constexpr explicit Length(std::uint64_t bytes) noexcept : bytes_(bytes) {}

    [[nodiscard]] constexpr std::uint64_t value() const noexcept { return bytes_; }

    friend constexpr Length operator+(Length a, Length b) noexcept
    {
        return Length(a.bytes_ + b.bytes_);
    }
    friend constexpr Length operator-(Length a, Length b) noexcept
    {
        return Length(a.bytes_ - b.bytes_);
    }
    friend constexpr Length operator*(Length a, std::uint64_t n) noexcept
    {
        return Length(a.bytes_ * n);
    }
    friend constexpr Length operator*(std::uint64_t n, Length a) noexcept
    {
        return Length(n * a.bytes_);
    }
    constexpr Length& operator+=(Length b) noexcept
    {
        bytes_ += b.bytes_;
        return *this;
    }
    constexpr Length& operator-=(Length b) noexcept
    {
        bytes_ -= b.bytes_;
        return *this;
    }

    friend constexpr bool operator==(Length, Length) noexcept = default;
    friend constexpr auto operator<=>(Length, Length) noexcept = default;

private:
    std::uint64_t bytes_ = 0;
};

/// A guest physical address.
class Gpa {
public:
    constexpr Gpa() noexcept = default;
    constexpr explicit Gpa(std::uint64_t address) noexcept : address_(address) {}

    [[nodiscard]] constexpr std::uint64_t value() const noexcept { return address_; }

    friend constexpr Gpa operator+(Gpa a, Length n) noexcept { return Gpa(a.address_ + n.value()); }
    friend constexpr Gpa operator-(Gpa a, Length n) noexcept { return Gpa(a.address_ - n.value()); }
    /// How far b lies below a (wraps if it does not).
    friend constexpr Length operator-(Gpa a, Gpa b) noexcept
    {
        return Length(a.address_ - b.address_);
    }
    constexpr Gpa& operator+=(Length n) noexcept
    {
        address_ += n.value();
        return *this;
    }

    friend constexpr bool operator==(Gpa, Gpa) noexcept = default;
    friend constexpr auto operator<=>(Gpa, Gpa) noexcept = default;

private:
    std::uint64_t address_ = 0;
};

/// A byte offset inside a region or a mappable object.
class Offset {
public:
    constexpr Offset() noexcept = default;
    constexpr explicit Offset(std::uint64_t offset) noexcept : offset_(offset) {}

    [[nodiscard]] constexpr std::uint64_t value() const noexcept { return offset_; }

    friend constexpr Offset operator+(Offset a, Length n) noexcept
    {
        return Offset(a.offset_ + n.value());
    }
    /// How far b lies below a (wraps if it does not).
    friend constexpr Length operator-(Offset a, Offset b) noexcept
    {
        return Length(a.offset_ - b.offset_);
    }
    constexpr Offset& operator+=(Length n) noexcept
    {
        offset_ += n.value();
        return *this;
    }

    friend constexpr bool operator==(Offset, Offset) noexcept = default;
    friend constexpr auto operator<=>(Offset, Offset) noexcept = default;

private:
    std::uint64_t offset_ = 0;
};

// The zero-cost claim, as far as the type system can state it (the instruction counts of
// bench/guest_access.cpp state the rest).
template <class T>
inline constexpr bool
    is_register_sized_unit = sizeof(T) == sizeof(std::uint64_t) &&
                             std::is_trivially_copyable_v<T>&& std::is_standard_layout_v<T>;
static_assert(is_register_sized_unit<Gpa> && is_register_sized_unit<Length> &&
              is_register_sized_unit<Offset>);

/// a + n, or std::nullopt if it passes the end of the 64-bit address space.
[[nodiscard]] constexpr std::optional<Gpa> checked_add(Gpa a, Length n) noexcept
{
    if (a.value() > UINT64_MAX - n.value())
        return std::nullopt;
    return a + n;
}
[[nodiscard]] constexpr std::optional<Offset> checked_add(Offset a, Length n) noexcept
{
    if (a.value() > UINT64_MAX - n.value())
        return std::nullopt;
    return a + n;
}
[[nodiscard]] constexpr std::optional<Length> checked_add(Length a, Length b) noexcept
{
    if (a.value() > UINT64_MAX - b.value())
        return std::nullopt;
    return a + b;
}

/// "0x1000".
[[nodiscard]] inline std::string to_string(Gpa v)
{
    return detail::hex_string(v.value());
}
[[nodiscard]] inline std::string to_string(Length v)
{
    return detail::hex_string(v.value());
}
[[nodiscard]] inline std::string to_string(Offset v)
{
    return detail::hex_string(v.value());
}
inline std::ostream& operator<<(std::ostream& os, Gpa v)
{
    return os << to_string(v);
}
inline std::ostream& operator<<(std::ostream& os, Length v)
{
    return os << to_string(v);
}
inline std::ostream& operator<<(std::ostream& os, Offset v)
{
    return os << to_string(v);
}

namespace detail {
// Not constexpr on purpose: a literal that reaches it is a compile error naming it. (Where the
// literals are only constexpr, MEMBACKING_CONSTEVAL, one evaluated at run time stops here.)
[[noreturn]] inline void unit_literal_overflows_64_bits() noexcept
{
    fatal("a unit literal overflows 64 bits");
}

template <unsigned Shift>
MEMBACKING_CONSTEVAL Length scaled_length(unsigned long long n)
{
    if (n > (UINT64_MAX >> Shift))
        unit_literal_overflows_64_bits();
    return Length(static_cast<std::uint64_t>(n) << Shift);
}
} // namespace detail

namespace literals {
/// 0xfe000000_gpa
MEMBACKING_CONSTEVAL Gpa operator""_gpa(unsigned long long address)
{
    return Gpa(address);
}
/// 4_KiB, 2_MiB, 1_GiB: Lengths.
MEMBACKING_CONSTEVAL Length operator""_KiB(unsigned long long n)
{
    return detail::scaled_length<10>(n);
}
MEMBACKING_CONSTEVAL Length operator""_MiB(unsigned long long n)
{
    return detail::scaled_length<20>(n);
}
MEMBACKING_CONSTEVAL Length operator""_GiB(unsigned long long n)
{
    return detail::scaled_length<30>(n);
}
} // namespace literals

} // namespace membacking
