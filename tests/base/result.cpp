#include <membacking/base/memory_size.hpp>
#include <membacking/base/result.hpp>

#include "test_support.hpp"

#include <cerrno>
#include <memory>
#include <string>

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

TEST_CASE("Result has std::expected's verbs")
{
    CHECK(half(8).value_or(-1) == 4);
    CHECK(half(3).value_or(-1) == -1);
    CHECK(half(8).error_or(make_error(errc::conflict, "none")).code() == errc::conflict);
    CHECK(half(3).error_or(make_error(errc::conflict, "none")).code() == errc::invalid_argument);

    // and_then: the next step on the value, or the error passed through.
    CHECK(*half(8).and_then(half) == 2);
    auto odd = half(6).and_then(half);
    REQUIRE_FALSE(odd);
    CHECK(odd.error().message() == "odd value 3");
    // transform: a plain function of the value; a void one gives Result<void>.
    Result<std::string> text = half(8).transform([](int v) { return std::to_string(v); });
    CHECK(*text == "4");
    int seen = 0;
    Result<void> done = half(8).transform([&](int v) { seen = v; });
    CHECK(done.has_value());
    CHECK(seen == 4);
    CHECK(membacking::test::error_of(half(1).transform([](int v) { return v; })) ==
          errc::invalid_argument);
    // or_else: recover from an error; transform_error: add context, keeping the root code.
    CHECK(*half(3).or_else([](const Error&) -> Result<int> { return 0; }) == 0);
    CHECK(*half(4).or_else([](const Error&) -> Result<int> { return 0; }) == 2);
    auto wrapped = half(3).transform_error([](Error e) { return std::move(e).context("outer"); });
    REQUIRE_FALSE(wrapped);
    CHECK(wrapped.error().full_message() == "outer: odd value 3");
    CHECK(membacking::test::error_of(wrapped) == errc::invalid_argument);

    // Result<void> and move-only values.
    const Result<void> ok;
    CHECK(*ok.and_then([] { return half(6); }) == 3);
    CHECK(*ok.transform([] { return 5; }) == 5);
    const Result<void> bad = make_error(errc::not_found, "gone");
    CHECK(membacking::test::error_of(bad.and_then([] { return half(6); })) == errc::not_found);
    CHECK(bad.or_else([](const Error&) -> Result<void> { return {}; }).has_value());
    CHECK(bad.transform_error([](const Error& e) { return e.context("while testing"); })
              .error()
              .full_message() == "while testing: gone");
    Result<std::unique_ptr<int>> owned = std::make_unique<int>(7);
    auto moved = std::move(owned).transform([](std::unique_ptr<int> p) { return *p + 1; });
    CHECK(*moved == 8);
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
