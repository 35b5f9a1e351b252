// Runs the README's examples (the memory-table listener without KVM, then the first one):
// tests/readme/extract.py copies the README's C++ blocks into readme_example.inc at build time,
// included below, so this program compiles exactly what the README shows, with the project's
// warnings as errors. With /dev/kvm, make_vm_memory builds the guest memory of a real KVM VM and
// must succeed and leave everything where it said; without /dev/kvm the test reports itself skipped
// (77) after compiling it.
#include "readme_example.inc"

#include "kvm_vcpu.hpp"

#include <cstdio>
#include <optional>
#include <string>

/// The memory-table example: the DMA listener's view is the table (RAM and the moved BAR), and
/// on a private-memory guest it cannot register (errc::unsupported).
bool dma_listener_example_holds()
{
    auto mappings = dma_listener_demo();
    if (!mappings || *mappings != 2) {
        std::printf("the README's DMA listener example failed: %s\n",
                    mappings ? "not two IOMMU mappings" : mappings.error().full_message().c_str());
        return false;
    }
    auto private_guest = membacking::MockGuestMemoryManager::builder()
                             .add_backing(membacking::RamBackingRequest(
                                              {membacking::MemoryRange::constant(0, 1 << 20)})
                                              .private_memory(true))
                             .build(membacking::Length{16 << 20});
    if (!private_guest)
        return false;
    auto refused = private_guest->add_memory_listener(std::make_shared<DmaListener>());
    if (refused || refused.error().code() != membacking::errc::unsupported) {
        std::printf("the README's DMA listener registered on private memory\n");
        return false;
    }
    std::printf("DMA listener example: 2 IOMMU mappings; private memory refused\n");
    return true;
}

int main()
{
    // Needs no KVM: runs before the KVM example's skip.
    if (!dma_listener_example_holds())
        return 1;
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
