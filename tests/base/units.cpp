// The strong types of base/units.hpp: the arithmetic that means something compiles and is
// std::uint64_t's, the arithmetic that does not is absent, literals and formatting.
#include <membacking/base/units.hpp>

#include "test_support.hpp"

#include <sstream>

using namespace membacking;
using namespace membacking::literals;

// Zero cost, as far as types can say it: one register-sized, trivially copyable integer.
static_assert(sizeof(Gpa) == 8 && std::is_trivially_copyable_v<Gpa>);
static_assert(sizeof(Length) == 8 && std::is_trivially_copyable_v<Length>);
static_assert(sizeof(Offset) == 8 && std::is_trivially_copyable_v<Offset>);

// No implicit conversions, in any direction.
static_assert(!std::is_convertible_v<std::uint64_t, Gpa>);
static_assert(!std::is_convertible_v<std::uint64_t, Length>);
static_assert(!std::is_convertible_v<Gpa, std::uint64_t>);
static_assert(!std::is_convertible_v<Length, Gpa> && !std::is_convertible_v<Gpa, Length>);
static_assert(!std::is_convertible_v<Offset, Length> && !std::is_convertible_v<Offset, Gpa>);

// Only the meaningful arithmetic exists.
template <class A, class B>
constexpr bool can_add = requires(A a, B b)
{
    a + b;
};
template <class A, class B>
constexpr bool can_subtract = requires(A a, B b)
{
    a - b;
};
template <class A, class B>
constexpr bool can_compare = requires(A a, B b)
{
    a < b;
};
static_assert(can_add<Gpa, Length> && can_add<Offset, Length> && can_add<Length, Length>);
static_assert(!can_add<Gpa, Gpa> && !can_add<Length, Gpa> && !can_add<Gpa, Offset>);
static_assert(!can_add<Offset, Offset> && !can_add<Gpa, std::uint64_t>);
static_assert(can_subtract<Gpa, Gpa> && can_subtract<Gpa, Length>);
static_assert(can_subtract<Offset, Offset> && !can_subtract<Gpa, Offset>);
static_assert(!can_compare<Gpa, Length> && !can_compare<Offset, Gpa>);
static_assert(!can_compare<Gpa, std::uint64_t>);

static_assert(std::is_same_v<decltype(Gpa{} + Length{}), Gpa>);
static_assert(std::is_same_v<decltype(Gpa{} - Gpa{}), Length>);
static_assert(std::is_same_v<decltype(Offset{} + Length{}), Offset>);
static_assert(std::is_same_v<decltype(Offset{} - Offset{}), Length>);

TEST_CASE("units: arithmetic and comparisons")
{
    const Gpa bar{0xfe000000};
    const Gpa end = bar + 64_KiB;
    CHECK(end.value() == 0xfe010000);
    CHECK(end - bar == 64_KiB);
    CHECK(end - 64_KiB == bar);
    CHECK(bar < end);
    Gpa g = bar;
    g += 4_KiB;
    CHECK(g == 0xfe001000_gpa);

    CHECK(Offset{0x1000} + 4_KiB == Offset{0x2000});
    CHECK(Offset{0x3000} - Offset{0x1000} == 8_KiB);
    CHECK(4_KiB + 4_KiB == 8_KiB);
    CHECK(2_MiB - 1_MiB == 1_MiB);
    CHECK(3 * 4_KiB == Length{0x3000});
    CHECK(4_KiB * 4 == 16_KiB);
    CHECK(1_GiB == Length{std::uint64_t{1} << 30});
    CHECK(1_MiB == Length{0x100000});
}

TEST_CASE("units: the arithmetic is uint64's; checked_add says when it wraps")
{
    const Gpa top{~std::uint64_t{0} - 0xfff};
    CHECK(top + 8_KiB == 0x1000_gpa); // wraps, like the integer: never fatal
    CHECK_FALSE(checked_add(top, 8_KiB).has_value());
    CHECK_FALSE(checked_add(top, 4_KiB).has_value()); // one past the last byte
    CHECK(checked_add(top, Length{0xfff}) == std::optional<Gpa>(Gpa{~std::uint64_t{0}}));
    CHECK(checked_add(Offset{1}, Length{2}) == std::optional<Offset>(Offset{3}));
    CHECK_FALSE(checked_add(Offset{~std::uint64_t{0}}, Length{1}).has_value());
    CHECK_FALSE(checked_add(Length{~std::uint64_t{0}}, Length{1}).has_value());
}

TEST_CASE("units: hex formatting, as MemoryRange prints")
{
    CHECK(to_string(0xfe000000_gpa) == "0xfe000000");
    CHECK(to_string(4_KiB) == "0x1000");
    CHECK(to_string(Offset{0}) == "0x0");
    std::ostringstream os;
    os << Gpa{0x1f} << " " << Length{0x20} << " " << Offset{0x21};
    CHECK(os.str() == "0x1f 0x20 0x21");
}

namespace {
/// The literals inside a template: clang 14 left a consteval literal's call there to the linker
/// (an undefined reference), so this test case failed to link before units.hpp fell back to
/// constexpr for it.
template <class Unit>
Unit first_page_end()
{
    return Unit{(0x1000_gpa).value() + (4_KiB).value() + (2_MiB).value() + (1_GiB).value()};
}
} // namespace

TEST_CASE("units: the literals work inside templates (clang 14 included)")
{
    CHECK(first_page_end<Gpa>() == Gpa{0x1000 + 0x1000 + 0x200000 + 0x40000000});
    CHECK(first_page_end<Length>() == Length{0x1000 + 0x1000 + 0x200000 + 0x40000000});
}
