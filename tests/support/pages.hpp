/**
 * pages_of(range): the page-aligned addresses in a range, in order, as a view.
 *
 * The region tests walk ranges page by page in several places (the RecordingSink's VA model, the
 * differential test's brute-force model). One named view replaces the hand-written
 * `for (a = r.start(); a < r.end(); a += page_size)` loops, so the model and the sink step
 * through a range the same way. It needs a stride view, which C++20's std::ranges lacks (C++23
 * has std::views::stride; GCC 12 does not): range-v3 gives it. Tests only: the public headers
 * use nothing but the standard library.
 */
#pragma once

#include <membacking/base/align.hpp>
#include <membacking/base/memory_range.hpp>

#include <range/v3/view/iota.hpp>
#include <range/v3/view/stride.hpp>

#include <cstddef>
#include <cstdint>

namespace membacking::test {

/// Every page start in `r` (r is page-aligned in these tests), lowest first.
inline auto pages_of(const MemoryRange& r)
{
    return ranges::views::iota(r.start(), r.end()) |
           ranges::views::stride(static_cast<std::ptrdiff_t>(page_size));
}

} // namespace membacking::test
