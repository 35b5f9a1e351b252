// The access path against its baselines, in one binary.
//
// BM_ReadU64/raw, BM_ReadU64/guest: an 8-byte load at a fixed hot GPA (target: guest <= 1.25x raw).
// BM_WriteU64/raw, BM_WriteU64/guest: an 8-byte store, same target.
// .../guest_handle: the same through the owning GuestMemory handle kept as a local instead of its
//   GuestMemoryView (see guest_memory.hpp).
// BM_Copy/memcpy/<n>: memcpy out of the guest's VA into a host buffer.
// BM_Copy/guest_read/<n>: GuestMemory::read of the same bytes (target: >= 0.95x memcpy).
// BM_Copy/guest_write/<n>: GuestMemory::write of the same size.
// BM_RandomRW/raw: read a u64 and write it back + 1, at pseudo-random offsets of a plain 16 MiB
//   buffer.
// BM_RandomRW/<regions>: the same stream through GuestMemory, over 16 MiB of RAM split into
//   <regions> regions with gaps between them (target: <= 1.3x raw, flat in the region count).
// BM_RandomRW/raw_layout/<regions>: the same GPAs through a plain pointer into the guest's own VA:
//   what that layout costs the memory system (TLB reach) without the library. guest / raw_layout
//   is what the library adds.
// BM_RandomRW/raw_gapped/<regions>: the same GPAs in a plain private buffer (no library, no shared
//   memory): what the gaps alone cost against BM_RandomRW/raw.
// BM_WriteU64/guest_dirty: BM_WriteU64/guest through a dirty-tracked view (DirtyTracking) of the
//   same memory: the store plus the mark of a page already dirty, a load and a test (target:
//   <= 1.3x BM_WriteU64/guest).
// BM_WriteU64/guest_dirty_bytemap: the same through a view with the byte-per-page layout
//   (ByteMapDirtyTracking): the store plus one plain byte store, no load, no test, no branch
//   (same target).
// BM_WriteU64/guest_load_floor: BM_WriteU64/guest plus the least any mark can add: one relaxed
//   load of the page's byte in a plain byte-per-page array and a branch never taken (no store,
//   no address of a window to add). Not a design (a load records nothing): if this floor is
//   above 1.3x BM_WriteU64/guest in the same run, no software mark, which must at least load or
//   store, meets guest_dirty's target on this machine's one-store loop.
// BM_Copy/guest_write_dirty/<n>, BM_Copy/guest_write_dirty_bytemap/<n>: BM_Copy/guest_write
//   through the tracked views (target: >= 0.9x the throughput of BM_Copy/memcpy).
// BM_Lease/<pages>: take and release a read_write lease of <pages> mapped pages (target: no more
//   than BM_Copy/guest_read/4096).
// BM_Lease/disjoint/threads:<n>: the same for one page, each thread at its own GPA, in real
//   time: items_per_second with 2 threads over that with 1 is the scaling (target: >= 1.7x; it
//   needs two idle cores).
//
// Guest memory is real: regions in a RegionManager, mapped by a MappingManager into a Linux VA
// mapper, accessed through GuestMemory. The raw baselines of the hot-GPA, copy and raw_layout
// benchmarks use the guest's own pages through a plain pointer; BM_RandomRW/raw uses a plain
// buffer of its own, as the issue defines it.
#include <membacking/guest_memory.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>
#include <membacking/va/linux_mmap.hpp>

#include "fixed_iterations.hpp"

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

using namespace membacking;
using Va = LinuxMmap<>;
using Memory = GuestMemory<VaMapper<Va>>;
using View = GuestMemoryView<VaMapper<Va>>;
using TrackedView = GuestMemoryView<VaMapper<Va>, Gpa, DirtyTracking>;
using ByteMapView = GuestMemoryView<VaMapper<Va>, Gpa, ByteMapDirtyTracking>;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t ram_bytes = 16 * MiB;

template <class T>
T must(Result<T> r)
{
    if (!r) {
        std::fprintf(stderr, "benchmark setup failed: %s\n", r.error().full_message().c_str());
        std::exit(1);
    }
    return std::move(r).value();
}
void must(Result<void> r)
{
    if (!r) {
        std::fprintf(stderr, "benchmark setup failed: %s\n", r.error().full_message().c_str());
        std::exit(1);
    }
}

/// The GPA of a RAM offset, (offset / size) * 2 * size + offset % size, for a power-of-two
/// region size: with q * size = offset & ~(size - 1), that is offset + q * size. Two instructions,
/// shared by every layout benchmark, so the baselines and the guest pay the same arithmetic.
struct Layout {
    std::uint64_t region_mask; // ~(size - 1)
    [[nodiscard]] std::uint64_t gpa_of(std::uint64_t offset) const
    {
        return offset + (offset & region_mask);
    }
};

/// A guest with `regions` equal RAM regions over 16 MiB, region i at GPA i * 2 * size.
class Guest {
public:
    /// `dirty`: the mappers carry a dirty bitmap, for the tracked handle (tracked()).
    explicit Guest(std::uint64_t regions, std::shared_ptr<detail::DirtyBitmap> dirty = {})
        : size_(ram_bytes / regions),
          va_(must(MappingManager<Va>::create(2 * ram_bytes, page_size, std::move(dirty)))),
          sink_{&va_}, rm_(sink_)
    {
        const Mappable ram = must(Va::create_shared_memory(ram_bytes, "bench-ram"));
        for (std::uint64_t i = 0; i < regions; ++i) {
            const auto gpa = MemoryRange::valid_or_abort(i * 2 * size_, i * 2 * size_ + size_);
            const RegionId id = must(rm_.add_region("ram", gpa, 255, MappingType::Ram));
            must(rm_.add_mapping(id, {MemoryRange::valid_or_abort(0, size_),
                                      MappingBacking::file(ram, Offset{i * size_}),
                                      true,
                                      {}}));
            must(rm_.map_region(id, {true, true, false}));
        }
        memory_ = Memory(must(va_.new_mapper(MapperMode::eager)));
        for (std::uint64_t off = 0; off < ram_bytes; off += page_size) // touch every page
            if (!memory_.write_plain<std::uint64_t>(Gpa{layout().gpa_of(off)}, 0))
                std::abort();
    }

    [[nodiscard]] const Memory& memory() const { return memory_; }
    /// A tracked handle of the same mapper (the guest must have been made with a map of the
    /// policy's layout).
    template <class Tracking>
    [[nodiscard]] GuestMemory<VaMapper<Va>, Gpa, Tracking> tracked() const
    {
        return GuestMemory<VaMapper<Va>, Gpa, Tracking>(memory_.owner());
    }
    [[nodiscard]] Layout layout() const { return Layout{~(size_ - 1)}; }

private:
    struct Sink { // VA side only: partitions are not what this measures
        MappingManager<Va>* va;
        Result<void> add_mapping(const ActiveMapping& m) { return va->add_mapping(m); }
        Result<void> remove_mappings(const MemoryRange& r) { return va->remove_mappings(r); }
        Result<void> map_region(const RegionActivation&) { return {}; }
        Result<void> unmap_region(const RegionActivation&) { return {}; }
    };
    std::uint64_t size_;
    MappingManager<Va> va_;
    Sink sink_;
    RegionManager<NestedPriority, Sink> rm_;
    Memory memory_;
};

Guest& guest(std::uint64_t regions)
{
    static std::map<std::uint64_t, std::unique_ptr<Guest>> guests;
    auto& g = guests[regions];
    if (!g)
        g = std::make_unique<Guest>(regions);
    return *g;
}

/// One region, like guest(1), whose mappers carry a dirty map in the policy's layout.
template <class Tracking>
Guest& tracked_guest()
{
    static Guest g(1, must(detail::DirtyBitmap::create(2 * ram_bytes, Tracking::layout)));
    return g;
}

/// The owning tracked handle behind the tracked views of a policy.
template <class Tracking>
const GuestMemory<VaMapper<Va>, Gpa, Tracking>& tracked_owner()
{
    static const GuestMemory<VaMapper<Va>, Gpa, Tracking> owner =
        tracked_guest<Tracking>().template tracked<Tracking>();
    return owner;
}

/// The handle a benchmark uses: untracked views of guest(1), or tracked ones of tracked_guest().
/// Both branches are an inlinable copy out of a function's static (the tracked owner's static
/// lives in its own function): a handle returned out of line would sit in memory, and the loop
/// would reload its fields around the access's cold calls, which the untracked loop does not.
template <class Handle>
Handle handle()
{
    if constexpr (std::is_same_v<Handle, TrackedView>) {
        return tracked_owner<DirtyTracking>().view();
    } else if constexpr (std::is_same_v<Handle, ByteMapView>) {
        return tracked_owner<ByteMapDirtyTracking>().view();
    } else {
        return guest(1).memory();
    }
}

constexpr std::uint64_t hot_gpa = 0x12340;

/// Makes v opaque to the optimiser (it may have changed) without claiming that memory changed.
/// benchmark::DoNotOptimize also clobbers all memory, which makes GCC reload every field of an
/// object copied into a local (the handle) but not a scalar already in a register (the raw
/// pointer); using this for both loops keeps the comparison about the access, not the barrier.
template <class T>
inline void opaque(T& v)
{
    asm volatile("" : "+r"(v));
}

void read_u64_raw(benchmark::State& state)
{
    std::byte* base = guest(1).memory().mapper()->base();
    std::uint64_t gpa = hot_gpa;
    for (auto _ : state) {
        opaque(gpa);
        std::uint64_t v;
        std::memcpy(&v, base + gpa, sizeof v);
        opaque(v);
    }
}
template <class Handle>
void read_u64_guest(benchmark::State& state)
{
    Handle m = guest(1).memory(); // not const: GCC 12 will not scalarise a const local aggregate
    std::uint64_t gpa = hot_gpa;
    for (auto _ : state) {
        opaque(gpa);
        auto v = m.template read_plain<std::uint64_t>(Gpa{gpa});
        if (!v) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
        std::uint64_t x = v.value();
        opaque(x);
    }
}
void write_u64_raw(benchmark::State& state)
{
    std::byte* base = guest(1).memory().mapper()->base();
    std::uint64_t gpa = hot_gpa;
    std::uint64_t v = 0;
    for (auto _ : state) {
        opaque(gpa);
        opaque(v);
        std::memcpy(base + gpa, &v, sizeof v);
    }
}
template <class Handle>
void write_u64_guest(benchmark::State& state)
{
    Handle m = handle<Handle>(); // not const: GCC 12 will not scalarise a const local aggregate
    std::uint64_t gpa = hot_gpa;
    std::uint64_t v = 0;
    for (auto _ : state) {
        opaque(gpa);
        opaque(v);
        if (!m.template write_plain<std::uint64_t>(Gpa{gpa}, v)) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
    }
}

/// BM_WriteU64/guest's loop plus one load and test of the page's byte (see the file comment).
void write_u64_guest_load_floor(benchmark::State& state)
{
    View m = handle<View>(); // not const: GCC 12 will not scalarise a const local aggregate
    static std::atomic<std::uint8_t> marks[2 * ram_bytes / page_size];
    marks[hot_gpa / page_size].store(1, std::memory_order_relaxed);
    std::uint64_t gpa = hot_gpa;
    std::uint64_t v = 0;
    for (auto _ : state) {
        opaque(gpa);
        opaque(v);
        if (!m.write_plain<std::uint64_t>(Gpa{gpa}, v)) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
        if (marks[gpa / page_size].load(std::memory_order_relaxed) == 0) [[unlikely]] {
            state.SkipWithError("the floor's byte was cleared");
            return;
        }
    }
}

void copy_memcpy(benchmark::State& state)
{
    const auto n = static_cast<std::size_t>(state.range(0));
    std::byte* src = guest(1).memory().mapper()->base() + MiB;
    std::vector<std::byte> buf(n);
    for (auto _ : state) {
        std::memcpy(buf.data(), src, n);
        benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * state.range(0));
}
void copy_guest_read(benchmark::State& state)
{
    const auto n = static_cast<std::size_t>(state.range(0));
    View m = guest(1).memory().view();
    std::vector<std::byte> buf(n);
    for (auto _ : state) {
        if (!m.read(Gpa{MiB}, buf)) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
        benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * state.range(0));
}
template <class Handle>
void copy_guest_write(benchmark::State& state)
{
    const auto n = static_cast<std::size_t>(state.range(0));
    Handle m = handle<Handle>();
    std::vector<std::byte> buf(n, std::byte{1});
    for (auto _ : state) {
        if (!m.write(Gpa{MiB}, buf)) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
        benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * state.range(0));
}

/// The stream of the issue: xorshift64 from 0x9E3779B97F4A7C15, offset = x mod 16 MiB, 8-aligned.
struct Stream {
    std::uint64_t x = 0x9E3779B97F4A7C15;
    std::uint64_t next()
    {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return (x % ram_bytes) & ~std::uint64_t{7};
    }
};

/// The read-modify-write stream through a plain pointer: base + place(offset).
template <class Place>
void raw_rw(benchmark::State& state, std::byte* base, Place place)
{
    Stream s;
    for (auto _ : state) {
        const std::uint64_t at = place(s.next());
        std::uint64_t v;
        std::memcpy(&v, base + at, sizeof v);
        ++v;
        opaque(v);
        std::memcpy(base + at, &v, sizeof v);
    }
}

void random_rw_raw(benchmark::State& state)
{
    void* p = std::aligned_alloc(page_size, ram_bytes);
    auto* buf = static_cast<std::byte*>(p);
    std::memset(buf, 0, ram_bytes);
    raw_rw(state, buf, [](std::uint64_t offset) { return offset; });
    std::free(p);
}

void random_rw_guest(benchmark::State& state)
{
    const Guest& g = guest(static_cast<std::uint64_t>(state.range(0)));
    View m = g.memory().view();
    const Layout layout = g.layout();
    Stream s;
    for (auto _ : state) {
        const std::uint64_t off = s.next();
        const Gpa gpa{layout.gpa_of(off)};
        auto v = m.read_plain<std::uint64_t>(gpa);
        if (!v) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
        std::uint64_t next = v.value() + 1;
        opaque(next);
        if (!m.write_plain<std::uint64_t>(gpa, next)) [[unlikely]] {
            state.SkipWithError("unexpected guest memory error");
            return;
        }
    }
}

void random_rw_raw_layout(benchmark::State& state)
{
    const Guest& g = guest(static_cast<std::uint64_t>(state.range(0)));
    const Layout layout = g.layout();
    raw_rw(state, g.memory().mapper()->base(),
           [layout](std::uint64_t offset) { return layout.gpa_of(offset); });
}

/// Take and release a lease of state.range(0) pages.
void lease_pages(benchmark::State& state)
{
    Memory m = guest(1).memory(); // not const: see read_u64_guest
    const Length len{static_cast<std::uint64_t>(state.range(0)) * page_size};
    std::uint64_t gpa = 0x10000;
    for (auto _ : state) {
        opaque(gpa);
        auto lease = m.lease(Gpa{gpa}, len, LeaseAccess::read_write);
        if (!lease) [[unlikely]] {
            state.SkipWithError("unexpected lease error");
            return;
        }
        benchmark::DoNotOptimize(lease->iovecs().data());
    }
}

/// One page per iteration, each thread at its own GPA (1 MiB apart).
void lease_disjoint(benchmark::State& state)
{
    static Guest& shared = guest(1); // magic static: thread-safe first use
    Memory m = shared.memory();
    std::uint64_t gpa = static_cast<std::uint64_t>(state.thread_index()) * MiB;
    const Length len{page_size};
    for (auto _ : state) {
        opaque(gpa);
        auto lease = m.lease(Gpa{gpa}, len, LeaseAccess::read_write);
        if (!lease) [[unlikely]] {
            state.SkipWithError("unexpected lease error");
            return;
        }
        benchmark::DoNotOptimize(lease->iovecs().data());
    }
    state.SetItemsProcessed(state.iterations());
}

/// The guest's GPA layout (regions with gaps) in a plain private buffer: no library, no shared
/// memory. Against BM_RandomRW/raw it shows what the gaps alone cost the TLB and page walks.
void random_rw_raw_gapped(benchmark::State& state)
{
    const auto regions = static_cast<std::uint64_t>(state.range(0));
    const std::uint64_t size = ram_bytes / regions;
    void* p = std::aligned_alloc(page_size, 2 * ram_bytes);
    auto* base = static_cast<std::byte*>(p);
    const Layout layout{~(size - 1)};
    for (std::uint64_t off = 0; off < ram_bytes; off += page_size) // touch the same pages only
        std::memset(base + layout.gpa_of(off), 0, page_size);
    raw_rw(state, base, [layout](std::uint64_t offset) { return layout.gpa_of(offset); });
    std::free(p);
}

const bool registered = [] {
    const std::initializer_list<benchmark::internal::Benchmark*> all{
        benchmark::RegisterBenchmark("BM_ReadU64/raw", read_u64_raw),
        benchmark::RegisterBenchmark("BM_ReadU64/guest", read_u64_guest<View>),
        benchmark::RegisterBenchmark("BM_ReadU64/guest_handle", read_u64_guest<Memory>),
        benchmark::RegisterBenchmark("BM_WriteU64/raw", write_u64_raw),
        benchmark::RegisterBenchmark("BM_WriteU64/guest", write_u64_guest<View>),
        benchmark::RegisterBenchmark("BM_WriteU64/guest_handle", write_u64_guest<Memory>),
        benchmark::RegisterBenchmark("BM_Copy/memcpy", copy_memcpy),
        benchmark::RegisterBenchmark("BM_Copy/guest_read", copy_guest_read),
        benchmark::RegisterBenchmark("BM_Copy/guest_write", copy_guest_write<View>),
        benchmark::RegisterBenchmark("BM_RandomRW/raw", random_rw_raw),
        benchmark::RegisterBenchmark("BM_RandomRW", random_rw_guest),
        benchmark::RegisterBenchmark("BM_RandomRW/raw_layout", random_rw_raw_layout),
        benchmark::RegisterBenchmark("BM_RandomRW/raw_gapped", random_rw_raw_gapped),
        benchmark::RegisterBenchmark("BM_Lease", lease_pages),
        benchmark::RegisterBenchmark("BM_Lease/disjoint", lease_disjoint),
        benchmark::RegisterBenchmark("BM_WriteU64/guest_dirty", write_u64_guest<TrackedView>),
        benchmark::RegisterBenchmark("BM_Copy/guest_write_dirty", copy_guest_write<TrackedView>),
        benchmark::RegisterBenchmark("BM_WriteU64/guest_dirty_bytemap",
                                     write_u64_guest<ByteMapView>),
        benchmark::RegisterBenchmark("BM_Copy/guest_write_dirty_bytemap",
                                     copy_guest_write<ByteMapView>),
        benchmark::RegisterBenchmark("BM_WriteU64/guest_load_floor", write_u64_guest_load_floor),
    };
    for (std::size_t i = 6; i < 9; ++i) // the copies
        all.begin()[i]->Arg(4096)->Arg(65536)->Arg(1048576);
    for (std::size_t i = 10; i < 13; ++i) // the region counts
        all.begin()[i]->Arg(1)->Arg(64)->Arg(1024);
    all.begin()[13]->Arg(1)->Arg(16);
    all.begin()[14]->Threads(1)->Threads(2)->UseRealTime();
    all.begin()[16]->Arg(4096)->Arg(65536)->Arg(1048576);
    all.begin()[18]->Arg(4096)->Arg(65536)->Arg(1048576);
    bench::fix_iterations(all);
    return true;
}();

} // namespace

BENCHMARK_MAIN();
