// BM_RegionRemap/<n>: with n regions registered and mapped (mock partition), the time to unmap
// one region and map it again. The target is that n = 10000 costs within 3x of n = 100, i.e. no
// step scans all regions. BM_RegionRemapBaseline/<n> is the same pair of partition calls made
// directly, with no region manager: the floor the manager's own work sits on.
#include <membacking/partition/mock.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>

#include "fixed_iterations.hpp"

#include <benchmark/benchmark.h>

#include <cstdint>
#include <sys/mman.h>
#include <unistd.h>

using namespace membacking;

namespace {

/// VA side that accepts everything (the VA mappers are not what this measures); the partition
/// side is a real MockPartition with its call log off.
struct BenchSink {
    MockPartition partition;
    Result<void> add_mapping(const ActiveMapping&) { return {}; }
    Result<void> remove_mappings(const MemoryRange&) { return {}; }
    Result<void> map_region(const RegionActivation& a)
    {
        return partition.map_range(nullptr, a.gpa.start(), a.gpa.size(), a.params.writable,
                                   a.params.executable);
    }
    Result<void> unmap_region(const RegionActivation& a)
    {
        return partition.unmap_range(a.gpa.start(), a.gpa.size());
    }
};

constexpr std::uint64_t stride = 0x2000;

void BM_RegionRemap(benchmark::State& state)
{
    const auto n = static_cast<std::uint64_t>(state.range(0));
    BenchSink sink;
    sink.partition.set_recording(false);
    RegionManager<NestedPriority, BenchSink> rm(sink);
    const int fd = ::memfd_create("bench", MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, 0x1000) != 0) {
        state.SkipWithError("memfd_create failed");
        return;
    }
    const Mappable object = Mappable::adopt(fd);
    const MapParams rw{true, true, false};
    RegionId target;
    for (std::uint64_t i = 0; i < n; ++i) {
        const auto r = MemoryRange::valid_or_abort(i * stride, i * stride + 0x1000);
        auto id = rm.add_region("dev", r, 0, MappingType::Device);
        if (!id ||
            !rm.add_mapping(*id, {MemoryRange::valid_or_abort(0, 0x1000),
                                  MappingBacking::file(object, Offset{0}),
                                  true,
                                  {}}) ||
            !rm.map_region(*id, rw)) {
            state.SkipWithError("setup failed");
            return;
        }
        if (i == n / 2)
            target = *id;
    }
    for (auto _ : state) {
        if (!rm.unmap_region(target) || !rm.map_region(target, rw)) {
            state.SkipWithError("remap failed");
            return;
        }
    }
    state.SetItemsProcessed(state.iterations());
}

void BM_RegionRemapBaseline(benchmark::State& state)
{
    const auto n = static_cast<std::uint64_t>(state.range(0));
    MockPartition partition;
    partition.set_recording(false);
    for (std::uint64_t i = 0; i < n; ++i)
        (void)partition.map_range(nullptr, i * stride, 0x1000, true, true);
    const std::uint64_t gpa = (n / 2) * stride;
    for (auto _ : state) {
        (void)partition.unmap_range(gpa, 0x1000);
        (void)partition.map_range(nullptr, gpa, 0x1000, true, true);
    }
    state.SetItemsProcessed(state.iterations());
}

} // namespace

namespace {
const bool registered = [] {
    auto* remap = benchmark::RegisterBenchmark("BM_RegionRemap", BM_RegionRemap);
    auto* baseline = benchmark::RegisterBenchmark("BM_RegionRemapBaseline", BM_RegionRemapBaseline);
    for (auto* b : {remap, baseline})
        b->Arg(100)->Arg(1000)->Arg(10000);
    bench::fix_iterations({remap, baseline});
    return true;
}();
} // namespace

BENCHMARK_MAIN();
