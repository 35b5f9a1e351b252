#include <membacking/base/memory_range.hpp>

#include "test_support.hpp"

#include <sstream>

using membacking::errc;
using membacking::MemoryRange;
using membacking::test::range;

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

TEST_CASE("MemoryRange: from_size rejects overflow instead of wrapping")
{
    auto wraps = MemoryRange::from_size(0xffff'ffff'ffff'f000, 0x2000);
    REQUIRE_FALSE(wraps.has_value());
    CHECK(membacking::test::error_of(wraps) == errc::invalid_range);
    auto ok = MemoryRange::from_size(0x10000, 0x3000);
    REQUIRE(ok.has_value());
    CHECK(*ok == range(0x10000, 0x13000));
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
