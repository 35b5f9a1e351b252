// The operator delete pair that goes with a test program's own malloc-backed operator new (a
// counting one in tests/lease, a failing one in tests/ipc/dirty_seam.cpp). Include it in the one
// translation unit of the program that replaces operator new.
#pragma once

#include <cstddef>
#include <cstdlib>

// Every replacement operator new allocates with malloc; GCC cannot see that through the inlining.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept
{
    std::free(p);
}
void operator delete(void* p, std::size_t) noexcept
{
    std::free(p);
}
#pragma GCC diagnostic pop
