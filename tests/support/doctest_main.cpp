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

int main(int argc, char** argv)
{
    if (const auto code = membacking::test::child_main(argc, argv))
        return *code;
    return doctest::Context(argc, argv).run();
}
