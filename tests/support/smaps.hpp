/**
 * Reading /proc/self/smaps for the VMA that contains an address: its VmFlags (THP advice shows as
 * "hg") and KernelPageSize.
 */
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

namespace membacking::test {

struct SmapsEntry {
    bool found = false;
    std::string vm_flags;
    long kernel_page_kb = 0;
};

inline SmapsEntry smaps_for(const void* p)
{
    std::ifstream smaps("/proc/self/smaps");
    std::string line;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    SmapsEntry e;
    bool inside = false;
    while (std::getline(smaps, line)) {
        unsigned long lo = 0, hi = 0;
        char dash = 0;
        if (std::sscanf(line.c_str(), "%lx%c%lx", &lo, &dash, &hi) == 3 && dash == '-') {
            if (inside)
                break;
            inside = a >= lo && a < hi;
            e.found = inside;
            continue;
        }
        if (!inside)
            continue;
        long kb = 0;
        if (std::sscanf(line.c_str(), "KernelPageSize: %ld kB", &kb) == 1)
            e.kernel_page_kb = kb;
        if (line.rfind("VmFlags:", 0) == 0)
            e.vm_flags = line.substr(8);
    }
    return e;
}

} // namespace membacking::test
