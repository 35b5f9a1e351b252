// Runs the README's first example: tests/readme/extract.py copies the README's C++ blocks into
// readme_example.inc at build time, included below, so this program compiles exactly what the
// README shows, with the project's warnings as errors. With /dev/kvm, make_vm_memory builds the
// guest memory of a real KVM VM and must succeed and leave everything where it said; without
// /dev/kvm the test reports itself skipped (77) after compiling it.
#include "readme_example.inc"

#include "kvm_vcpu.hpp"

#include <cstdio>
#include <optional>
#include <string>

int main()
{
    std::string why;
    std::optional<membacking::example::KvmVm> kvm = membacking::example::KvmVm::create(why);
    if (!kvm) {
        std::printf("skipped: %s\n", why.c_str());
        return 77;
    }
    auto vm = make_vm_memory(kvm->vm_fd());
    if (!vm) {
        std::printf("the README's example failed: %s\n", vm.error().full_message().c_str());
        return 1;
    }
    const membacking::MemoryMap map = vm->manager.memory_map();
    const auto* bar = map.find_region("bar0");
    const bool placed = bar != nullptr && bar->active && bar->range.start() == 0xfe000000;
    const bool answer =
        vm->manager.guest_memory().read_plain<std::uint32_t>(Gpa{0x1000}).value_or(0) == 42;
    std::printf("bar0 %s, the guest word at 0x1000 %s\n", placed ? "placed" : "NOT placed",
                answer ? "is 42" : "is NOT 42");
    return placed && answer ? 0 : 1;
}
