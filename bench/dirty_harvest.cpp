// Harvesting the dirty pages of a tracked guest, against reading its bitmap once, in one binary.
//
// BM_DirtyHarvest/<GiB>/<percent>: TrackedMockGuestMemoryManager::take_dirty_runs over the whole
//   address space of a <GiB> GiB guest (reserved, not backed: 2 MiB of RAM) whose bitmap holds
//   <percent> % dirty pages, into a vector that keeps its capacity: the bitmap turned into runs
//   and reset. The pages are scattered, each dirty with probability <percent> / 100 on its own
//   (a fixed pseudo-random pattern), so at 10 % nearly every dirty page is a run of its own: the
//   worst case for runs. At 100 % the whole space is one run.
// BM_DirtyHarvest/clustered64/<GiB>/<percent>: the same with the dirty pages in runs of 64
//   pages (blocks of 64 pages, starting 17 pages off a word boundary so that every run straddles
//   two words, each block dirty with probability <percent> / 100): how a guest's writes usually
//   cluster, and the case where the 2x bound below is meaningful.
// BM_DirtyHarvest/memcpy/<GiB>: a memcpy of the same bitmap's bytes (64 GiB: 2 MiB; 512 GiB:
//   16 MiB) into a buffer, from the same freshly written bitmap: reading the bitmap once.
// BM_DirtyHarvest/clustered64_locked_floor/64/10: only the locked exchanges that a harvest of the
//   clustered pattern cannot avoid (one per word that has some bits set and some clear: under
//   concurrent test-then-set marks such a word can only be cleared by an atomic read-modify-write,
//   see access/dirty_bitmap.hpp), nothing else: the floor of any harvest of this bitmap, against
//   the same run's memcpy/64.
// BM_DirtyHarvest/bytemap/<GiB>/<percent>, BM_DirtyHarvest/bytemap_clustered64/64/10: the same
//   harvests of ByteMapTrackedMockGuestMemoryManager (a byte per page, whose mark is one plain
//   store: BM_WriteU64/guest_dirty_bytemap in bench_guest_access), with the same patterns;
//   BM_DirtyHarvest/memcpy_bytemap/<GiB>: a memcpy of its map (64 GiB: 16 MiB; 512 GiB:
//   128 MiB), reading the byte map once. The byte map's harvest needs no locked instruction.
// BM_HarvestBarrier/shared:<0|1>: take_dirty_runs of a clean 2 MiB guest (a 64-byte scan), so
//   the figure is the barriers that end a take: 0, the bitmap only this process marks (the private
//   expedited membarrier); 1, the bitmap handed to worker processes (share_fd), so every take
//   also runs MEMBARRIER_CMD_GLOBAL_EXPEDITED (access/dirty_bitmap.hpp). No worker runs here: a
//   running registered worker adds an IPI to each CPU it runs on.
// Target: harvest <= 2x memcpy, and below cloud-hypervisor's published 12 ms (64 GiB, 10 %) and
// 4.6 ms (512 GiB, 100 %).
// Why 2x memcpy cannot hold for 64 GiB at 10 % scattered: 16.8 M pages, 1.68 M dirty, in 1.51 M
// separate runs; at 16 bytes a run the result alone is 24 MB written, 11.5x the 2 MiB that the
// memcpy reads and writes. There the goal is the absolute one (12 ms); the 2x bound is checked on
// the clustered distribution (26 K runs, 0.4 MB of result) and at 100 % (one run).
//
// Each iteration first writes the pattern into the bitmap (not timed: manual time), so both
// benchmarks start from the same cache state. The runs vector keeps its capacity from an untimed
// first harvest, as a migration loop's does from pass to pass.
#include <membacking/membacking.hpp>

#include "fixed_iterations.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

using namespace membacking;

namespace {

using Manager = TrackedMockGuestMemoryManager;
using ByteMapManager = ByteMapTrackedMockGuestMemoryManager;
constexpr std::uint64_t GiB = std::uint64_t{1} << 30;

template <class T>
T must(Result<T> r)
{
    if (!r) {
        std::fprintf(stderr, "benchmark setup failed: %s\n", r.error().full_message().c_str());
        std::exit(1);
    }
    return std::move(r).value();
}

/// A tracked guest of `gib` GiB with tracking on, and its map's storage.
template <class M = Manager>
struct Guest {
    explicit Guest(std::uint64_t gib)
        : m(must(M::builder()
                     .add_backing(RamBackingRequest({MemoryRange::constant(0, 2 << 20)}))
                     .build(Length{gib * GiB}))),
          map(storage(*m.core().primary()->dirty_bitmap())), count(gib * GiB / page_size / 64)
    {
        if (auto r = m.start_dirty_tracking(); !r)
            std::exit(1);
    }
    static constexpr bool bytes = M::TrackingPolicy::layout == DirtyMapLayout::bytes;
    /// The bytes of the map: a bit or a byte per page.
    [[nodiscard]] std::uint64_t map_bytes() const
    {
        return count * (bytes ? 64 : sizeof(std::uint64_t));
    }
    /// The bit layout's words (harvest_locked_floor exchanges them).
    [[nodiscard]] std::atomic<std::uint64_t>* words() const requires(!bytes)
    {
        return static_cast<std::atomic<std::uint64_t>*>(map);
    }
    M m;
    void* map;           ///< the map's storage: the bit layout's words or the byte layout's bytes
    std::uint64_t count; ///< 64-page words of the address space

private:
    [[nodiscard]] static void* storage(const detail::DirtyBitmap& b)
    {
        if constexpr (bytes)
            return b.marks();
        else
            return b.words();
    }
};

template <class M = Manager>
Guest<M>& guest(std::uint64_t gib)
{
    static std::map<std::uint64_t, std::unique_ptr<Guest<M>>> guests;
    auto& g = guests[gib];
    if (!g)
        g = std::make_unique<Guest<M>>(gib);
    return *g;
}

/// The bitmap pattern: blocks of `run` pages (the first starting at page 17 when run > 1, so
/// that blocks straddle words), each dirty with probability percent / 100, independently.
const std::vector<std::uint64_t>& pattern(std::uint64_t words, std::uint64_t percent,
                                          std::uint64_t run = 1)
{
    static std::map<std::tuple<std::uint64_t, std::uint64_t, std::uint64_t>,
                    std::vector<std::uint64_t>>
        cache;
    auto& p = cache[{words, percent, run}];
    if (p.empty()) {
        p.resize(words);
        if (percent >= 100) {
            std::fill(p.begin(), p.end(), ~std::uint64_t{0});
            return p;
        }
        std::mt19937_64 rng(42);
        const std::uint64_t pages = words * 64;
        for (std::uint64_t block = run > 1 ? 17 : 0; block < pages; block += run) {
            if (rng() % 100 >= percent)
                continue;
            for (std::uint64_t page = block; page < std::min(block + run, pages); ++page)
                p[page / 64] |= std::uint64_t{1} << (page % 64);
        }
    }
    return p;
}

/// The same pattern as a byte per page (1 = dirty), for the byte map.
const std::vector<std::uint8_t>& byte_pattern(const std::vector<std::uint64_t>& bits)
{
    static std::map<const std::vector<std::uint64_t>*, std::vector<std::uint8_t>> cache;
    auto& b = cache[&bits];
    if (b.empty()) {
        b.resize(bits.size() * 64);
        for (std::uint64_t page = 0; page < b.size(); ++page)
            b[page] = static_cast<std::uint8_t>((bits[page / 64] >> (page % 64)) & 1);
    }
    return b;
}

template <class M>
void write_pattern(Guest<M>& g, const std::vector<std::uint64_t>& p)
{
    if constexpr (Guest<M>::bytes)
        std::memcpy(g.map, byte_pattern(p).data(), g.map_bytes());
    else
        std::memcpy(g.map, p.data(), p.size() * sizeof(std::uint64_t));
}

template <class M, std::uint64_t Run>
void harvest(benchmark::State& state)
{
    const auto gib = static_cast<std::uint64_t>(state.range(0));
    const auto percent = static_cast<std::uint64_t>(state.range(1));
    Guest<M>& g = guest<M>(gib);
    const auto& p = pattern(g.count, percent, Run);
    const MemoryRange all = must(MemoryRange::create(0, gib * GiB));
    std::vector<DirtyRun> runs;
    // One untimed harvest first: a migration loop's vector has its capacity from earlier passes.
    write_pattern(g, p);
    if (!g.m.take_dirty_runs(all, runs)) {
        state.SkipWithError("take_dirty_runs failed");
        return;
    }
    std::uint64_t pages = 0;
    for (auto _ : state) {
        write_pattern(g, p);
        runs.clear();
        const auto start = std::chrono::steady_clock::now();
        if (!g.m.take_dirty_runs(all, runs)) {
            state.SkipWithError("take_dirty_runs failed");
            return;
        }
        const auto end = std::chrono::steady_clock::now();
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
        benchmark::DoNotOptimize(runs.data());
    }
    for (const DirtyRun& r : runs)
        pages += r.length.value() / page_size;
    state.counters["runs"] = static_cast<double>(runs.size());
    state.counters["dirty_pages"] = static_cast<double>(pages);
}

template <class M>
void harvest_memcpy(benchmark::State& state)
{
    const auto gib = static_cast<std::uint64_t>(state.range(0));
    Guest<M>& g = guest<M>(gib);
    const auto& p = pattern(g.count, gib >= 512 ? 100 : 10); // the bytes do not matter to memcpy
    std::vector<std::uint8_t> out(g.map_bytes());
    for (auto _ : state) {
        write_pattern(g, p);
        const auto start = std::chrono::steady_clock::now();
        std::memcpy(out.data(), g.map, g.map_bytes());
        benchmark::ClobberMemory();
        const auto end = std::chrono::steady_clock::now();
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
    }
    // Leave the map clean for the harvests that follow in this run.
    std::memset(g.map, 0, g.map_bytes());
}

/// The locked exchanges alone: one per word of the pattern that is neither clean nor all ones.
void harvest_locked_floor(benchmark::State& state)
{
    const auto gib = static_cast<std::uint64_t>(state.range(0));
    const auto percent = static_cast<std::uint64_t>(state.range(1));
    Guest<>& g = guest(gib);
    const auto& p = pattern(g.count, percent, 64);
    std::vector<std::uint64_t> partial;
    for (std::uint64_t i = 0; i < p.size(); ++i)
        if (p[i] != 0 && p[i] != ~std::uint64_t{0})
            partial.push_back(i);
    std::uint64_t taken = 0;
    for (auto _ : state) {
        write_pattern(g, p);
        const auto start = std::chrono::steady_clock::now();
        for (const std::uint64_t i : partial)
            taken |= g.words()[i].exchange(0, std::memory_order_acquire);
        const auto end = std::chrono::steady_clock::now();
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
    }
    benchmark::DoNotOptimize(taken);
    state.counters["locked"] = static_cast<double>(partial.size());
    std::memset(g.map, 0, g.count * sizeof(std::uint64_t));
}

void harvest_barrier(benchmark::State& state)
{
    constexpr std::uint64_t size = std::uint64_t{2} << 20;
    auto m = must(Manager::builder()
                      .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, size)}))
                      .build(Length{size}));
    if (state.range(0) != 0)
        (void)m.core().primary()->dirty_bitmap()->share_fd();
    if (!m.start_dirty_tracking())
        state.SkipWithError("start_dirty_tracking failed");
    std::vector<DirtyRun> runs;
    for (auto _ : state) {
        runs.clear();
        if (!m.take_dirty_runs(MemoryRange::valid_or_abort(0, size), runs))
            state.SkipWithError("take_dirty_runs failed");
    }
}

const bool registered = [] {
    const std::initializer_list<benchmark::internal::Benchmark*> all{
        benchmark::RegisterBenchmark("BM_DirtyHarvest/memcpy", harvest_memcpy<Manager>),
        benchmark::RegisterBenchmark("BM_DirtyHarvest", harvest<Manager, 1>),
        benchmark::RegisterBenchmark("BM_DirtyHarvest/clustered64", harvest<Manager, 64>),
        benchmark::RegisterBenchmark("BM_DirtyHarvest/clustered64_locked_floor",
                                     harvest_locked_floor),
        benchmark::RegisterBenchmark("BM_DirtyHarvest/memcpy_bytemap",
                                     harvest_memcpy<ByteMapManager>),
        benchmark::RegisterBenchmark("BM_DirtyHarvest/bytemap", harvest<ByteMapManager, 1>),
        benchmark::RegisterBenchmark("BM_DirtyHarvest/bytemap_clustered64",
                                     harvest<ByteMapManager, 64>),
    };
    all.begin()[0]->Arg(64)->Arg(512)->UseManualTime()->Unit(benchmark::kMicrosecond);
    all.begin()[1]
        ->Args({64, 10})
        ->Args({512, 100})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    all.begin()[2]->Args({64, 10})->UseManualTime()->Unit(benchmark::kMicrosecond);
    all.begin()[3]->Args({64, 10})->UseManualTime()->Unit(benchmark::kMicrosecond);
    all.begin()[4]->Arg(64)->Arg(512)->UseManualTime()->Unit(benchmark::kMicrosecond);
    all.begin()[5]
        ->Args({64, 10})
        ->Args({512, 100})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    all.begin()[6]->Args({64, 10})->UseManualTime()->Unit(benchmark::kMicrosecond);
    bench::fix_iterations(all);
    auto* barrier = benchmark::RegisterBenchmark("BM_HarvestBarrier", harvest_barrier);
    barrier->ArgName("shared")->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
    bench::fix_iterations({barrier});
    return true;
}();

} // namespace

BENCHMARK_MAIN();
