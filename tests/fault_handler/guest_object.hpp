// What each object (executable, shared library, plugin) in the fault-handler tests does with the
// library: a guarded load from a PROT_NONE page, which must come back as a recovered fault at
// exactly that page. Compiled into every object, so each has its own copy of the primitives, of
// the recovery table and of the handler.
#pragma once

#include <membacking/access/primitives.hpp>

#include <cstdint>
#include <sys/mman.h>

namespace fault_test {

/// True if a guarded load from a fresh PROT_NONE page fails and reports that page.
inline bool guarded_fault_is_recovered()
{
    membacking::access::install_fault_handler();
    void* page = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return false;
    std::uint64_t v = 0;
    const bool loaded = membacking::access::try_load(page, v);
    const bool ok = !loaded && membacking::access::last_fault().address ==
                                   reinterpret_cast<std::uintptr_t>(page);
    ::munmap(page, 4096);
    return ok;
}

} // namespace fault_test
