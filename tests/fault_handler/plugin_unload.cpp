// A plugin that uses the library is loaded, recovers a guarded fault, and is unloaded; the
// executable's own guarded faults are still recovered afterwards (the plugin's handler, which the
// executable's now chains through, must not point into unmapped code). argv[1]: the plugin.
#include "guest_object.hpp"

#include <cstdio>
#include <dlfcn.h>

int main(int argc, char** argv)
{
    if (argc != 2)
        return 2;
    if (!fault_test::guarded_fault_is_recovered()) {
        std::puts("executable: first fault NOT recovered");
        return 1;
    }
    void* plugin = ::dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (plugin == nullptr) {
        std::printf("dlopen: %s\n", ::dlerror());
        return 2;
    }
    using Entry = int (*)();
    auto entry = reinterpret_cast<Entry>(::dlsym(plugin, "guest_plugin"));
    if (entry == nullptr || entry() != 1) {
        std::puts("plugin: fault NOT recovered");
        return 1;
    }
    if (::dlclose(plugin) != 0)
        return 2;
    std::puts("plugin unloaded");
    std::fflush(stdout);
    if (!fault_test::guarded_fault_is_recovered()) {
        std::puts("executable: fault after unload NOT recovered");
        return 1;
    }
    std::puts("executable: fault after unload recovered");
    return 0;
}
