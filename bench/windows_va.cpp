// Windows only (built by tests/windows/run.sh with MinGW, run under Wine): what a map and an unmap
// of a section cost through the placeholder VA policy, beside the raw Win32 pair in the same run.
// Under Wine only the ratios mean anything.
//
// BM_RawMapUnmap/<MiB>: MapViewOfFile3(MEM_REPLACE_PLACEHOLDER) + UnmapViewOfFile2(
//   MEM_PRESERVE_PLACEHOLDER) into a placeholder of exactly the view's size: the floor.
// BM_PlaceholderMapUnmap/<MiB>: WindowsPlaceholder::map_file + unmap of the whole reservation:
//   the same two calls, plus the policy's books and undo log.
// BM_PlaceholderMapUnmapInGap/<MiB>: the same mapping at the start of a reservation twice its
//   size, so the gap is split before the map and coalesced after the unmap (four calls): what a
//   guest's region costs in a real address space.
#include <membacking/va/windows_placeholder.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

using namespace membacking;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;

Mappable section(std::uint64_t size)
{
    auto s = WindowsPlaceholder<>::create_shared_memory(size, "bench");
    if (!s) {
        std::fprintf(stderr, "%s\n", s.error().full_message().c_str());
        std::exit(1);
    }
    return std::move(s).value();
}

WindowsPlaceholder<> reservation(std::uint64_t size)
{
    auto va = WindowsPlaceholder<>::reserve(size, 1);
    if (!va) {
        std::fprintf(stderr, "%s\n", va.error().full_message().c_str());
        std::exit(1);
    }
    return std::move(va).value();
}

void check(const Result<void>& r, benchmark::State& state)
{
    if (!r)
        state.SkipWithError(r.error().full_message().c_str());
}

void BM_RawMapUnmap(benchmark::State& state)
{
    const std::uint64_t size = static_cast<std::uint64_t>(state.range(0)) * MiB;
    const Mappable s = section(size);
    void* base = os::WindowsSyscalls::virtual_alloc2(
        nullptr, size, MEM_RESERVE | os::windows_abi::mem_reserve_placeholder, PAGE_NOACCESS);
    if (base == nullptr) {
        state.SkipWithError("VirtualAlloc2 failed");
        return;
    }
    for (auto _ : state) {
        void* v = os::WindowsSyscalls::map_view_of_file3(s.native_handle(), base, 0, size,
                                                         os::windows_abi::mem_replace_placeholder,
                                                         PAGE_READWRITE);
        benchmark::DoNotOptimize(v);
        if (v != base || !os::WindowsSyscalls::unmap_view_of_file2(
                             base, os::windows_abi::mem_preserve_placeholder)) {
            state.SkipWithError("MapViewOfFile3/UnmapViewOfFile2 failed");
            break;
        }
    }
    ::VirtualFree(base, 0, MEM_RELEASE);
}

void BM_PlaceholderMapUnmap(benchmark::State& state)
{
    const std::uint64_t size = static_cast<std::uint64_t>(state.range(0)) * MiB;
    const Mappable s = section(size);
    WindowsPlaceholder<> va = reservation(size);
    for (auto _ : state) {
        check(va.map_file(0, size, s, 0, true), state);
        check(va.unmap(0, size), state);
    }
}

void BM_PlaceholderMapUnmapInGap(benchmark::State& state)
{
    const std::uint64_t size = static_cast<std::uint64_t>(state.range(0)) * MiB;
    const Mappable s = section(size);
    WindowsPlaceholder<> va = reservation(2 * size);
    for (auto _ : state) {
        check(va.map_file(0, size, s, 0, true), state);
        check(va.unmap(0, size), state);
    }
}

// 2 MiB and 1 GiB. Real time: the work is in system calls (under Wine, in the wineserver), which
// the process's CPU time does not see; it also keeps the run short.
BENCHMARK(BM_RawMapUnmap)->Arg(2)->Arg(1024)->UseRealTime()->MinTime(0.2);
BENCHMARK(BM_PlaceholderMapUnmap)->Arg(2)->Arg(1024)->UseRealTime()->MinTime(0.2);
BENCHMARK(BM_PlaceholderMapUnmapInGap)->Arg(2)->Arg(1024)->UseRealTime()->MinTime(0.2);

} // namespace

BENCHMARK_MAIN();
