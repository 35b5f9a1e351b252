#include <membacking/base/memory_size.hpp>
#include <membacking/base/result.hpp>

#include "test_support.hpp"

#include <cerrno>

using namespace membacking;

namespace {
Result<int> half(int v)
{
    if (v % 2 != 0)
        return make_error(errc::invalid_argument, "odd value " + std::to_string(v));
    return v / 2;
}

Result<void> quarter(int v, int& out)
{
    auto h = half(v);
    if (!h)
        return std::move(h).error().context("cannot quarter " + std::to_string(v));
    MEMBACKING_TRY_CONTEXT(half(*h), "second halving of " + std::to_string(v));
    out = *h / 2;
    return {};
}
} // namespace

TEST_CASE("Result carries a value or an error")
{
    auto ok = half(8);
    REQUIRE(ok.has_value());
    CHECK(*ok == 4);
    auto bad = half(3);
    REQUIRE_FALSE(bad);
    CHECK(membacking::test::error_of(bad) == errc::invalid_argument);
    CHECK(bad.error().message() == "odd value 3");
}

TEST_CASE("Error context keeps the root code and joins the messages")
{
    int out = 0;
    auto r = quarter(6, out);
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::invalid_argument);
    CHECK(r.error().full_message() == "second halving of 6: odd value 3");
    REQUIRE(r.error().source() != nullptr);
    CHECK(r.error().source()->message() == "odd value 3");
    CHECK(quarter(8, out).has_value());
    CHECK(out == 2);
}

TEST_CASE("OS errors use the system category and carry the OS text as source")
{
    const Error e = os_error(ENOMEM, "mmap of 0x1000-0x2000 failed");
    CHECK(e.code() == std::error_code(ENOMEM, std::system_category()));
    CHECK(e.code() == std::errc::not_enough_memory);
    CHECK(e.full_message() == "mmap of 0x1000-0x2000 failed: Cannot allocate memory");
}

TEST_CASE("membacking errc values compare against error codes")
{
    const std::error_code ec = errc::overlap;
    CHECK(ec.category().name() == std::string("membacking"));
    CHECK(ec.message() == "overlapping ranges");
}

TEST_CASE("MemorySize prints the largest exact unit, as the builder's messages do")
{
    CHECK(MemorySize{257 * (std::uint64_t{1} << 20)}.to_string() == "257 MB");
    CHECK(MemorySize{std::uint64_t{1} << 30}.to_string() == "1 GB");
    CHECK(MemorySize{std::uint64_t{3} << 40}.to_string() == "3 TB");
    CHECK(MemorySize{2048}.to_string() == "2 KB");
    CHECK(MemorySize{4097}.to_string() == "4097 bytes");
    CHECK(MemorySize{0}.to_string() == "0 bytes");
}
