// A lookup on a temporary MemoryMap would return a pointer that dangles at the end of the
// statement: it does not compile.
// expect: find_region
// expect: delete
#include <membacking/manager/memory_map.hpp>

membacking::MemoryMap snapshot();

const membacking::MemoryMap::Region* dangling()
{
    return snapshot().find_region("ram");
}
