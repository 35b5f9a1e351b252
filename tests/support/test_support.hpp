/**
 * Shared helpers for the unit tests: memfd-backed Mappables and doctest printers.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/va/mappable.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <sys/mman.h>
#include <unistd.h>

namespace membacking::test {

/// A memfd of `size` bytes, owned by the returned Mappable.
inline Mappable make_memfd(std::uint64_t size = 0x10000)
{
    const int fd = ::memfd_create("membacking-test", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
    return Mappable::adopt(fd);
}

/// A range known to be valid; a test typo is reported as a test failure.
inline MemoryRange range(std::uint64_t start, std::uint64_t end)
{
    auto r = MemoryRange::create(start, end);
    REQUIRE_MESSAGE(r.has_value(), "bad test range");
    return *r;
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
