/**
 * Shared helpers for the unit tests: memfd-backed Mappables (Linux) and doctest printers.
 */
#pragma once

#include <membacking/access/access_result.hpp>
#include <membacking/base/config.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/va/mappable.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if MEMBACKING_OS_LINUX
#    include <sys/mman.h>
#    include <unistd.h>
#endif

namespace membacking::test {

#if MEMBACKING_OS_LINUX
/// A memfd of `size` bytes, owned by the returned Mappable.
inline Mappable make_memfd(std::uint64_t size = 0x10000)
{
    const int fd = ::memfd_create("membacking-test", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
    return Mappable::adopt(fd);
}
#endif

/// The error code of a failed Result, or an empty code if it succeeded (so a CHECK on a result
/// that unexpectedly succeeded fails instead of aborting in error()).
template <class T>
std::error_code error_of(const Result<T>& r)
{
    return r ? std::error_code() : r.error().code();
}

/// The error code of a failed AccessResult, or nullopt if it succeeded.
template <class T>
std::optional<errc> error_of(const AccessResult<T>& r)
{
    return r ? std::nullopt : std::optional<errc>(r.error().code);
}

/// The value of an AccessResult, or nullopt if it failed (a CHECK then fails instead of aborting).
template <class T>
std::optional<T> value_of(const AccessResult<T>& r)
{
    return r ? std::optional<T>(r.value()) : std::nullopt;
}

/// The value of a Result that the test needs to go on; a failure stops the test case with the
/// error's full message.
template <class T>
T must(Result<T> r)
{
    REQUIRE_MESSAGE(r.has_value(), (r ? std::string() : r.error().full_message()));
    return std::move(r).value();
}
inline void must(Result<void> r)
{
    REQUIRE_MESSAGE(r.has_value(), (r ? std::string() : r.error().full_message()));
}

/// A range known to be valid; a test typo is reported as a test failure.
inline MemoryRange range(std::uint64_t start, std::uint64_t end)
{
    auto r = MemoryRange::create(start, end);
    REQUIRE_MESSAGE(r.has_value(), "bad test range");
    return *r;
}

/// The pages set in a dirty bitmap (bit i: page first + i), ascending.
inline std::vector<std::uint64_t> pages_in(const std::vector<std::uint64_t>& bits,
                                           std::uint64_t first = 0)
{
    std::vector<std::uint64_t> out;
    for (std::uint64_t i = 0; i < bits.size() * 64; ++i)
        if (((bits[i / 64] >> (i % 64)) & 1U) != 0)
            out.push_back(first + i);
    return out;
}

} // namespace membacking::test

namespace doctest {
template <>
struct StringMaker<membacking::MemoryRange> {
    static String convert(const membacking::MemoryRange& r) { return r.to_string().c_str(); }
};
template <>
struct StringMaker<membacking::Error> {
    static String convert(const membacking::Error& e) { return e.full_message().c_str(); }
};
} // namespace doctest
