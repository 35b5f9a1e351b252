// Two shared libraries and the executable each include the library: each recovers its own
// guarded faults, in any order, whichever installed its handler first. Built as a plain
// executable and as a -rdynamic one (whose symbols the libraries would bind to if the handler's
// entry points were not hidden).
#include "guest_object.hpp"

#include <cstdio>

extern "C" int guest_library_a();
extern "C" int guest_library_b();

int main()
{
    int failures = 0;
    const auto check = [&](const char* who, bool ok) {
        std::printf("%s: %s\n", who, ok ? "recovered" : "NOT recovered");
        std::fflush(stdout);
        failures += ok ? 0 : 1;
    };
    check("library a", guest_library_a() == 1);
    check("library b", guest_library_b() == 1);
    check("executable", fault_test::guarded_fault_is_recovered());
    check("library a again", guest_library_a() == 1);
    check("library b again", guest_library_b() == 1);
    return failures == 0 ? 0 : 1;
}
