// The example VMM: a tiny KVM virtual machine whose memory is managed by membacking.
//
// - Guest memory: a GuestMemoryManager with x86 legacy RAM (16 MiB, the PAM segments and VGA
//   window separately controllable), a KVM partition, and a mock partition attached beside it
//   so the example can show what a hypervisor was told.
// - Devices: a serial-like output register at an unmapped GPA (every guest write to it is an
//   MMIO exit the VMM prints), and a 32 KiB option ROM (device memory) under the PAM segments
//   at 0xc0000 and 0xc4000.
// - The guest (flat 32-bit code, loaded through GuestMemory): prints a greeting, sums the
//   numbers the VMM placed in its RAM, stores the result, then waits on the first byte at
//   0xc0000 while a VMM thread switches that PAM segment from RAM to the option ROM *while the
//   vCPU runs*; then prints what it finds there. The KVM partition is attached with a quiesce
//   hook (a VcpuGate): the switch deletes RAM's memslot and creates the ROM's, and the gate
//   holds the vCPU out of KVM_RUN in between, so the guest never reads the open bus there.
// - The VMM prints the memory map, the guest's output and what the guest computed, and checks
//   them: the exit status says whether everything happened as it should.
//
// Without /dev/kvm it says so, then runs the same memory-manager steps with the mock partition
// (MEMBACKING_NO_KVM=1 forces that path; MEMBACKING_REQUIRE_KVM=1 makes it an error instead).
#include <membacking/membacking.hpp>

#include "kvm_vcpu.hpp"
#include "vcpu_gate.hpp"
#include "x86_asm.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace membacking;
using namespace membacking::literals;
using example::KvmVm;
using example::X86Asm;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint32_t code_gpa = 0x1000;
constexpr std::uint32_t strings_gpa = 0x3000;
constexpr std::uint32_t data_gpa = 0x10000;
constexpr std::uint32_t result_gpa = 0x20000;
constexpr std::uint32_t serial_gpa = 0xfed00000; // nothing maps it: every access is MMIO
// The first PAM segment (i440FX PAM1's low nibble), from the library's table of the legacy area.
constexpr MemoryRange pam = *x86_legacy::pam_range(1, 0);
constexpr auto pam_gpa = static_cast<std::uint32_t>(pam.start());
static_assert(pam == x86_legacy::pam_segments[0]);

constexpr const char greeting[] = "hello from the guest\n";
constexpr const char rom_text[] = "ROM: option ROM visible through the PAM segment\n";
constexpr const char ram_text[] = "shadow RAM is back in the PAM segment\n";
constexpr std::uint32_t numbers = 16;

using Manager = KvmGuestMemoryManager;

[[noreturn]] void die(const std::string& what)
{
    std::fprintf(stderr, "vmm: %s\n", what.c_str());
    std::exit(1);
}

template <class T>
T must(Result<T> r, const char* what)
{
    if (!r)
        die(std::string(what) + ": " + r.error().full_message());
    if constexpr (!std::is_void_v<T>)
        return std::move(r).value();
}

/// Emits "print the zero-terminated string at `addr` to the serial register".
void print_string(X86Asm& a, std::uint32_t addr, const std::string& tag)
{
    a.mov(X86Asm::esi, addr)
        .label(tag + "_loop")
        .load_al_esi()
        .test_al()
        .jz(tag + "_done")
        .store_al(serial_gpa)
        .inc_esi()
        .jmp(tag + "_loop")
        .label(tag + "_done");
}

X86Asm guest_program()
{
    X86Asm a;
    print_string(a, strings_gpa, "hello");
    // eax = sum of the numbers at data_gpa
    a.mov(X86Asm::eax, 0).mov(X86Asm::esi, data_gpa).mov(X86Asm::ecx, numbers);
    a.label("sum").add_eax_esi().add_esi(4).dec_ecx().jnz("sum");
    a.store_eax(result_gpa);
    // Tell the VMM we are about to watch the PAM segment, then spin until it shows the ROM (the
    // shadow RAM there starts with 's', the ROM with 'R').
    a.mov(X86Asm::eax, '!').store_al(serial_gpa);
    a.label("wait").load_al(pam_gpa).cmp_al('R').jnz("wait");
    print_string(a, pam_gpa, "rom");
    a.hlt();
    // Resumed after the VMM put the shadow RAM back.
    print_string(a, pam_gpa, "ram");
    a.hlt();
    return a;
}

struct Layout {
    Manager manager;
    std::shared_ptr<MockPartition> observer = std::make_shared<MockPartition>();
    std::vector<Manager::Device> rom; ///< one device region per PAM segment
};

Layout build_layout()
{
    Manager manager = must(Manager::builder()
                               .x86_legacy_support(true)
                               .add_backing(RamBackingRequest({MemoryRange::constant(0, 16 * MiB)}))
                               .build(4_GiB),
                           "building guest memory");
    auto memory = manager.guest_memory();
    // The option ROM: its image goes into its own object, which is then placed in the guest as
    // device memory at device priority, under the PAM segment (RAM hides it for now).
    const Mappable rom_object = must(create_memfd("option-rom", 32_KiB), "ROM memory");
    if (::pwrite(rom_object.native_handle(), rom_text, sizeof rom_text, 0) !=
        static_cast<ssize_t>(sizeof rom_text))
        die("loading the ROM image");
    // A 32 KiB ROM spans two PAM segments, so it is placed as one device region per segment
    // (one region across both would not nest under them): place_split does the cut.
    auto rom =
        must(manager.device_memory_mapper().place_split({.name = "option-rom",
                                                         .gpa = Gpa{pam_gpa},
                                                         .length = 32_KiB,
                                                         .object = rom_object,
                                                         .object_offset = Offset{0},
                                                         .protection = Protection::read_only}),
             "placing the ROM");
    // Guest RAM contents: the PAM segment's shadow RAM text, the greeting, the numbers to add.
    if (!memory.write(Gpa{pam_gpa}, ram_text) || !memory.write(Gpa{strings_gpa}, greeting))
        die("writing guest strings");
    for (std::uint32_t i = 0; i < numbers; ++i)
        if (!memory.write_plain<std::uint32_t>(Gpa{data_gpa + 4 * i}, i + 1))
            die("writing the numbers");
    const auto code = guest_program().code();
    if (!memory.write(Gpa{code_gpa}, code))
        die("loading the guest");
    Layout layout{std::move(manager), std::make_shared<MockPartition>(), std::move(rom)};
    must(layout.manager.attach_partition(Vtl::vtl0, layout.observer), "attaching the observer");
    return layout;
}

void print_map(const Manager& m, const char* title)
{
    std::printf("\n== memory map: %s\n%s", title, m.memory_map().to_text().c_str());
}

std::uint32_t expected_sum()
{
    return numbers * (numbers + 1) / 2;
}

int run_with_kvm(KvmVm& vm)
{
    // This thread runs the vCPU, through the gate: a control call that replaces a memslot
    // (from any thread) kicks the vCPU out of KVM_RUN first and lets it go once done. Declared
    // first, so it outlives the layout: the ROM's teardown is a control call through its hook.
    example::VcpuGate gate(vm);
    Layout l = build_layout();
    auto kvm = must(DefaultKvmPartition::create(vm.vm_fd()), "KVM partition");
    must(l.manager.attach_partition(Vtl::vtl0, kvm, gate.hook()), "attaching the KVM partition");
    std::printf("KVM: %u memslots available, %zu in use, read-only slots %s, prefetch %s\n",
                kvm->capabilities().max_slots, kvm->slots().size(),
                kvm->capabilities().readonly_memory ? "yes" : "no",
                kvm->capabilities().pre_fault_memory ? "yes" : "no");
    print_map(l.manager, "boot");

    auto control = l.manager.ram_visibility_control();
    std::string output;
    std::thread toggler;
    int halts = 0;
    std::uint64_t open_bus_reads = 0;
    vm.start_at(code_gpa);
    std::printf("\n== guest output\n");
    for (;;) {
        const KvmVm::Exit e = gate.run();
        if (e.kind == KvmVm::Exit::Kind::mmio && e.write && e.address == serial_gpa) {
            const char c = static_cast<char>(e.data & 0xff);
            if (c == '!') {
                // The guest is now spinning on 0xc0000: switch the PAM segment while it runs.
                toggler = std::thread([&] {
                    must(control.set_ram_visibility(pam, RamVisibility::unmapped), "PAM unmap");
                });
                continue;
            }
            output += c;
            std::fputc(c, stdout);
            continue;
        }
        if (e.kind == KvmVm::Exit::Kind::mmio && !e.write) {
            // A read of nothing: open bus, as on real hardware. (The instant between RAM's slot
            // going and the ROM's arriving would be one, without the gate.)
            ++open_bus_reads;
            vm.answer_mmio(~std::uint64_t{0});
            continue;
        }
        if (e.kind != KvmVm::Exit::Kind::halt)
            die("unexpected vCPU exit, reason " + std::to_string(e.reason));
        if (++halts == 1) {
            if (toggler.joinable())
                toggler.join();
            print_map(l.manager, "PAM 0xc0000 unmapped while the guest ran: the ROM shows");
            std::printf("\n== guest output\n");
            must(control.set_ram_visibility(pam, RamVisibility::read_write), "PAM back to RAM");
            continue; // resume after the hlt
        }
        break;
    }
    const auto result = l.manager.guest_memory().read_plain<std::uint32_t>(Gpa{result_gpa});
    if (!result)
        die(result.error().message());
    const std::uint32_t sum = *result;
    std::printf("\nguest computed sum(1..%u) = %u; open-bus reads during the switch: %llu\n",
                numbers, sum, static_cast<unsigned long long>(open_bus_reads));
    const std::string want = std::string(greeting) + rom_text + ram_text;
    if (sum != expected_sum() || output != want || open_bus_reads != 0)
        die("the guest did not do what it should (sum " + std::to_string(sum) + ", " +
            std::to_string(open_bus_reads) + " open-bus reads)");
    std::printf("all as expected\n");
    return 0;
}

int run_without_kvm(const std::string& why)
{
    std::printf("KVM is not available here (%s).\n"
                "Running the same memory-manager steps with the mock partition instead; no guest "
                "code runs.\n",
                why.c_str());
    Layout l = build_layout();
    print_map(l.manager, "boot");
    auto memory = l.manager.guest_memory();
    std::uint32_t sum = 0;
    for (std::uint32_t i = 0; i < numbers; ++i) {
        const auto n = memory.read_plain<std::uint32_t>(Gpa{data_gpa + 4 * i});
        if (!n)
            die(n.error().message());
        sum += *n;
    }
    if (!memory.write_plain<std::uint32_t>(Gpa{result_gpa}, sum))
        die("storing the sum");
    auto control = l.manager.ram_visibility_control();
    must(control.set_ram_visibility(pam, RamVisibility::unmapped), "PAM unmap");
    char seen[sizeof rom_text] = {};
    if (!memory.read(Gpa{pam_gpa}, seen) || std::strcmp(seen, rom_text) != 0)
        die("the ROM does not show through the unmapped PAM segment");
    print_map(l.manager, "PAM 0xc0000 unmapped: the ROM shows");
    must(control.set_ram_visibility(pam, RamVisibility::read_write), "PAM back");
    std::printf("\nthe mock partition holds %zu windows; computed sum(1..%u) = %u\n",
                l.observer->windows().size(), numbers, sum);
    if (sum != expected_sum())
        die("wrong sum");
    std::printf("all as expected (mock partition)\n");
    return 0;
}

} // namespace

int main()
{
    std::printf("membacking example VMM\n");
    std::string why;
    if (const char* force = std::getenv("MEMBACKING_NO_KVM"); force && *force)
        return run_without_kvm("MEMBACKING_NO_KVM is set");
    std::optional<KvmVm> vm = KvmVm::create(why);
    if (const char* require = std::getenv("MEMBACKING_REQUIRE_KVM"); !vm && require && *require)
        die("MEMBACKING_REQUIRE_KVM is set, but KVM is not usable: " + why);
    if (!vm)
        return run_without_kvm(why);
    return run_with_kvm(*vm);
}
