// A shared library that uses the library's guarded access on its own (built twice, as two
// libraries, and once more as a dlopen()ed plugin). GUEST_ENTRY names its one exported function.
#include "guest_object.hpp"

extern "C" __attribute__((visibility("default"))) int GUEST_ENTRY()
{
    return fault_test::guarded_fault_is_recovered() ? 1 : 0;
}
