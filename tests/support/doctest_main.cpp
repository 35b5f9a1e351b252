// The one translation unit that holds doctest's runner; every test executable links it.
//
// doctest's crash reporter installs its own SIGSEGV/SIGBUS handlers around each test case and
// restores the previous ones afterwards, which would evict the library's fault handler (it is
// installed once per process and chains to whatever was there before). Guest-memory faults are
// part of what these tests exercise, so doctest's signal handling is off.
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
