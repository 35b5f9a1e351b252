// The one translation unit that holds doctest's runner; every test executable links it.
//
// doctest's crash reporter installs its own SIGSEGV/SIGBUS handlers (and, on Windows, its own
// exception filters) around each test case and restores the previous ones afterwards, which
// would evict or shadow the library's fault handler. Guest-memory faults are part of what these
// tests exercise, so doctest's signal and SEH handling is off.
//
// main() first gives child_process.hpp a chance: a test that must watch a process die runs its
// program again with `--membacking-child NAME` (Windows has no fork()).
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#define DOCTEST_CONFIG_NO_WINDOWS_SEH
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "child_process.hpp"

#if defined(__MINGW32__)
#    include <cxxabi.h>

namespace {
// MinGW-w64 with POSIX threads (Debian's g++-mingw-w64-x86-64-posix, GCC 14) keeps thread_local
// variables in emulated TLS: libgcc allocates each thread's block on first use and frees it from
// a winpthreads key destructor, created the first time any thread_local is touched. libstdc++
// runs thread_local destructors from the destructor of another key, created the first time a
// thread_local with a destructor is constructed, which is later. winpthreads runs key destructors
// in key order, so when a thread ends, its thread_local objects are destroyed in storage that was
// already freed (GCC bug 80816, mingw-w64 bug 527). doctest has such objects (its thread_local
// string streams, all constructed the first time a thread touches one of them, e.g. through
// REQUIRE_MESSAGE in test::must): a test thread that used an assertion wrote into freed heap
// blocks as it ended, and the heap crashed later, at random (win_manager's "access violation").
// Creating libstdc++'s key here, before anything touches a thread_local, gives it the lower key,
// so destructors run first and emulated TLS is freed after them. tests/windows/thread_exit.cpp
// checks it under Wine's heap checking.
[[gnu::constructor(101)]] void create_thread_local_destructor_key_first()
{
    static int registered = 0;
    (void)abi::__cxa_thread_atexit([](void*) {}, &registered, nullptr);
}
} // namespace
#endif

int main(int argc, char** argv)
{
    if (const auto code = membacking::test::child_main(argc, argv))
        return *code;
    return doctest::Context(argc, argv).run();
}
