#include <membacking/base/memory_range.hpp>

#include "test_support.hpp"

#include <sstream>

using membacking::errc;
using membacking::Gpa;
using membacking::Length;
using membacking::MemoryRange;
using membacking::Offset;
using membacking::test::range;
using namespace membacking::literals;

TEST_CASE("MemoryRange: the checked factory rejects unaligned and reversed bounds")
{
    CHECK(MemoryRange::create(0, 0x1000).has_value());
    CHECK(MemoryRange::create(0x1000, 0x1000).has_value()); // empty is a valid range

    auto unaligned_start = MemoryRange::create(0x1001, 0x2000);
    REQUIRE_FALSE(unaligned_start.has_value());
    CHECK(membacking::test::error_of(unaligned_start) == errc::invalid_range);
    CHECK(unaligned_start.error().message().find("0x1001-0x2000") != std::string::npos);

    CHECK_FALSE(MemoryRange::create(0, 0x1fff).has_value());
    auto reversed = MemoryRange::create(0x3000, 0x2000);
    REQUIRE_FALSE(reversed.has_value());
    CHECK(membacking::test::error_of(reversed) == errc::invalid_range);
}

TEST_CASE("MemoryRange: from(start, size) rejects overflow instead of wrapping")
{
    auto wraps = MemoryRange::from(Gpa{0xffff'ffff'ffff'f000}, 8_KiB);
    REQUIRE_FALSE(wraps.has_value());
    CHECK(membacking::test::error_of(wraps) == errc::invalid_range);
    auto ok = MemoryRange::from(0x10000_gpa, Length{0x3000});
    REQUIRE(ok.has_value());
    CHECK(*ok == range(0x10000, 0x13000));
    CHECK(ok->length() == 12_KiB);
    auto relative = MemoryRange::from(Offset{0x2000}, 4_KiB);
    REQUIRE(relative.has_value());
    CHECK(*relative == range(0x2000, 0x3000));
    CHECK(membacking::test::error_of(MemoryRange::from(Offset{0x10}, 4_KiB)) ==
          errc::invalid_range);
}

// A swapped start and size does not compile: from takes (Gpa or Offset, Length).
template <class A, class B>
constexpr bool from_accepts = requires(A a, B b)
{
    MemoryRange::from(a, b);
};
static_assert(from_accepts<Gpa, Length> && from_accepts<Offset, Length>);
static_assert(!from_accepts<Length, Gpa> && !from_accepts<Length, Offset>);
static_assert(!from_accepts<std::uint64_t, std::uint64_t>);

TEST_CASE("MemoryRange: constant is evaluated at compile time; valid_or_abort at run time")
{
    constexpr MemoryRange pam = MemoryRange::constant(0xc0000, 0xc4000);
    static_assert(pam.size() == 0x4000);
    CHECK(pam == range(0xc0000, 0xc4000));
    // (An unaligned or reversed constant is a compile error: tests/compile_fail checks that.)
    CHECK(MemoryRange::valid_or_abort(0x1000, 0x3000) == range(0x1000, 0x3000));
}

TEST_CASE("MemoryRange: overlaps, contains and intersection")
{
    const MemoryRange a = range(0x1000, 0x3000);
    CHECK(a.overlaps(range(0x2000, 0x4000)));
    CHECK_FALSE(a.overlaps(range(0x3000, 0x4000))); // half-open: touching is not overlapping
    CHECK_FALSE(a.overlaps(range(0x2000, 0x2000))); // the empty range overlaps nothing
    CHECK(a.contains(range(0x1000, 0x3000)));
    CHECK(a.contains(range(0x2000, 0x3000)));
    CHECK_FALSE(a.contains(range(0x0, 0x2000)));
    CHECK(a.contains(std::uint64_t{0x2fff}));
    CHECK_FALSE(a.contains(std::uint64_t{0x3000}));
    CHECK(a.intersection(range(0x2000, 0x8000)) == range(0x2000, 0x3000));
    CHECK(a.intersection(range(0x5000, 0x8000)).empty());
}

TEST_CASE("MemoryRange: split and subrange are checked")
{
    const MemoryRange a = range(0x10000, 0x20000);
    auto halves = a.split(0x4000);
    REQUIRE(halves.has_value());
    CHECK(halves->first == range(0x10000, 0x14000));
    CHECK(halves->second == range(0x14000, 0x20000));
    CHECK_FALSE(a.split(0x123).has_value());
    CHECK_FALSE(a.split(0x11000).has_value());

    auto sub = a.subrange(range(0x1000, 0x2000));
    REQUIRE(sub.has_value());
    CHECK(*sub == range(0x11000, 0x12000));
    auto outside = a.subrange(range(0xf000, 0x11000));
    REQUIRE_FALSE(outside.has_value());
    CHECK(membacking::test::error_of(outside) == errc::out_of_range);
}

TEST_CASE("MemoryRange: formats as 0x0-0x100000")
{
    CHECK(range(0, 0x100000).to_string() == "0x0-0x100000");
    std::ostringstream os;
    os << range(0xa0000, 0xc0000);
    CHECK(os.str() == "0xa0000-0xc0000");
}

namespace {
/// MemoryRange::constant inside a template: clang 14 left the consteval call there to the linker
/// (an undefined reference) until MEMBACKING_CONSTEVAL made it constexpr for that compiler.
template <class T>
MemoryRange legacy_vga()
{
    return MemoryRange::constant(0xa0000, 0xc0000);
}
} // namespace

TEST_CASE("MemoryRange: constant works inside templates (clang 14 included)")
{
    CHECK(legacy_vga<int>() == MemoryRange::valid_or_abort(0xa0000, 0xc0000));
}
