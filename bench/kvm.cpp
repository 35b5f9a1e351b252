// KVM benchmarks, each beside its baseline:
//
//   BM_KvmMapRegion/raw/<size>        KVM_SET_USER_MEMORY_REGION2 create + delete, by hand: the
//                                     floor the policy sits on (an error naming the missing
//                                     KVM_CAP_USER_MEMORY2 on kernels before 6.8)
//   BM_KvmMapRegion/<size>            KvmPartition::map_range + unmap_range of one window
//   BM_KvmMapRegion/manager/<size>    map_region + unmap_region of a region through the whole
//                                     GuestMemoryManager (VA mapper mmap + memslot)
//   BM_KvmGuestTouch/no_prefetch      a guest loop that writes one byte in every page of a fresh
//                                     64 MiB region (16384 pages), timed from KVM_RUN to HLT
//   BM_KvmGuestTouch/prefetch         the same after KVM_PRE_FAULT_MEMORY of the region (skipped,
//                                     with the reason, where the kernel lacks it)
//   BM_KvmGuestTouch/host_populated   the same after MADV_POPULATE_WRITE of the host VA: what is
//                                     left is the second-level (NPT/EPT) faults alone
//   BM_KvmDirtyHarvest/<mode>/<MiB>/<percent>
//                                     a tracked manager's take_dirty_runs over a <MiB> MiB guest
//                                     after a vCPU wrote one byte in <percent> % of its pages
//                                     (every 10th page at 10 %, every page at 100 %), with the
//                                     KVM partition in manual-protect mode
//                                     (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG, then
//                                     KVM_CLEAR_DIRTY_LOG of the pages taken) or clear-on-read
//                                     (KVM_GET_DIRTY_LOG clears; the capability hidden from the
//                                     partition through the test seam, as on an old kernel). Only
//                                     the take is timed; the guest's run is not.
//   BM_KvmDirtyHarvest/<mode>/running/<MiB>
//                                     the same take while the vCPU keeps running: a guest loop
//                                     writes one byte in every page from 2 MiB to the end, pass
//                                     after pass, on its own thread, until told to stop. What
//                                     manual protect is for: KVM_GET_DIRTY_LOG in clear-on-read
//                                     mode write-protects every dirty page of a slot under KVM's
//                                     MMU lock, manual protect re-protects only the taken pages,
//                                     64 at a time (KVM_CLEAR_DIRTY_LOG). Counters: the guest's
//                                     passes per second while takes run (guest_passes_per_s), and
//                                     pages per take. Every page taken must be one the guest
//                                     writes (its pages, or its code page with the pass count),
//                                     or the benchmark reports an error.
//
// Map sizes: 2 MiB and 1 GiB. Every benchmark reports an error instead of a number without
// /dev/kvm.
#include <membacking/membacking.hpp>

#include "../tests/support/injecting_kvm.hpp"
#include "kvm_vcpu.hpp"
#include "x86_asm.hpp"

#include <benchmark/benchmark.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <sys/mman.h>
#include <system_error>
#include <thread>

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
    // The exact message the smoke run (bench/smoke.py) allows as missing hardware: any other
    // failure of the ioctl below is an error.
    if (::ioctl(vm->vm_fd(), KVM_CHECK_EXTENSION, detail::kvm_abi::cap_user_memory2) <= 0) {
        state.SkipWithError(
            "KVM_SET_USER_MEMORY_REGION2 is not supported on this host (no KVM_CAP_USER_MEMORY2)");
        return;
    }
    detail::kvm_abi::UserspaceMemoryRegion2 r{};
    r.slot = 0;
    r.guest_phys_addr = GiB;
    r.userspace_addr = reinterpret_cast<std::uint64_t>(host.base_);
    for (auto _ : state) {
        r.memory_size = size;
        if (::ioctl(vm->vm_fd(), detail::kvm_abi::set_user_memory_region2, &r) != 0) {
            std::string why = "KVM_SET_USER_MEMORY_REGION2 failed: ";
            why += std::error_code(errno, std::generic_category()).message();
            state.SkipWithError(why.c_str());
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

/// One guest per harvest mode, made on first use and kept for the whole run: populating a guest
/// of hundreds of MiB under an emulated CPU takes seconds, and the harvest does not depend on it.
/// clear_on_read: the partition is created through InjectingKvm with the manual-protect
/// capability hidden (a test seam, not an option of the library: KvmPartition always enables
/// manual protect where the kernel has it).
template <class Sys>
struct HarvestGuest {
    using Manager = TrackedGuestMemoryManager<NestedPriority, DefaultVaPolicy, KvmPartition<Sys>>;

    std::string error; ///< why the guest cannot be used (empty: it can)
    std::uint64_t size = 0;
    std::optional<KvmVm> vm;
    std::optional<Manager> manager;
    std::shared_ptr<KvmPartition<Sys>> kvm;

    /// The guest at 0x1000: one byte in every `stride`-th page from dirty_start to the end.
    static constexpr std::uint64_t dirty_start = 2 * MiB;

    HarvestGuest(std::uint64_t bytes, bool clear_on_read) : size(bytes), vm(KvmVm::create(error))
    {
        if (!vm) {
            error = "KVM is not usable here: " + error;
            return;
        }
        auto m = Manager::builder()
                     .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, size)}))
                     .build(Length{size});
        test::InjectingKvm::reset();
        test::InjectingKvm::hide_manual_protect = clear_on_read;
        auto k = KvmPartition<Sys>::create(vm->vm_fd());
        test::InjectingKvm::reset();
        if (!m || !k) {
            error = "setup failed";
            return;
        }
        manager.emplace(std::move(*m));
        kvm = *k;
        if (kvm->capabilities().manual_dirty_log_protect == clear_on_read) {
            error = clear_on_read ? "the partition kept manual protect"
                                  : "this kernel lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2";
            return;
        }
        if (!manager->attach_partition(Vtl::vtl0, kvm) || !manager->start_dirty_tracking())
            error = "attaching the partition or starting dirty tracking failed";
    }

    /// Loads the guest loop; the pages it will dirty.
    std::uint64_t load(std::uint64_t stride)
    {
        const std::uint64_t pages = (size - dirty_start) / page_size / stride;
        X86Asm a;
        a.mov(X86Asm::edi, static_cast<std::uint32_t>(dirty_start))
            .mov(X86Asm::ecx, static_cast<std::uint32_t>(pages))
            .label("loop")
            .store_byte_edi(1)
            .add_edi(static_cast<std::uint32_t>(stride * page_size))
            .dec_ecx()
            .jnz("loop")
            .hlt();
        const auto code = a.code();
        if (!manager->guest_memory().write(Gpa{0x1000}, code))
            error = "loading the guest failed";
        return pages;
    }

    /// Runs the loaded loop until it halts.
    bool run() { return vm->start_at(0x1000) && vm->run(120).kind == KvmVm::Exit::Kind::halt; }
};

/// The guest of a mode, kept for the whole run and shared by its halted and running benchmarks
/// (two modes' guests of 256 MiB fit the emulated VM's 2 GiB; four would not).
template <class Sys>
HarvestGuest<Sys>& harvest_guest(std::uint64_t size, bool clear_on_read)
{
    static std::unique_ptr<HarvestGuest<Sys>> guest;
    if (!guest || guest->size != size)
        guest = std::make_unique<HarvestGuest<Sys>>(size, clear_on_read);
    return *guest;
}

template <class Sys>
void kvm_harvest(benchmark::State& state, bool clear_on_read)
{
    const auto size = static_cast<std::uint64_t>(state.range(0)) * MiB;
    const auto percent = static_cast<std::uint64_t>(state.range(1));
    HarvestGuest<Sys>* const guest = &harvest_guest<Sys>(size, clear_on_read);
    if (!guest->error.empty()) {
        state.SkipWithError(guest->error.c_str());
        return;
    }
    const std::uint64_t pages = guest->load(100 / percent);
    const auto whole = MemoryRange::valid_or_abort(0, size);
    std::vector<DirtyRun> runs;
    // A first run of the loop and a take: what loading the code, the first entry into the guest
    // (its code page is reported dirty once) and any earlier benchmark left are not the
    // pattern's; every timed take below must find exactly the pattern.
    if (!guest->run() || !guest->manager->take_dirty_runs(whole, runs)) {
        state.SkipWithError("the first run and take failed");
        return;
    }
    std::uint64_t taken = 0;
    for (auto _ : state) {
        state.PauseTiming();
        runs.clear();
        if (!guest->run()) {
            state.SkipWithError("the guest did not halt");
            return;
        }
        state.ResumeTiming();
        if (!guest->manager->take_dirty_runs(whole, runs)) {
            state.SkipWithError("take_dirty_runs failed");
            return;
        }
        state.PauseTiming();
        taken = 0;
        for (const DirtyRun& r : runs)
            taken += r.length.value() / page_size;
        // Exactly the guest's pages: a take that missed some, or reported pages twice, has no
        // figure.
        if (taken != pages) {
            std::string odd;
            for (const DirtyRun& r : runs)
                if (r.length.value() != page_size ||
                    (r.gpa.value() - HarvestGuest<Sys>::dirty_start) %
                            (page_size * (100 / percent)) !=
                        0) {
                    odd += ' ';
                    odd += MemoryRange::hex(r.gpa.value());
                    odd += '+';
                    odd += std::to_string(r.length.value());
                }
            std::string why = "took ";
            why += std::to_string(taken);
            why += " pages, the guest wrote ";
            why += std::to_string(pages);
            why += odd;
            state.SkipWithError(why.c_str());
            return;
        }
        state.ResumeTiming();
    }
    state.counters["pages"] = static_cast<double>(taken);
    state.counters["runs"] = static_cast<double>(runs.size());
}

/// Takes while the vCPU runs (see the file comment).
template <class Sys>
void kvm_harvest_running(benchmark::State& state, bool clear_on_read)
{
    const auto size = static_cast<std::uint64_t>(state.range(0)) * MiB;
    HarvestGuest<Sys>& guest = harvest_guest<Sys>(size, clear_on_read);
    if (!guest.error.empty()) {
        state.SkipWithError(guest.error.c_str());
        return;
    }
    // The guest's page 1 holds its code, the pass count and the stop flag.
    constexpr std::uint32_t code = 0x1000;
    constexpr std::uint32_t passes_at = 0x1800;
    constexpr std::uint32_t stop_at = 0x1900;
    const std::uint64_t pages = (size - HarvestGuest<Sys>::dirty_start) / page_size;
    X86Asm a;
    a.label("pass")
        .mov(X86Asm::edi, static_cast<std::uint32_t>(HarvestGuest<Sys>::dirty_start))
        .mov(X86Asm::ecx, static_cast<std::uint32_t>(pages))
        .label("page")
        .store_byte_edi(1)
        .add_edi(static_cast<std::uint32_t>(page_size))
        .dec_ecx()
        .jnz("page")
        .mov(X86Asm::edi, passes_at)
        .inc_dword_edi()
        .load_al(stop_at)
        .test_al()
        .jz("pass")
        .hlt();
    auto memory = guest.manager->guest_memory();
    const auto program = a.code();
    const std::uint32_t zero = 0;
    const std::uint8_t stop = 1;
    if (!memory.write(Gpa{code}, program) || !memory.write_plain(Gpa{passes_at}, zero) ||
        !memory.write_plain(Gpa{stop_at}, std::uint8_t{0}) || !guest.vm->start_at(code)) {
        state.SkipWithError("loading the guest failed");
        return;
    }
    const auto whole = MemoryRange::valid_or_abort(0, size);
    std::vector<DirtyRun> runs;
    (void)guest.manager->take_dirty_runs(whole, runs); // what loading left
    std::optional<KvmVm::Exit> exit;
    std::atomic<bool> returned = false;
    std::thread vcpu([&] {
        exit = guest.vm->run(600);
        returned.store(true);
    });
    const auto passes = [&] {
        return memory.template read_plain<std::uint32_t>(Gpa{passes_at}).value_or(0);
    };
    // Timing starts once the guest is in its loop (one pass done): the first pass faults every
    // page in, which no take after it pays for.
    while (passes() == 0 && !returned.load())
        std::this_thread::yield();
    if (returned.load()) {
        vcpu.join();
        state.SkipWithError("the guest stopped before its first pass");
        return;
    }
    std::string error;
    std::uint64_t taken = 0;
    std::uint64_t takes = 0;
    const std::uint32_t passes_before = passes();
    const auto start = std::chrono::steady_clock::now();
    for (auto _ : state) {
        runs.clear();
        if (!guest.manager->take_dirty_runs(whole, runs)) {
            error = "take_dirty_runs failed";
            break;
        }
        ++takes;
        for (const DirtyRun& r : runs) {
            taken += r.length.value() / page_size;
            const bool guest_page = r.gpa.value() >= HarvestGuest<Sys>::dirty_start ||
                                    (r.gpa.value() == code && r.length.value() == page_size);
            if (!guest_page && error.empty())
                error = "took " + MemoryRange::hex(r.gpa.value()) + "+" +
                        std::to_string(r.length.value()) + ", which the guest does not write";
        }
        if (!error.empty())
            break;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::uint32_t passes_after = passes();
    (void)memory.write_plain(Gpa{stop_at}, stop);
    vcpu.join();
    if (error.empty() && (!exit || exit->kind != KvmVm::Exit::Kind::halt))
        error = "the guest did not halt when told to stop";
    if (!error.empty()) {
        state.SkipWithError(error.c_str());
        return;
    }
    state.counters["guest_passes_per_s"] =
        static_cast<double>(passes_after - passes_before) / seconds;
    state.counters["pages_per_take"] =
        takes == 0 ? 0.0 : static_cast<double>(taken) / static_cast<double>(takes);
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
    // 256 MiB fits the emulated VM's 2 GiB twice over (both modes' guests stay alive).
    for (const auto& [name, fn] :
         {std::pair{"BM_KvmDirtyHarvest/manual_protect",
                    +[](benchmark::State& s) { kvm_harvest<os::LinuxSyscalls>(s, false); }},
          std::pair{"BM_KvmDirtyHarvest/clear_on_read",
                    +[](benchmark::State& s) { kvm_harvest<test::InjectingKvm>(s, true); }}})
        benchmark::RegisterBenchmark(name, fn)
            ->Args({256, 10})
            ->Args({256, 100})
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->Iterations(3);
    for (const auto& [name, fn] :
         {std::pair{"BM_KvmDirtyHarvest/manual_protect/running",
                    +[](benchmark::State& s) { kvm_harvest_running<os::LinuxSyscalls>(s, false); }},
          std::pair{"BM_KvmDirtyHarvest/clear_on_read/running", +[](benchmark::State& s) {
                        kvm_harvest_running<test::InjectingKvm>(s, true);
                    }}})
        benchmark::RegisterBenchmark(name, fn)
            ->Arg(256)
            ->Unit(benchmark::kMillisecond)
            // Whole guest passes: a smoke run's --benchmark_min_time does not cut this one short.
            ->UseRealTime()
            ->MinTime(1.0);
    return true;
}();

} // namespace

BENCHMARK_MAIN();
