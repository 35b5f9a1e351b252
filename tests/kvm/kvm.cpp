// KvmPartition with a real guest on a real vCPU (flat 32-bit protected mode). Every test runs a
// guest program and checks what the guest saw against what the manager was told: values through
// GuestMemory, overlays, RAM visibility (MMIO exits at the right GPA), device memory and its
// moves, dirty logging, pinning, slot exhaustion and an ioctl failure in the middle of an
// operation. Without a usable /dev/kvm the program reports itself skipped (77).
#define DOCTEST_CONFIG_IMPLEMENT
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#include <membacking/membacking.hpp>

#include "injecting_kvm.hpp"
#include "kvm_vcpu.hpp"
#include "migration_loop.hpp"
#include "partition_conformance.hpp"
#include "place_device.hpp"
#include "smaps.hpp"
#include "test_support.hpp"
#include "vcpu_gate.hpp"
#include "x86_asm.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fcntl.h>
#include <memory>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace membacking;
using example::KvmVm;
using example::X86Asm;
using test::must;
using test::pages_in;
using test::range;
using Exit = KvmVm::Exit;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint32_t code_gpa = 0x1000;
constexpr std::uint32_t result_gpa = 0x2000;

KvmVm make_vm()
{
    std::string why;
    auto vm = KvmVm::create(why);
    REQUIRE_MESSAGE(vm.has_value(), why);
    return std::move(*vm);
}

/// Whether a Guest's partition is attached with its vCPU gate as the quiesce hook.
enum class Hooked : std::uint8_t { no, yes };

/// A VM, a manager over 16 MiB of address space with x86 legacy RAM below 2 MiB, and the KVM
/// partition attached, by default with the vCPU's gate as its quiesce hook (the vCPU runs on
/// this thread in run_to_halt, or on one of the test's through the gate). Sys is the partition's
/// syscall seam.
template <class Sys = os::LinuxSyscalls, class Tracking = DirtyTracking>
struct Guest {
    // Tracked: the dirty tests see the union of the partition's log and the VMM's marks.
    using Manager =
        BasicGuestMemoryManager<Tracking, NestedPriority, DefaultVaPolicy, KvmPartition<Sys>>;

    explicit Guest(Hooked hooked = Hooked::yes)
        : id(must(manager.attach_partition(Vtl::vtl0, kvm,
                                           hooked == Hooked::yes ? gate.hook() : QuiesceHook{})))
    {}

    KvmVm vm = make_vm();
    Manager manager = must(Manager::builder()
                               .x86_legacy_support(true)
                               .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                               .build(Length{16 * MiB}));
    std::shared_ptr<KvmPartition<Sys>> kvm = must(KvmPartition<Sys>::create(vm.vm_fd()));
    example::VcpuGate gate{vm};
    PartitionId id;
    typename Manager::Memory memory = manager.guest_memory();

    void load(const X86Asm& program)
    {
        const auto code = program.code();
        REQUIRE(memory.write(Gpa{code_gpa}, code).has_value());
        REQUIRE(vm.start_at(code_gpa));
    }
    /// Runs the loaded program from the start until it halts; fails on any other exit.
    void run_to_halt()
    {
        REQUIRE(vm.start_at(code_gpa));
        const Exit e = vm.run();
        REQUIRE_MESSAGE(e.kind == Exit::Kind::halt, "unexpected exit: kind "
                                                        << static_cast<int>(e.kind) << " reason "
                                                        << e.reason << " at "
                                                        << MemoryRange::hex(e.address));
    }
    std::uint8_t result_byte()
    {
        return memory.template read_plain<std::uint8_t>(Gpa{result_gpa}).value();
    }
    /// The partition's own log of one region's window (bit i = page i), read and cleared.
    std::vector<std::uint64_t> partition_log(RegionId region)
    {
        const auto map = manager.memory_map();
        for (const auto& r : map.regions)
            if (r.id == region)
                return must(kvm->take_dirty_log(r.range.start(), r.range.size()));
        FAIL("no such region");
        return {};
    }
};

/// A guest that copies the byte at `from` to the result slot.
X86Asm copy_byte(std::uint32_t from)
{
    X86Asm a;
    a.load_al(from).store_al(result_gpa).hlt();
    return a;
}

Mappable filled_memfd(std::uint64_t size, std::uint8_t value)
{
    Mappable m = test::make_memfd(size);
    std::vector<std::uint8_t> bytes(size, value);
    REQUIRE(::pwrite(m.native_handle(), bytes.data(), size, 0) == static_cast<ssize_t>(size));
    return m;
}

} // namespace

TEST_CASE("the VMM writes a value, the guest computes with it, the VMM reads the result")
{
    Guest<> g;
    REQUIRE(g.memory.write_plain<std::uint32_t>(Gpa{result_gpa}, 41).has_value());
    X86Asm a;
    a.load_eax(result_gpa).imul_eax(3).add_eax(7).store_eax(result_gpa + 4).hlt();
    g.load(a);
    g.run_to_halt();
    CHECK(g.memory.read_plain<std::uint32_t>(Gpa{result_gpa + 4}).value() == 41 * 3 + 7);
    CHECK(g.vm.eax() == 41 * 3 + 7);
    // The partition holds one slot per visible region: the 16 x86 legacy regions.
    CHECK(g.kvm->slots().size() == 16);
}

TEST_CASE("a higher-priority region over RAM is what the guest sees, and RAM comes back intact")
{
    Guest<> g;
    const MemoryRange window = range(4 * MiB, 5 * MiB);
    const RegionId low = must(g.manager.add_region("low", window, 100, MappingType::Ram));
    must(g.manager.add_mapping(
        low, {range(0, MiB), MappingBacking::file(filled_memfd(MiB, 0xaa), Offset{0}), true, {}}));
    must(g.manager.map_region(low, {true, true, false}));
    const RegionId high = must(g.manager.add_region("high", window, 200, MappingType::Ram));
    must(g.manager.add_mapping(
        high, {range(0, MiB), MappingBacking::file(filled_memfd(MiB, 0xbb), Offset{0}), true, {}}));
    g.load(copy_byte(4 * MiB + 0x10));

    g.run_to_halt();
    CHECK(g.result_byte() == 0xaa);
    must(g.manager.map_region(high, {true, true, false}));
    g.run_to_halt();
    CHECK(g.result_byte() == 0xbb);
    must(g.manager.unmap_region(high));
    g.run_to_halt();
    CHECK(g.result_byte() == 0xaa);
}

TEST_CASE("the partition owns a duplicate of the VM fd: the VMM's number closed and reused, "
          "map and unmap still reach the VM and the guest still runs")
{
    Guest<> g;
    const int vmm_fd = g.vm.vm_fd();
    REQUIRE(g.kvm->vm_fd() != vmm_fd);
    // The VMM closes its VM fd and the number is reused by an unrelated file: a partition that
    // issued its ioctls on the VMM's number would get ENOTTY from the memfd.
    const int saved = ::fcntl(vmm_fd, F_DUPFD_CLOEXEC, 0);
    REQUIRE(saved >= 0);
    REQUIRE(::close(vmm_fd) == 0);
    Mappable unrelated = test::make_memfd(MiB);
    REQUIRE(::dup2(unrelated.native_handle(), vmm_fd) == vmm_fd);

    const MemoryRange window = range(4 * MiB, 5 * MiB);
    const RegionId r = must(g.manager.add_region("after-close", window, 100, MappingType::Ram));
    must(g.manager.add_mapping(
        r, {range(0, MiB), MappingBacking::file(filled_memfd(MiB, 0x5c), Offset{0}), true, {}}));
    must(g.manager.map_region(r, {true, true, false}));
    CHECK(g.kvm->slots().size() == 17);
    g.load(copy_byte(4 * MiB + 0x20));
    g.run_to_halt();
    CHECK(g.result_byte() == 0x5c);
    must(g.manager.unmap_region(r));
    CHECK(g.kvm->slots().size() == 16);

    // The prefetch vCPU is duplicated too: closing the caller's number leaves the partition's.
    const int vcpu_copy = ::fcntl(g.vm.vcpu_fd(), F_DUPFD_CLOEXEC, 0);
    REQUIRE(vcpu_copy >= 0);
    must(g.kvm->set_prefetch_vcpu(vcpu_copy));
    REQUIRE(::close(vcpu_copy) == 0);
    auto pf = g.kvm->prefetch_range(MiB, MiB);
    if (g.kvm->capabilities().pre_fault_memory) {
        CHECK(pf.has_value());
    } else {
        REQUIRE_FALSE(pf);
        CHECK(pf.error().code() == errc::unsupported);
    }

    // The VMM's fd back where KvmVm closes it.
    REQUIRE(::dup2(saved, vmm_fd) == vmm_fd);
    ::close(saved);
}

TEST_CASE("unmapped RAM is an MMIO exit at the right GPA; read-only RAM reads, writes exit")
{
    Guest<> g;
    auto control = g.manager.ram_visibility_control();
    const MemoryRange pam = range(0xc0000, 0xc4000);
    REQUIRE(g.memory.write_plain<std::uint8_t>(Gpa{0xc0010}, 0x55).has_value());

    X86Asm a;
    a.load_al(0xc0010).store_al(result_gpa).store_al(0xc0010).hlt();
    g.load(a);

    // Unmapped: the read exits; the VMM answers; the guest uses the answer; the write exits too.
    must(control.set_ram_visibility(pam, RamVisibility::unmapped));
    REQUIRE(g.vm.start_at(code_gpa));
    Exit e = g.vm.run();
    REQUIRE(e.kind == Exit::Kind::mmio);
    CHECK(e.address == 0xc0010);
    CHECK_FALSE(e.write);
    CHECK(e.length == 1);
    g.vm.answer_mmio(0x77);
    e = g.vm.run();
    REQUIRE(e.kind == Exit::Kind::mmio);
    CHECK(e.write);
    CHECK(e.address == 0xc0010);
    CHECK(e.data == 0x77);
    REQUIRE(g.vm.run().kind == Exit::Kind::halt);
    CHECK(g.result_byte() == 0x77);

    // Read-only: the read sees RAM without an exit; the write exits and does not land.
    must(control.set_ram_visibility(pam, RamVisibility::read_only));
    REQUIRE(g.vm.start_at(code_gpa));
    e = g.vm.run();
    REQUIRE(e.kind == Exit::Kind::mmio);
    CHECK(e.write);
    CHECK(e.address == 0xc0010);
    CHECK(e.data == 0x55);
    REQUIRE(g.vm.run().kind == Exit::Kind::halt);
    CHECK(g.result_byte() == 0x55);
    CHECK(g.memory.read_plain<std::uint8_t>(Gpa{0xc0010}).value() == 0x55);

    // Read-write again: no exits at all.
    must(control.set_ram_visibility(pam, RamVisibility::read_write));
    g.run_to_halt();
}

TEST_CASE("a 64 KiB ROM over four PAM segments (place_split): the guest reads each quarter")
{
    Guest<> g;
    Mappable rom = test::make_memfd(0x10000);
    for (std::uint64_t q = 0; q < 4; ++q) {
        const char c = static_cast<char>('A' + q);
        REQUIRE(::pwrite(rom.native_handle(), &c, 1, static_cast<off_t>(q * 0x4000)) == 1);
    }
    const std::uint32_t at = 0xc8000; // x86_legacy::pam_segments[2] to [5]
    auto pieces = must(g.manager.device_memory_mapper().place_split({.name = "option-rom",
                                                                     .gpa = Gpa{at},
                                                                     .length = Length{0x10000},
                                                                     .object = rom,
                                                                     .object_offset = Offset{0}}));
    REQUIRE(pieces.size() == 4);
    REQUIRE(g.memory.write_plain<std::uint8_t>(Gpa{at + 0x4000}, 'r').has_value()); // shadow RAM
    X86Asm a;
    for (std::uint32_t q = 0; q < 4; ++q)
        a.load_al(at + q * 0x4000).store_al(result_gpa + q);
    a.hlt();
    g.load(a);
    auto control = g.manager.ram_visibility_control();
    for (std::size_t i = 2; i < 6; ++i)
        must(control.set_ram_visibility(x86_legacy::pam_segments[i], RamVisibility::unmapped));
    g.run_to_halt();
    const auto seen = [&](std::uint32_t q) {
        return g.memory.read_plain<std::uint8_t>(Gpa{result_gpa + q}).value();
    };
    CHECK(seen(0) == 'A');
    CHECK(seen(1) == 'B');
    CHECK(seen(2) == 'C');
    CHECK(seen(3) == 'D');
    // One segment back to its shadow RAM; the others keep showing the ROM.
    must(control.set_ram_visibility(x86_legacy::pam_segments[3], RamVisibility::read_write));
    g.run_to_halt();
    CHECK(seen(0) == 'A');
    CHECK(seen(1) == 'r');
    CHECK(seen(2) == 'C');
}

TEST_CASE("write-only PAM over a ROM: the guest reads the ROM, its writes exit into the shadow RAM")
{
    Guest<> g;
    const MemoryRange seg = x86_legacy::pam_segments[2]; // 0xc8000
    const auto at = static_cast<std::uint32_t>(seg.start());
    Mappable rom = test::make_memfd(0x4000);
    const std::uint32_t rom_word = 0x11223344;
    REQUIRE(::pwrite(rom.native_handle(), &rom_word, 4, 0x10) == 4);
    // Placed writable: write-only must still expose it read-only (a KVM_MEM_READONLY slot).
    auto pieces =
        must(g.manager.device_memory_mapper().place_split({.name = "rom",
                                                           .gpa = Gpa{at},
                                                           .length = Length{0x4000},
                                                           .object = rom,
                                                           .object_offset = Offset{0},
                                                           .protection = Protection::read_write}));
    // The BIOS's shadowing loop, one word of it: read from the ROM, write to the same address,
    // and keep what it read.
    X86Asm a;
    a.load_eax(at + 0x10).store_eax(result_gpa).add_eax(1).store_eax(at + 0x10).hlt();
    g.load(a);
    auto control = g.manager.ram_visibility_control();
    must(control.set_ram_visibility(seg, x86_legacy::pam_visibility(2))); // PAM WE=1, RE=0
    REQUIRE(g.vm.start_at(code_gpa));
    Exit e = g.vm.run();
    REQUIRE(e.kind == Exit::Kind::mmio); // the read came from the ROM, the write exits
    CHECK(e.write);
    CHECK(e.address == at + 0x10);
    CHECK(e.length == 4);
    CHECK(e.data == rom_word + 1);
    // The VMM forwards it into the shadow RAM through the helper.
    const auto target = must(control.shadow_ram_target(Gpa{e.address}, Length{e.length}));
    const auto word = static_cast<std::uint32_t>(e.data);
    REQUIRE(::pwrite(target.object.native_handle(), &word, 4,
                     static_cast<off_t>(target.offset.value())) == 4);
    REQUIRE(g.vm.run().kind == Exit::Kind::halt);
    CHECK(g.memory.read_plain<std::uint32_t>(Gpa{result_gpa}).value() == rom_word);
    std::uint32_t rom_now = 0;
    REQUIRE(::pread(rom.native_handle(), &rom_now, 4, 0x10) == 4);
    CHECK(rom_now == rom_word); // the guest's write did not land in the ROM
    // PAM RE=1, WE=1: the guest now reads its shadow copy.
    must(control.set_ram_visibility(seg, x86_legacy::pam_visibility(3)));
    X86Asm b;
    b.load_eax(at + 0x10).store_eax(result_gpa).hlt();
    g.load(b);
    g.run_to_halt();
    CHECK(g.memory.read_plain<std::uint32_t>(Gpa{result_gpa}).value() == rom_word + 1);
}

TEST_CASE("a read-only window is a KVM_MEM_READONLY slot even over writable host memory")
{
    // The manager never maps a read-only window over writable VA, so this drives the partition
    // directly: only KVM_MEM_READONLY can stop this write.
    KvmVm vm = make_vm();
    auto kvm = must(KvmPartition<>::create(vm.vm_fd()));
    REQUIRE(kvm->capabilities().readonly_memory);
    Mappable object = test::make_memfd(0x10000);
    void* p =
        ::mmap(nullptr, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, object.native_handle(), 0);
    REQUIRE(p != MAP_FAILED);
    auto* host = static_cast<std::uint8_t*>(p);
    X86Asm a;
    a.mov(X86Asm::eax, 0x99).store_al(0x20010).hlt();
    const auto code = a.code();
    std::memcpy(host + code_gpa, code.data(), code.size());
    REQUIRE(kvm->map_range(host, 0, 0x10000, true, true).has_value());        // code
    REQUIRE(kvm->map_range(host, 0x20000, 0x10000, false, true).has_value()); // read-only
    REQUIRE(vm.start_at(code_gpa));
    const Exit e = vm.run();
    REQUIRE(e.kind == Exit::Kind::mmio);
    CHECK(e.write);
    CHECK(e.address == 0x20010);
    CHECK(e.data == 0x99);
    CHECK(host[0x10] == 0); // the write did not land
    ::munmap(p, 0x10000);
}

TEST_CASE("device memory is visible to the guest at its GPA, and after it moves")
{
    Guest<> g;
    auto dev = test::place_device(g.manager, "bar0", Gpa{8 * MiB}, Length{0x10000},
                                  filled_memfd(0x10000, 0xdd));
    g.load(copy_byte(8 * MiB + 0x10));
    g.run_to_halt();
    CHECK(g.result_byte() == 0xdd);

    must(dev.map_to_guest(Gpa{9 * MiB}, Protection::read_write));
    g.load(copy_byte(9 * MiB + 0x10));
    g.run_to_halt();
    CHECK(g.result_byte() == 0xdd);
    // Where it was, there is nothing now: an MMIO exit.
    g.load(copy_byte(8 * MiB + 0x10));
    const Exit e = g.vm.run();
    REQUIRE(e.kind == Exit::Kind::mmio);
    CHECK(e.address == 8 * MiB + 0x10);
}

// In both layouts of the manager's dirty map: KVM's log is merged into a bit or a byte per page.
TEST_CASE_TEMPLATE("dirty logging reports the pages the guest wrote, per region", G,
                   Guest<os::LinuxSyscalls, DirtyTracking>,
                   Guest<os::LinuxSyscalls, ByteMapDirtyTracking>)
{
    G g;
    must(g.manager.start_dirty_tracking());
    const MemoryRange ram = range(MiB, 2 * MiB); // the RAM above 1 MiB
    X86Asm a;
    a.mov(X86Asm::edi, MiB + 3 * page_size).store_byte_edi(1).hlt();
    g.load(a);
    std::vector<std::uint64_t> log(4); // 1 MiB = 256 pages = 4 words
    std::vector<std::uint64_t> everything(64);
    must(g.manager.take_dirty_bitmap(range(0, 16 * MiB), everything)); // what loading touched
    g.run_to_halt();
    // Through the manager: the guest's write (KVM's log) and a VMM write, in one bitmap.
    REQUIRE(g.memory.template write_plain<std::uint8_t>(Gpa{MiB + 70 * page_size}, 1));
    must(g.manager.take_dirty_bitmap(ram, log));
    CHECK(log[0] == std::uint64_t{1} << 3);
    CHECK(log[1] == std::uint64_t{1} << 6);
    CHECK(log[2] == 0);
    std::vector<std::uint64_t> again(4);
    must(g.manager.take_dirty_bitmap(ram, again));
    CHECK(again[0] == 0); // read and cleared
    CHECK(again[1] == 0);
}

namespace {

/// Starts dirty tracking and runs a guest that writes one byte to the page at 1 MiB + 5 pages,
/// the partition's log emptied just before (what loading the program touched); returns the RAM
/// region above 1 MiB, whose window holds that page.
RegionId one_logged_write(Guest<>& g)
{
    must(g.manager.start_dirty_tracking());
    const RegionId ram = g.manager.memory_map().regions.back().id; // the RAM above 1 MiB
    X86Asm a;
    a.mov(X86Asm::edi, MiB + 5 * page_size).store_byte_edi(1).hlt();
    g.load(a);
    (void)g.partition_log(ram);
    g.run_to_halt();
    return ram;
}

} // namespace

TEST_CASE("dirty pages survive their slot being deleted and re-created")
{
    // The partition's own log (the manager would add the VMM's whole-window mark of a
    // re-created window, which hides what this test is about).
    Guest<> g;
    const RegionId ram = one_logged_write(g);
    // A permission change re-creates the slot (KVM cannot change KVM_MEM_READONLY in place),
    // twice; the page the guest wrote before is still reported.
    must(g.manager.map_region(ram, {false, true, false}));
    CHECK(g.kvm->slots().back().readonly);    // a new slot...
    CHECK(g.kvm->pending_dirty_pages() == 1); // ...and the old one's log kept
    must(g.manager.map_region(ram, {true, true, false}));
    CHECK(g.kvm->pending_dirty_pages() == 1);
    const auto log = g.partition_log(ram);
    CHECK(log[0] == std::uint64_t{1} << 5);
    CHECK(g.kvm->pending_dirty_pages() == 0);
    CHECK(g.partition_log(ram)[0] == 0);

    // Turning logging off discards what is pending.
    g.run_to_halt();
    must(g.manager.map_region(ram, {false, true, false}));
    CHECK(g.kvm->pending_dirty_pages() == 1);
    must(g.manager.stop_dirty_tracking());
    CHECK(g.kvm->pending_dirty_pages() == 0);
}

TEST_CASE("without a quiesce hook, a deleted logged slot is reported whole: no write is lost")
{
    // With no hook the vCPUs may run while a slot's log is read and the slot deleted; a write in
    // between would be dropped with the slot, so every page of it is reported instead.
    Guest<> g(Hooked::no);
    const RegionId ram = one_logged_write(g);
    must(g.manager.map_region(ram, {false, true, false}));
    CHECK(g.kvm->pending_dirty_pages() == MiB / page_size);
    const auto log = g.partition_log(ram);
    for (const std::uint64_t word : log)
        CHECK(word == ~std::uint64_t{0});
    CHECK(g.kvm->pending_dirty_pages() == 0);
}

namespace {
/// The guest: one byte written in each of these pages of the RAM above 1 MiB (256 pages).
X86Asm write_pages(const std::vector<std::uint32_t>& pages)
{
    X86Asm a;
    for (const std::uint32_t p : pages)
        a.mov(X86Asm::edi, static_cast<std::uint32_t>(MiB + p * page_size)).store_byte_edi(1);
    a.hlt();
    return a;
}

/// A take of part of a window, then of the rest, in either kernel mode (hide: play a kernel
/// without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, where KVM_GET_DIRTY_LOG clears on read).
void check_part_take(bool hide)
{
    test::InjectingKvm::reset();
    test::InjectingKvm::hide_manual_protect = hide;
    Guest<test::InjectingKvm> g;
    const bool manual = !hide;
    REQUIRE(g.kvm->capabilities().manual_dirty_log_protect == manual);
    g.kvm->set_clear_chunk_pages(100); // rounded up to 128: two chunks per 256-page window
    CHECK(g.kvm->clear_chunk_pages() == 128);
    must(g.manager.start_dirty_tracking());
    g.load(write_pages({3, 70, 130, 200, 255}));
    std::vector<std::uint64_t> everything(64);
    must(g.manager.take_dirty_bitmap(range(0, 16 * MiB), everything)); // what loading touched
    test::InjectingKvm::clear_calls.clear();
    g.run_to_halt();

    // Pages [65, 199) of the window: neither end 64-page aligned.
    const MemoryRange part = range(MiB + 65 * page_size, MiB + 199 * page_size);
    auto bits = must(g.kvm->take_dirty_log(part));
    CHECK(pages_in(bits, 65) == std::vector<std::uint64_t>{70, 130});
    const auto& calls = test::InjectingKvm::clear_calls;
    if (manual) {
        // Chunks of 128 pages from the 64-aligned page below the part: [64, 192) holds both
        // pages, [192, 256) none of the part's (200 is past it), so it is not sent. The mask
        // holds the part's pages only.
        REQUIRE(calls.size() == 1);
        CHECK(calls[0].first_page == 64);
        CHECK(calls[0].num_pages == 128);
        CHECK(calls[0].mask == std::vector<std::uint64_t>{std::uint64_t{1} << 6, 1U << 2});
        CHECK(g.kvm->pending_dirty_pages() == 0); // the rest stays in KVM's bitmap
    } else {
        CHECK(calls.empty());
        CHECK(g.kvm->pending_dirty_pages() == 3); // the rest, read and cleared, waits by GPA
    }
    // Taken is taken; the pages outside the part are still reported, once.
    CHECK(pages_in(must(g.kvm->take_dirty_log(part)), 65).empty());
    const MemoryRange ram = range(MiB, 2 * MiB);
    CHECK(pages_in(must(g.kvm->take_dirty_log(ram)), 0) == std::vector<std::uint64_t>{3, 200, 255});
    CHECK(pages_in(must(g.kvm->take_dirty_log(ram)), 0).empty());
    CHECK(g.kvm->pending_dirty_pages() == 0);
    if (manual) {
        // The whole window: chunk [0, 128) for page 3, [128, 256) for 200 and 255; the last
        // chunk ends the slot.
        REQUIRE(calls.size() == 3);
        CHECK(calls[1].first_page == 0);
        CHECK(calls[1].mask == std::vector<std::uint64_t>{8, 0});
        CHECK(calls[2].first_page == 128);
        CHECK(calls[2].num_pages == 128);
        CHECK(calls[2].mask ==
              std::vector<std::uint64_t>{0, (std::uint64_t{1} << 8) | (std::uint64_t{1} << 63)});
    }

    // The pages cleared are protected again: the guest's next writes are logged.
    g.load(write_pages({70, 200}));
    g.run_to_halt();
    CHECK(pages_in(must(g.kvm->take_dirty_log(ram)), 0) == std::vector<std::uint64_t>{70, 200});

    // A slot smaller than 64 pages: a PAM segment of 4 pages, cleared as [0, 4), its end.
    const MemoryRange pam = MemoryRange::constant(0xc0000, 0xc4000);
    X86Asm a;
    a.mov(X86Asm::edi, 0xc1000).store_byte_edi(1).hlt();
    g.load(a);
    g.run_to_halt();
    test::InjectingKvm::clear_calls.clear();
    CHECK(pages_in(must(g.kvm->take_dirty_log(range(0xc1000, 0xc2000))), 1) ==
          std::vector<std::uint64_t>{1});
    if (manual) {
        REQUIRE(calls.size() == 1);
        CHECK(calls[0].first_page == 0);
        CHECK(calls[0].num_pages == 4);
        CHECK(calls[0].mask == std::vector<std::uint64_t>{2});
    }
    CHECK(pages_in(must(g.kvm->take_dirty_log(pam)), 0).empty());

    // Through the manager: a range across windows takes the guest's pages in it, and the
    // VMM's marks, and leaves the rest.
    g.load(write_pages({10, 100}));
    g.run_to_halt();
    std::vector<std::uint64_t> low(1);
    must(g.manager.take_dirty_bitmap(range(MiB + 64 * page_size, MiB + 128 * page_size), low));
    CHECK(pages_in(low, 64) == std::vector<std::uint64_t>{100});
    std::vector<std::uint64_t> whole(4);
    must(g.manager.take_dirty_bitmap(ram, whole));
    CHECK(pages_in(whole, 0) == std::vector<std::uint64_t>{10});
    must(g.manager.stop_dirty_tracking());
    test::InjectingKvm::reset();
}
} // namespace

TEST_CASE("a take of part of a window resets only that part, with or without manual protect")
{
    // The kernel in the emulated VM (6.1) has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
    SUBCASE("manual protect: KVM_CLEAR_DIRTY_LOG of the part, in 64-page aligned chunks")
    {
        check_part_take(false);
    }
    SUBCASE("clear-on-read: the rest of the slot waits in the pending log")
    {
        check_part_take(true);
    }
}

TEST_CASE("a part that is not a page-aligned piece of one window is refused")
{
    Guest<> g;
    must(g.manager.start_dirty_tracking());
    CHECK(g.kvm->take_dirty_log(range(MiB - page_size, MiB + page_size)).error().code() ==
          errc::not_found); // two windows
    CHECK(g.kvm->take_dirty_log(range(16 * MiB, 17 * MiB)).error().code() == errc::not_found);
    must(g.manager.stop_dirty_tracking());
    CHECK(g.kvm->take_dirty_log(range(MiB, 2 * MiB)).error().code() == errc::conflict);
}

TEST_CASE("a failed stop_dirty_tracking leaves logging on and every logged page reported")
{
    test::InjectingKvm::reset();
    Guest<test::InjectingKvm> g;
    must(g.manager.start_dirty_tracking());
    const auto map = g.manager.memory_map();
    const RegionId ram = map.regions.back().id; // the RAM above 1 MiB: the last of 16 slots
    const RegionId low = map.region_at(Gpa{0x5000})->id;
    (void)g.partition_log(ram);
    (void)g.partition_log(low);
    X86Asm a;
    a.mov(X86Asm::edi, MiB + 7 * page_size).store_byte_edi(1).hlt();
    g.load(a);
    g.run_to_halt();
    // Page 7 waits in the pending log of a deleted slot (a permission change and back)...
    must(g.manager.map_region(ram, {false, true, false}));
    must(g.manager.map_region(ram, {true, true, false}));
    REQUIRE(g.kvm->pending_dirty_pages() == 1);
    // ...page 9 in the live slot's bitmap, and low RAM's page 5 in its own slot.
    a = X86Asm{};
    a.mov(X86Asm::edi, 0x5000)
        .store_byte_edi(1)
        .mov(X86Asm::edi, MiB + 9 * page_size)
        .store_byte_edi(1)
        .hlt();
    g.load(a);
    g.run_to_halt();

    // Turning logging off fails at the last slot (RAM's), after 15 slots were turned off and
    // RAM's bitmap was read: the 15 go back to logging, RAM's bits wait in the pending log.
    test::InjectingKvm::memslot_plan = test::Plan{15, EIO};
    auto r = g.manager.stop_dirty_tracking();
    REQUIRE_FALSE(r);
    CHECK(test::InjectingKvm::memslot_plan.fired);
    CHECK(r.error().code() == std::errc::io_error);
    test::InjectingKvm::reset();
    // Every bit read before the failure is kept: RAM's pages 7 (from the deleted slot) and 9
    // (its live bitmap, read before its flags failed), and low RAM's page 5 (its bitmap was
    // read, its logging turned off and on again). (Low RAM also reports the page the guest ran
    // its code from: KVM logs a page it maps writable on a read fault.)
    CHECK(g.partition_log(ram)[0] == ((std::uint64_t{1} << 7) | (std::uint64_t{1} << 9)));
    CHECK((g.partition_log(low)[0] & (std::uint64_t{1} << 5)) != 0);
    CHECK(g.kvm->pending_dirty_pages() == 0);
    // Logging is still on in every slot: the guest's next writes are logged.
    a = X86Asm{};
    a.mov(X86Asm::edi, 0x6000)
        .store_byte_edi(1)
        .mov(X86Asm::edi, MiB + 11 * page_size)
        .store_byte_edi(1)
        .hlt();
    g.load(a);
    g.run_to_halt();
    CHECK(g.partition_log(ram)[0] == std::uint64_t{1} << 11);
    CHECK((g.partition_log(low)[0] & (std::uint64_t{1} << 6)) != 0);
    // And it can be turned off afterwards, which discards the log.
    must(g.manager.stop_dirty_tracking());
    CHECK(g.kvm->pending_dirty_pages() == 0);
}

// ---- the quiesce bracket with a running vCPU ----

namespace {
constexpr std::uint32_t pam_byte = 0xc0010;         // in the 0xc0000 PAM segment
constexpr std::uint32_t heartbeat = result_gpa + 4; // the guest's loop counter
constexpr std::uint8_t ram_value = 0x5a;
constexpr MemoryRange pam_segment = MemoryRange::constant(0xc0000, 0xc4000);

/// The guest: reads the PAM byte in a loop, counting; stores what it read and halts the first
/// time it is not ram_value.
X86Asm pam_reader()
{
    X86Asm a;
    a.label("loop")
        .load_al(pam_byte)
        .cmp_al(ram_value)
        .jnz("bad")
        .add_eax(0x100) // above AL, which the load overwrites
        .store_eax(heartbeat)
        .jmp("loop")
        .label("bad")
        .store_al(result_gpa)
        .hlt();
    return a;
}

/// The vCPU thread of the toggle tests: runs pam_reader through the gate, answers MMIO reads
/// with open-bus bytes (as the example VMM does), and records what happened.
struct Reader {
    std::mutex mutex;
    std::condition_variable changed;
    std::vector<Exit> mmio_reads;
    bool halted = false;
    std::string failure;

    template <class G>
    void run(G& g)
    {
        for (;;) {
            const Exit e = g.gate.run();
            std::lock_guard lock(mutex);
            if (e.kind == Exit::Kind::mmio && !e.write) {
                mmio_reads.push_back(e);
                g.vm.answer_mmio(~std::uint64_t{0});
                changed.notify_all();
                continue;
            }
            if (e.kind == Exit::Kind::halt)
                halted = true;
            else if (e.kind != Exit::Kind::interrupted) // interrupted: the gate was stopped
                failure = "unexpected exit, kind " + std::to_string(static_cast<int>(e.kind));
            changed.notify_all();
            return;
        }
    }
};

template <class G>
void start_reader(G& g)
{
    REQUIRE(g.memory.template write_plain<std::uint8_t>(Gpa{pam_byte}, ram_value).has_value());
    REQUIRE(g.memory.template write_plain<std::uint32_t>(Gpa{result_gpa}, 0).has_value());
    REQUIRE(g.memory.template write_plain<std::uint32_t>(Gpa{heartbeat}, 0).has_value());
    g.load(pam_reader());
}
} // namespace

TEST_CASE("with the quiesce hook, a guest reading a PAM page toggled RW/RO 1,000 times sees "
          "only its RAM")
{
    test::InjectingKvm::reset();
    Guest<test::InjectingKvm> g; // hooked: the gate holds the vCPU during every replacement
    start_reader(g);
    std::uint64_t deletions = 0;
    std::uint64_t deletions_while_running = 0;
    test::InjectingKvm::after_memslot = [&](std::uint64_t gpa, std::uint64_t size) {
        if (size == 0 && gpa == pam_segment.start()) {
            ++deletions;
            if (g.gate.running())
                ++deletions_while_running;
        }
    };
    Reader reader;
    std::thread vcpu([&] { reader.run(g); });
    auto control = g.manager.ram_visibility_control();
    std::uint32_t seen = 0;
    for (int i = 0; i < 1000; ++i) {
        // Let the guest read the page at least once in this state: wait for its counter to move
        // (a running guest moves it; a halted one, or a failure, ends the wait too).
        for (;;) {
            const std::uint32_t now =
                g.memory.template read_plain<std::uint32_t>(Gpa{heartbeat}).value();
            std::lock_guard lock(reader.mutex);
            if (now != seen || reader.halted || !reader.failure.empty()) {
                seen = now;
                break;
            }
            std::this_thread::yield();
        }
        must(control.set_ram_visibility(pam_segment, i % 2 == 0 ? RamVisibility::read_only
                                                                : RamVisibility::read_write));
    }
    g.gate.stop();
    vcpu.join();
    test::InjectingKvm::reset();
    CHECK(reader.failure.empty());
    CHECK_FALSE(reader.halted); // the guest never read anything but ram_value
    CHECK(reader.mmio_reads.empty());
    CHECK(g.result_byte() == 0);
    CHECK(deletions == 1000);            // every toggle replaced the slot...
    CHECK(deletions_while_running == 0); // ...with the vCPU out of KVM_RUN
    CHECK(g.gate.kicks() > 0);           // which the gate had to kick it out of
    MESSAGE("the gate kicked the vCPU " << g.gate.kicks() << " times in 1,000 toggles");
}

TEST_CASE("without the quiesce hook, the same toggle shows the guest an MMIO exit on its RAM")
{
    // A deterministic demonstration: one RW -> RO toggle, stopped (through the ioctl seam) just
    // after KVM deleted the RAM slot and before it creates the read-only one, until the
    // running guest has read the page. (Racing 1,000 toggles against the guest would hit that
    // window only by chance: the test VM has one CPU.)
    test::InjectingKvm::reset();
    Guest<test::InjectingKvm> g(Hooked::no);
    start_reader(g);
    Reader reader;
    bool timed_out = false;
    test::InjectingKvm::after_memslot = [&](std::uint64_t gpa, std::uint64_t size) {
        if (size != 0 || gpa != pam_segment.start())
            return;
        std::unique_lock lock(reader.mutex);
        // The bound is a safety net against a hang, not the synchronisation.
        timed_out = !reader.changed.wait_for(lock, std::chrono::seconds(60), [&] {
            return !reader.mmio_reads.empty() || reader.halted || !reader.failure.empty();
        });
    };
    std::thread vcpu([&] { reader.run(g); });
    // The guest is running once its counter moves.
    while (g.memory.template read_plain<std::uint32_t>(Gpa{heartbeat}).value() == 0)
        std::this_thread::yield();
    must(g.manager.ram_visibility_control().set_ram_visibility(pam_segment,
                                                               RamVisibility::read_only));
    vcpu.join(); // the guest halts: it read a value it never wrote
    test::InjectingKvm::reset();
    CHECK_FALSE(timed_out);
    CHECK(reader.failure.empty());
    REQUIRE(reader.mmio_reads.size() == 1);
    CHECK(reader.mmio_reads[0].address == pam_byte); // an MMIO exit on RAM
    CHECK(reader.halted);
    CHECK(g.result_byte() == 0xff); // the open-bus byte, not ram_value
    CHECK(g.memory.template read_plain<std::uint8_t>(Gpa{pam_byte}).value() == ram_value);
}

TEST_CASE("prefetch uses KVM_PRE_FAULT_MEMORY where the kernel has it, else says unsupported")
{
    Guest<> g;
    auto r = g.kvm->prefetch_range(MiB, MiB);
    REQUIRE_FALSE(r); // no vCPU given yet
    CHECK(r.error().code() == errc::unsupported);
    must(g.kvm->set_prefetch_vcpu(g.vm.vcpu_fd()));
    auto with_vcpu = g.kvm->prefetch_range(MiB, MiB);
    if (g.kvm->capabilities().pre_fault_memory) {
        CHECK(with_vcpu.has_value());
    } else {
        REQUIRE_FALSE(with_vcpu);
        CHECK(with_vcpu.error().code() == errc::unsupported);
        CHECK(with_vcpu.error().message().find("KVM_PRE_FAULT_MEMORY") != std::string::npos);
    }
}

TEST_CASE("prefetch drives KVM_PRE_FAULT_MEMORY to the end of the range (scripted kernel)")
{
    // This project's kernels lack the ioctl, so a scripted one stands in: partial progress, a
    // signal (EINTR) and a race (EAGAIN) before the rest.
    test::InjectingKvm::reset();
    test::InjectingKvm::fake_pre_fault = true;
    test::InjectingKvm::pre_fault_script = {{0x10000, 0}, {0, EINTR}, {0, EAGAIN}, {0x1000, 0}};
    Guest<test::InjectingKvm> g;
    REQUIRE(g.kvm->capabilities().pre_fault_memory);
    must(g.kvm->set_prefetch_vcpu(g.vm.vcpu_fd()));

    must(g.kvm->prefetch_range(MiB, MiB));
    const auto& calls = test::InjectingKvm::pre_fault_calls;
    REQUIRE(calls.size() == 5); // the last call, unscripted, finishes the range
    CHECK((calls[0].gpa == MiB && calls[0].size == MiB));
    for (std::size_t i = 1; i <= 3; ++i) // retries resume where the kernel left off
        CHECK((calls[i].gpa == MiB + 0x10000 && calls[i].size == MiB - 0x10000));
    CHECK((calls[4].gpa == MiB + 0x11000 && calls[4].size == MiB - 0x11000));

    SUBCASE("a kernel error part-way is returned, naming where it stopped")
    {
        test::InjectingKvm::pre_fault_calls.clear();
        test::InjectingKvm::pre_fault_script = {{0x1000, 0}, {0, ENOENT}};
        auto r = g.kvm->prefetch_range(MiB, MiB);
        REQUIRE_FALSE(r);
        CHECK(r.error().code() == std::errc::no_such_file_or_directory);
        CHECK(r.error().message().find("failed at 0x101000") != std::string::npos);
        CHECK(test::InjectingKvm::pre_fault_calls.size() == 2);
    }
    SUBCASE("EINTR and EAGAIN are retried a bounded number of times in a row")
    {
        using P = KvmPartition<test::InjectingKvm>;
        test::InjectingKvm::pre_fault_calls.clear();
        // As many retries as allowed, then progress (which resets the count), then as many
        // again: it finishes.
        test::InjectingKvm::pre_fault_script.assign(P::max_prefetch_retries, {0, EINTR});
        test::InjectingKvm::pre_fault_script.push_back({0x1000, 0});
        test::InjectingKvm::pre_fault_script.insert(test::InjectingKvm::pre_fault_script.end(),
                                                    P::max_prefetch_retries, {0, EAGAIN});
        must(g.kvm->prefetch_range(MiB, MiB));
        CHECK(test::InjectingKvm::pre_fault_calls.size() == 2 * P::max_prefetch_retries + 2);
        // One more in a row is an error, not an endless loop.
        test::InjectingKvm::pre_fault_calls.clear();
        test::InjectingKvm::pre_fault_script.assign(P::max_prefetch_retries + 1, {0, EAGAIN});
        auto r = g.kvm->prefetch_range(MiB, MiB);
        REQUIRE_FALSE(r);
        CHECK(r.error().code() == std::errc::resource_unavailable_try_again);
        CHECK(r.error().message().find("retries without progress") != std::string::npos);
        CHECK(test::InjectingKvm::pre_fault_calls.size() == P::max_prefetch_retries + 1);
    }
    SUBCASE("a success without progress is an error, not an endless loop")
    {
        test::InjectingKvm::pre_fault_calls.clear();
        test::InjectingKvm::pre_fault_script = {{0, 0}};
        auto r = g.kvm->prefetch_range(MiB, MiB);
        REQUIRE_FALSE(r);
        CHECK(r.error().code() == std::errc::io_error);
        CHECK(r.error().message().find("without progress") != std::string::npos);
        CHECK(test::InjectingKvm::pre_fault_calls.size() == 1);
    }
    SUBCASE("the manager prefetches a region mapped with prefetch, and only that one")
    {
        auto object = filled_memfd(MiB, 0x5a);
        const RegionId plain =
            must(g.manager.add_region("plain", range(4 * MiB, 5 * MiB), 100, MappingType::Ram));
        must(g.manager.add_mapping(
            plain, {range(0, MiB), MappingBacking::file(object, Offset{0}), true, {}}));
        const RegionId eager =
            must(g.manager.add_region("eager", range(6 * MiB, 7 * MiB), 100, MappingType::Ram));
        must(g.manager.add_mapping(
            eager, {range(0, MiB), MappingBacking::file(object, Offset{0}), true, {}}));
        test::InjectingKvm::pre_fault_calls.clear();
        test::InjectingKvm::pre_fault_script.clear(); // each call does the whole range
        must(g.manager.map_region(plain, {true, true, false}));
        CHECK(test::InjectingKvm::pre_fault_calls.empty());
        must(g.manager.map_region(eager, {true, true, true}));
        REQUIRE(test::InjectingKvm::pre_fault_calls.size() == 1);
        CHECK((test::InjectingKvm::pre_fault_calls[0].gpa == 6 * MiB &&
               test::InjectingKvm::pre_fault_calls[0].size == MiB));
        // Prefetch is advice: a kernel that refuses it does not fail the mapping.
        must(g.manager.unmap_region(eager));
        test::InjectingKvm::pre_fault_calls.clear();
        test::InjectingKvm::pre_fault_script = {{0, ENOENT}};
        must(g.manager.map_region(eager, {true, true, true}));
        CHECK(test::InjectingKvm::pre_fault_calls.size() == 1);
        g.load(copy_byte(6 * MiB + 0x10));
        g.run_to_halt();
        CHECK(g.result_byte() == 0x5a);
    }
    test::InjectingKvm::reset();
}

TEST_CASE("pin_mappings keeps the RAM behind every slot resident (mlock)")
{
    KvmVm vm = make_vm();
    using Manager = LinuxGuestMemoryManager<KvmPartition<>>;
    Manager m = must(Manager::builder()
                         .pin_mappings(true)
                         .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                         .build(Length{4 * MiB}));
    auto kvm = must(KvmPartition<>::create(vm.vm_fd()));
    const PartitionId id = must(m.attach_partition(Vtl::vtl0, kvm));
    REQUIRE(kvm->slots().size() == 1);
    CHECK(kvm->slots()[0].pinned);
    const auto smaps = test::smaps_for(m.guest_memory().mapper()->base());
    REQUIRE(smaps.found);
    CHECK(smaps.vm_flags.find(" lo") != std::string::npos); // VM_LOCKED
    must(m.detach_partition(id));
    CHECK(test::smaps_for(m.guest_memory().mapper()->base()).vm_flags.find(" lo") ==
          std::string::npos);
}

TEST_CASE("under the VMM's mlockall(MCL_FUTURE), unpin leaves guest RAM locked")
{
    // mlockall changes the whole process, so a child does it, on a VM of its own (a KVM VM
    // belongs to the process that created it). Exit codes: 0 pass, 2 mlockall refused,
    // 3 not locked while pinned, 4 unlocked by unpin, 5 setup failed.
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        // MCL_FUTURE is the part that matters: guest RAM is mapped after this call, so the
        // kernel locks it as it is created, before any pin. MCL_CURRENT is left out because it
        // would also fault in and lock a sanitizer runtime's terabytes of shadow reservations.
        // A raw system call: sanitizer runtimes intercept mlockall() and make it a no-op, so
        // under ASan the libc call would lock nothing and the test would check nothing.
        if (::syscall(SYS_mlockall, MCL_FUTURE) != 0)
            ::_exit(2);
        std::string why;
        auto vm = KvmVm::create(why);
        using Manager = LinuxGuestMemoryManager<KvmPartition<>>;
        auto m = Manager::builder()
                     .pin_mappings(true)
                     .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                     .build(Length{4 * MiB});
        if (!vm || !m)
            ::_exit(5);
        auto kvm = KvmPartition<>::create(vm->vm_fd());
        if (!kvm)
            ::_exit(5);
        auto id = m->attach_partition(Vtl::vtl0, *kvm);
        if (!id || (*kvm)->slots().size() != 1 || !(*kvm)->slots()[0].pinned)
            ::_exit(5);
        const void* ram = m->guest_memory().mapper()->base();
        if (test::smaps_for(ram).vm_flags.find(" lo") == std::string::npos)
            ::_exit(3);
        if (!m->detach_partition(*id))
            ::_exit(5);
        ::_exit(test::smaps_for(ram).vm_flags.find(" lo") == std::string::npos ? 4 : 0);
    }
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a pin the kernel refuses part-way leaves nothing locked")
{
    // Host memory with a hole in the middle: mlock locks the first page, then fails at the
    // hole. KVM accepts the slot (it checks the range only when the guest touches it).
    KvmVm vm = make_vm();
    auto kvm = must(KvmPartition<>::create(vm.vm_fd()));
    void* p =
        ::mmap(nullptr, 3 * page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    auto* host = static_cast<std::byte*>(p);
    REQUIRE(::munmap(host + page_size, page_size) == 0);
    must(kvm->map_range(host, 8 * MiB, 3 * page_size, true, false));

    auto r = kvm->pin_range(8 * MiB, 3 * page_size);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == std::errc::not_enough_memory); // ENOMEM: the hole
    CHECK(r.error().message().find("could not pin") != std::string::npos);
    CHECK_FALSE(kvm->slots().at(0).pinned);
    const auto first = test::smaps_for(host);
    REQUIRE(first.found);
    CHECK(first.vm_flags.find(" lo") == std::string::npos); // the part mlock did lock is undone
    must(kvm->unmap_range(8 * MiB, 3 * page_size));
    ::munmap(host, page_size);
    ::munmap(host + 2 * page_size, page_size);
}

TEST_CASE("slot exhaustion, with the limit lowered through the seam, is a clean error")
{
    test::InjectingKvm::reset();
    test::InjectingKvm::memslot_limit = 16; // exactly the x86 legacy layout
    Guest<test::InjectingKvm> g;
    CHECK(g.kvm->capabilities().max_slots == 16);
    const auto slots_before = g.kvm->slots();
    const auto map_before = g.manager.memory_map().to_text();

    auto dev = must(g.manager.device_memory_mapper().new_region("one-too-many", Length{0x1000}));
    auto r = dev.map_to_guest(Gpa{8 * MiB}, Protection::read_write);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::resource_exhausted);
    CHECK(r.error().full_message().find("KVM memory slot limit of 16 reached") !=
          std::string::npos);
    CHECK(g.kvm->slots() == slots_before);
    CHECK(g.manager.memory_map().to_text() == map_before);
    CHECK_FALSE(dev.placement().has_value());

    // Attaching a partition that cannot hold the layout fails whole: it keeps no slot.
    test::InjectingKvm::memslot_limit = 10;
    auto small = must(KvmPartition<test::InjectingKvm>::create(g.vm.vm_fd()));
    auto attach = g.manager.attach_partition(Vtl::vtl0, small);
    REQUIRE_FALSE(attach);
    CHECK(attach.error().code() == errc::resource_exhausted); // the root's code stays
    CHECK(attach.error().message() == "failed to attach partition to memory manager");
    CHECK(attach.error().full_message().find("KVM memory slot limit of 10 reached") !=
          std::string::npos);
    CHECK(small->slots().empty());
    test::InjectingKvm::reset();
}

TEST_CASE("an ioctl failure in the middle of an operation leaves partition and manager unchanged")
{
    test::InjectingKvm::reset();
    Guest<test::InjectingKvm> g;
    // VGA device memory under the VGA window: unmapping the window deletes RAM's slot, then
    // creates the device's. The second memslot call fails.
    auto vram = test::place_device(g.manager, "vga-vram", Gpa{0xa0000}, Length{0x20000},
                                   filled_memfd(0x20000, 0x3c));
    REQUIRE(g.memory.write_plain<std::uint8_t>(Gpa{0xa0010}, 0x42).has_value()); // RAM's byte
    const auto slots_before = g.kvm->slots();
    const auto map_before = g.manager.memory_map().to_text();

    test::InjectingKvm::memslot_plan = test::Plan{1, EINVAL}; // let 1 through, fail the 2nd
    auto r = g.manager.ram_visibility_control().set_ram_visibility(range(0xa0000, 0xc0000),
                                                                   RamVisibility::unmapped);
    REQUIRE_FALSE(r);
    CHECK(test::InjectingKvm::memslot_plan.fired);
    CHECK(r.error().code() == std::errc::invalid_argument);
    CHECK(g.kvm->slots() == slots_before);
    CHECK(g.manager.memory_map().to_text() == map_before);
    // And the guest still sees RAM there.
    g.load(copy_byte(0xa0010));
    g.run_to_halt();
    CHECK(g.result_byte() == 0x42);

    // Without the failure the same call works, and the guest sees the device.
    test::InjectingKvm::reset();
    must(g.manager.ram_visibility_control().set_ram_visibility(range(0xa0000, 0xc0000),
                                                               RamVisibility::unmapped));
    g.run_to_halt();
    CHECK(g.result_byte() == 0x3c);
}

// The partition conformance suite, for KVM (a VM per case, host memory from a memfd).
namespace {
struct KvmFixture {
    KvmVm vm = make_vm();
    Mappable object = test::make_memfd(80 * page_size);
    std::byte* memory = nullptr;
    std::shared_ptr<KvmPartition<>> partition;
    KvmFixture()
    {
        void* p = ::mmap(nullptr, 80 * page_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                         object.native_handle(), 0);
        REQUIRE(p != MAP_FAILED);
        memory = static_cast<std::byte*>(p);
        partition = must(KvmPartition<>::create(vm.vm_fd()));
    }
    ~KvmFixture() { ::munmap(memory, 80 * page_size); }
    std::byte* host(std::uint64_t offset) { return memory + offset; }
};
} // namespace

// ---- a live migration with a running guest ----

namespace {
/// The migration guest's counters: one dword in every third page of RAM above 1 MiB.
constexpr std::uint32_t counter_first = 1 * MiB + 8;
constexpr std::uint32_t counter_stride = 3 * page_size;
constexpr std::uint32_t counters =
    (test::migration::ram_end - MiB) / counter_stride; // 597, over 7 MiB of RAM

/// The guest: increments every counter, round after round, forever.
X86Asm counting_guest()
{
    X86Asm a;
    a.label("round")
        .mov(X86Asm::edi, counter_first)
        .mov(X86Asm::ecx, counters)
        .label("next")
        .inc_dword_edi()
        .add_edi(counter_stride)
        .dec_ecx()
        .jnz("next")
        .jmp("round");
    return a;
}

template <class Tracking>
using KvmManager = BasicGuestMemoryManager<Tracking, NestedPriority, DefaultVaPolicy,
                                           KvmPartition<test::InjectingKvm>>;

/// A source under KVM (its guest counting on a vCPU thread through the gate, three VMM writers)
/// migrated into a destination, pass after pass; the last pass with the vCPU stopped and the
/// writers joined. `drop_guest_log` hides the partition's log from every take (the loop's check
/// must then fail). Returns the pages that differ at the end. Tracking: the source's layout.
template <class Tracking>
std::uint64_t migrate_running_guest(bool drop_guest_log)
{
    using namespace test::migration;
    using KvmSide = Side<KvmManager<Tracking>>;
    test::InjectingKvm::reset();
    KvmVm vm = make_vm();
    // Before the managers: their teardown (and the BAR's) still goes through the gate's hook.
    example::VcpuGate gate{vm};
    KvmSide src = KvmSide::make();
    KvmSide dst = KvmSide::make();
    auto kvm = must(KvmPartition<test::InjectingKvm>::create(vm.vm_fd()));
    must(src.m.attach_partition(Vtl::vtl0, kvm, gate.hook()));
    REQUIRE(src.mem.write(Gpa{code_gpa}, counting_guest().code()));
    REQUIRE(vm.start_at(code_gpa));

    must(src.m.start_dirty_tracking());
    copy_runs({{Gpa{0}, Length{space}}}, src, dst); // pass 0: everything

    std::atomic<bool> stop{false};
    std::string vcpu_failure;
    std::thread vcpu([&] {
        const Exit e = gate.run(); // only a stop ends it: the guest never exits on its own
        if (e.kind != Exit::Kind::interrupted)
            vcpu_failure = "unexpected exit, kind " + std::to_string(static_cast<int>(e.kind)) +
                           " at " + MemoryRange::hex(e.address);
    });
    std::vector<std::thread> writers =
        start_vmm_writers(src.mem, stop, range(code_gpa, code_gpa + page_size));
    test::InjectingKvm::drop_dirty_log = drop_guest_log;
    const PassesDone done = run_passes(src, dst, 21); // 7 PAM toggles: it ends read-only
    stop.store(true);
    for (auto& w : writers)
        w.join();
    gate.stop();
    vcpu.join();
    CHECK(vcpu_failure.empty());
    last_pass(src, dst, done);
    test::InjectingKvm::reset();

    // The guest ran: its counters moved, and each is read from the source's memory.
    std::uint64_t rounds = 0;
    for (std::uint32_t i = 0; i < counters; i += 100)
        rounds +=
            src.mem.template read_plain<std::uint32_t>(Gpa{counter_first + i * counter_stride})
                .value();
    CHECK(rounds > 0);
    CHECK(done.copied > 0);
    std::uint64_t compared = 0;
    const std::uint64_t differing = differing_pages(src, dst, compared);
    CHECK(done.pam_state == RamVisibility::read_only);
    CHECK(compared == (ram_end + bar_size) / page); // RAM and the BAR
    return differing;
}
} // namespace

// In both layouts of the source's dirty map: KVM's log merged into bits or bytes, pass after pass.
TEST_CASE_TEMPLATE(
    "migration with a running KVM guest: the guest's log and the VMM's marks, PAM, a BAR", Tracking,
    DirtyTracking, ByteMapDirtyTracking)
{
    CHECK(migrate_running_guest<Tracking>(false) == 0);
}

TEST_CASE_TEMPLATE("the KVM loop's check has teeth: without the guest's log, the copy differs",
                   Tracking, DirtyTracking, ByteMapDirtyTracking)
{
    CHECK(migrate_running_guest<Tracking>(true) > 0);
}

TEST_CASE_TEMPLATE_INVOKE(partition_conformance, KvmFixture);

int main(int argc, char** argv)
{
    std::string why;
    if (!KvmVm::create(why)) {
        std::printf("SKIPPED: KVM is not usable here: %s\n", why.c_str());
        return 77;
    }
    doctest::Context context(argc, argv);
    return context.run();
}
