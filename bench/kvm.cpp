// KVM benchmarks, each beside its baseline:
//
//   BM_KvmMapRegion/raw/<size>        KVM_SET_USER_MEMORY_REGION2 create + delete, by hand: the
//                                     floor the policy sits on
//   BM_KvmMapRegion/<size>            KvmPartition::map_range + unmap_range of one window
//   BM_KvmMapRegion/manager/<size>    map_region + unmap_region of a region through the whole
//                                     GuestMemoryManager (VA mapper mmap + memslot)
//   BM_KvmGuestTouch/no_prefetch      a guest loop that writes one byte in every page of a fresh
//                                     64 MiB region (16384 pages), timed from KVM_RUN to HLT
//   BM_KvmGuestTouch/prefetch         the same after KVM_PRE_FAULT_MEMORY of the region (skipped,
//                                     with the reason, where the kernel lacks it)
//   BM_KvmGuestTouch/host_populated   the same after MADV_POPULATE_WRITE of the host VA: what is
//                                     left is the second-level (NPT/EPT) faults alone
//
// Sizes: 2 MiB and 1 GiB. Every benchmark reports an error instead of a number without /dev/kvm.
#include <membacking/membacking.hpp>

#include "kvm_vcpu.hpp"
#include "x86_asm.hpp"

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <sys/mman.h>

using namespace membacking;
using example::KvmVm;
using example::X86Asm;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t GiB = std::uint64_t{1} << 30;
constexpr std::uint64_t touch_gpa = 16 * MiB;
constexpr std::uint64_t touch_size = 64 * MiB;

using Manager = LinuxGuestMemoryManager<KvmPartition<>>;

std::optional<KvmVm> make_vm(benchmark::State& state)
{
    std::string why;
    auto vm = KvmVm::create(why);
    if (!vm)
        state.SkipWithError(("KVM is not usable here: " + why).c_str());
    return vm;
}

/// Host memory for windows: a memfd of `size` mapped shared (never touched by the map benches).
struct HostMemory {
    explicit HostMemory(std::uint64_t size) : size_(size)
    {
        auto object = LinuxMmap<>::create_shared_memory(size, "bench-kvm");
        if (!object)
            return;
        object_ = *object;
        void* p =
            ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, object_.native_handle(), 0);
        base_ = p == MAP_FAILED ? nullptr : p;
    }
    ~HostMemory()
    {
        if (base_ != nullptr)
            ::munmap(base_, size_);
    }
    HostMemory(const HostMemory&) = delete;
    HostMemory& operator=(const HostMemory&) = delete;
    std::uint64_t size_;
    Mappable object_;
    void* base_ = nullptr;
};

void map_region_raw(benchmark::State& state)
{
    const auto size = static_cast<std::uint64_t>(state.range(0));
    auto vm = make_vm(state);
    HostMemory host(size);
    if (!vm || host.base_ == nullptr)
        return;
    detail::kvm_abi::UserspaceMemoryRegion2 r{};
    r.slot = 0;
    r.guest_phys_addr = GiB;
    r.userspace_addr = reinterpret_cast<std::uint64_t>(host.base_);
    for (auto _ : state) {
        r.memory_size = size;
        if (::ioctl(vm->vm_fd(), detail::kvm_abi::set_user_memory_region2, &r) != 0) {
            state.SkipWithError("KVM_SET_USER_MEMORY_REGION2 failed");
            return;
        }
        r.memory_size = 0;
        ::ioctl(vm->vm_fd(), detail::kvm_abi::set_user_memory_region2, &r);
    }
}

void map_region_policy(benchmark::State& state)
{
    const auto size = static_cast<std::uint64_t>(state.range(0));
    auto vm = make_vm(state);
    HostMemory host(size);
    if (!vm || host.base_ == nullptr)
        return;
    auto kvm = KvmPartition<>::create(vm->vm_fd());
    if (!kvm) {
        state.SkipWithError(kvm.error().full_message().c_str());
        return;
    }
    for (auto _ : state) {
        if (!(*kvm)->map_range(host.base_, GiB, size, true, true) ||
            !(*kvm)->unmap_range(GiB, size)) {
            state.SkipWithError("map/unmap failed");
            return;
        }
    }
}

void map_region_manager(benchmark::State& state)
{
    const auto size = static_cast<std::uint64_t>(state.range(0));
    auto vm = make_vm(state);
    if (!vm)
        return;
    auto m = Manager::builder()
                 .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, MiB)}))
                 .build(Length{2 * GiB + size});
    auto kvm = KvmPartition<>::create(vm->vm_fd());
    auto object = LinuxMmap<>::create_shared_memory(size, "bench-kvm-region");
    if (!m || !kvm || !object || !m->attach_partition(Vtl::vtl0, *kvm)) {
        state.SkipWithError("setup failed");
        return;
    }
    const auto id =
        m->add_region("bench", MemoryRange::valid_or_abort(GiB, GiB + size), 10, MappingType::Ram);
    if (!id || !m->add_mapping(*id, {MemoryRange::valid_or_abort(0, size),
                                     MappingBacking::file(*object, Offset{0}),
                                     true,
                                     {}})) {
        state.SkipWithError("region setup failed");
        return;
    }
    for (auto _ : state) {
        if (!m->map_region(*id, {true, true, false}) || !m->unmap_region(*id)) {
            state.SkipWithError("map/unmap failed");
            return;
        }
    }
}

/// no_prefetch: nothing populated; prefetch: KVM_PRE_FAULT_MEMORY only (MapParams::prefetch);
/// va_prefetch: what RamBackingRequest::prefetch(true) asks for (the mapping's
/// MemoryPolicy::prefetch and MapParams::prefetch): the manager populates the primary VA mapper's
/// host pages when it maps them; host_populated: the benchmark does that by hand.
enum class Touch : std::uint8_t { no_prefetch, prefetch, va_prefetch, host_populated };

void guest_touch(benchmark::State& state, Touch mode)
{
    auto vm = make_vm(state);
    if (!vm)
        return;
    auto m = Manager::builder()
                 .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, MiB)}))
                 .build(Length{touch_gpa + touch_size});
    auto kvm = KvmPartition<>::create(vm->vm_fd());
    if (!m || !kvm || !m->attach_partition(Vtl::vtl0, *kvm)) {
        state.SkipWithError("setup failed");
        return;
    }
    if (!(*kvm)->set_prefetch_vcpu(vm->vcpu_fd())) {
        state.SkipWithError("duplicating the vCPU descriptor failed");
        return;
    }
    if (mode == Touch::prefetch && !(*kvm)->capabilities().pre_fault_memory) {
        state.SkipWithError("KVM_PRE_FAULT_MEMORY is not supported on this host");
        return;
    }
    X86Asm a;
    a.mov(X86Asm::edi, static_cast<std::uint32_t>(touch_gpa))
        .mov(X86Asm::ecx, static_cast<std::uint32_t>(touch_size / page_size))
        .label("loop")
        .store_byte_edi(1)
        .add_edi(static_cast<std::uint32_t>(page_size))
        .dec_ecx()
        .jnz("loop")
        .hlt();
    const auto code = a.code();
    auto memory = m->guest_memory();
    if (!memory.write(Gpa{0x1000}, code)) {
        state.SkipWithError("loading the guest failed");
        return;
    }
    const auto window = MemoryRange::valid_or_abort(touch_gpa, touch_gpa + touch_size);
    for (auto _ : state) {
        state.PauseTiming();
        // A fresh region: new, never-touched pages every iteration.
        auto object = LinuxMmap<>::create_shared_memory(touch_size, "bench-touch");
        auto id = m->add_region("touch", window, 10, MappingType::Ram);
        const bool va_prefetch = mode == Touch::va_prefetch;
        if (!object || !id ||
            !m->add_mapping(*id, {MemoryRange::valid_or_abort(0, touch_size),
                                  MappingBacking::file(*object, Offset{0}),
                                  true,
                                  {std::nullopt, false, va_prefetch}}) ||
            !m->map_region(*id, {true, true, mode == Touch::prefetch || va_prefetch})) {
            state.SkipWithError("mapping the fresh region failed");
            return;
        }
        if (mode == Touch::host_populated)
            ::madvise(memory.mapper()->base() + touch_gpa, touch_size,
                      23 /* MADV_POPULATE_WRITE */);
        vm->start_at(0x1000);
        state.ResumeTiming();
        const auto exit = vm->run(60);
        state.PauseTiming();
        if (exit.kind != KvmVm::Exit::Kind::halt) {
            state.SkipWithError("the guest did not halt");
            return;
        }
        (void)m->remove_region(*id);
        state.ResumeTiming();
    }
    state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(touch_size / page_size));
}

const bool registered = [] {
    for (const auto& [name, fn] : {std::pair{"BM_KvmMapRegion/raw", &map_region_raw},
                                   std::pair{"BM_KvmMapRegion", &map_region_policy},
                                   std::pair{"BM_KvmMapRegion/manager", &map_region_manager}})
        benchmark::RegisterBenchmark(name, fn)
            ->Arg(static_cast<std::int64_t>(2 * MiB))
            ->Arg(static_cast<std::int64_t>(GiB));
    for (const auto& entry :
         {std::pair{"BM_KvmGuestTouch/no_prefetch", Touch::no_prefetch},
          std::pair{"BM_KvmGuestTouch/prefetch", Touch::prefetch},
          std::pair{"BM_KvmGuestTouch/va_prefetch", Touch::va_prefetch},
          std::pair{"BM_KvmGuestTouch/host_populated", Touch::host_populated}}) {
        const Touch mode = entry.second; // clang 14 cannot capture a structured binding
        benchmark::RegisterBenchmark(entry.first,
                                     [mode](benchmark::State& s) { guest_touch(s, mode); })
            ->Unit(benchmark::kMillisecond)
            ->Iterations(4);
    }
    return true;
}();

} // namespace

BENCHMARK_MAIN();
