/**
 * @file base/fatal.hpp
 * Layer: base.
 *
 * The library's single path for broken invariants. Bad input never gets here: it gets an error
 * value (see result.hpp). This is for states the library itself must never reach, such as a
 * rollback step failing after the operation it undoes succeeded: continuing would mean guest
 * memory and the hypervisor disagree silently, which is worse than stopping.
 */
#pragma once

#include <membacking/base/config.hpp>

#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace membacking::detail {

/// Prints "membacking: fatal: <what>" to stderr and aborts. Never returns, never throws.
[[noreturn]] MEMBACKING_COLD inline void fatal(std::string_view what) noexcept
{
    // Nothing useful can be done if stderr is gone: we are about to abort anyway.
    (void)std::fprintf(stderr, "membacking: fatal: %.*s\n", static_cast<int>(what.size()),
                       what.data());
    (void)std::fflush(stderr);
    std::abort();
}

} // namespace membacking::detail

/// Checks an internal invariant in every build type; a failure is a library bug, so it is fatal.
#define MEMBACKING_CHECK(cond, what)                                                               \
    do {                                                                                           \
        if (!(cond)) [[unlikely]]                                                                  \
            ::membacking::detail::fatal(what);                                                     \
    } while (false)
