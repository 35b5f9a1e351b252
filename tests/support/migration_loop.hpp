/**
 * The migration loop of tests/dirty/migration.cpp (no hypervisor) and of the KVM migration test
 * (tests/kvm/kvm.cpp, a real guest): two sides over the same layout, VMM writers through
 * GuestMemory, the copy passes (a PAM segment toggling and a device BAR moving meanwhile), the
 * last pass and the byte-for-byte comparison. What writes behind the library's back (the mock's
 * simulated vCPU, a KVM guest) is the caller's.
 */
#pragma once

#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "random_writes.hpp"
#include "test_support.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <thread>
#include <vector>

namespace membacking::test::migration {

inline constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
inline constexpr std::uint64_t page = page_size;
inline constexpr std::uint64_t space = 32 * MiB;
inline constexpr std::uint64_t ram_end = 8 * MiB;
inline constexpr std::uint64_t bar_size = 64 * 1024;
/// The BAR's two places, in the MMIO space above RAM.
inline constexpr std::array<std::uint64_t, 2> bar_places{16 * MiB, 24 * MiB};

/// One side of the migration: RAM with the PC's legacy ranges, and a placed BAR.
template <class Manager>
struct Side {
    Manager m;
    typename Manager::Memory mem;
    typename Manager::Device bar;

    static Side make()
    {
        auto m = must(Manager::builder()
                          .x86_legacy_support(true)
                          .add_backing(RamBackingRequest({range(0, ram_end)}))
                          .build(Length{space}));
        auto bar = must(m.device_memory_mapper().new_region("bar", Length{bar_size}));
        auto object = make_object(bar_size);
        must(bar.map({.offset = Offset{0},
                      .length = Length{bar_size},
                      .object = object,
                      .object_offset = Offset{0},
                      .protection = Protection::read_write}));
        must(bar.map_to_guest(Gpa{bar_places[0]}, Protection::read_write));
        auto mem = m.guest_memory();
        return Side{std::move(m), std::move(mem), std::move(bar)};
    }
};

/// Copies every page of the runs from src to dst through GuestMemory. A page that is not
/// readable on the source (nothing mapped there now) is skipped: nothing is there on either side.
template <class Src, class Dst>
void copy_runs(const std::vector<DirtyRun>& runs, Src& src, Dst& dst)
{
    std::array<std::byte, page> buf{};
    for (const DirtyRun& run : runs)
        for (std::uint64_t off = 0; off < run.length.value(); off += page) {
            const Gpa at = run.gpa + Length{off};
            if (!src.mem.read(at, buf))
                continue;
            REQUIRE(dst.mem.write(at, buf));
        }
}

/// Three VMM threads writing through their own GuestMemory handles until `stop`: copies,
/// fills, plain stores, atomics and write leases, anywhere in the address space (RAM, the PAM
/// segment, read-only at times, the BAR wherever it is, or nothing: an error, ignored), except
/// in `keep_out` (a guest's code).
template <class Memory>
std::vector<std::thread> start_vmm_writers(const Memory& memory, const std::atomic<bool>& stop,
                                           MemoryRange keep_out = {})
{
    std::vector<std::thread> writers;
    for (unsigned t = 0; t < 3; ++t)
        writers.emplace_back([&stop, keep_out, t, mem = memory] {
            std::mt19937_64 rng(t + 1);
            std::vector<std::uint8_t> chunk(3 * page);
            while (!stop.load(std::memory_order_relaxed)) {
                const RandomWrite w = draw_random_write(rng, space, chunk.size());
                if (w.touches(keep_out))
                    continue;
                const auto path = static_cast<unsigned>(rng() % (random_write_paths + 1));
                if (path < random_write_paths) {
                    write_randomly(mem, rng, std::span(chunk), w, path);
                    continue;
                }
#if MEMBACKING_OS_LINUX
                // The fifth path, a write lease. Each thread leases its own megabyte of RAM: two
                // plain memsets of the same bytes from two threads would be a data race of the
                // test's own.
                if (auto lease = mem.lease(Gpa{MiB + t * MiB + w.gpa % (MiB - page)}, Length{page},
                                           LeaseAccess::write))
                    for (const auto& span : lease->spans())
                        std::memset(span.data(), w.value, span.size());
#endif
            }
        });
    return writers;
}

/// What the passes left: the PAM segment's state and the BAR's place (to be migrated with the
/// last pass), and the bytes copied.
struct PassesDone {
    RamVisibility pam_state = RamVisibility::read_write;
    std::size_t bar_place = 0;
    std::uint64_t copied = 0;
};

/// `passes` copy passes from src to dst while the writers run; every third pass toggles the PAM
/// segment (read-write, read-only, hidden, ...) on the source, every fourth moves the BAR on
/// both sides.
template <class Src, class Dst>
PassesDone run_passes(Src& src, Dst& dst, int passes)
{
    const MemoryRange pam = *x86_legacy::pam_range(1, 0);
    std::vector<DirtyRun> runs;
    PassesDone done;
    for (int pass = 1; pass <= passes; ++pass) {
        runs.clear();
        must(src.m.take_dirty_runs(range(0, space), runs));
        for (const DirtyRun& r : runs)
            done.copied += r.length.value();
        copy_runs(runs, src, dst);
        if (pass % 3 == 0) {
            done.pam_state = done.pam_state == RamVisibility::read_write ? RamVisibility::read_only
                             : done.pam_state == RamVisibility::read_only
                                 ? RamVisibility::unmapped
                                 : RamVisibility::read_write;
            must(src.m.ram_visibility_control().set_ram_visibility(pam, done.pam_state));
        }
        if (pass % 4 == 0) {
            done.bar_place = 1 - done.bar_place;
            must(src.bar.map_to_guest(Gpa{bar_places[done.bar_place]}, Protection::read_write));
            must(dst.bar.map_to_guest(Gpa{bar_places[done.bar_place]}, Protection::read_write));
        }
    }
    return done;
}

/// The last pass (everything stopped), the PAM state migrated, tracking stopped.
template <class Src, class Dst>
void last_pass(Src& src, Dst& dst, const PassesDone& done)
{
    std::vector<DirtyRun> runs;
    must(src.m.take_dirty_runs(range(0, space), runs));
    copy_runs(runs, src, dst);
    must(dst.m.ram_visibility_control().set_ram_visibility(*x86_legacy::pam_range(1, 0),
                                                           done.pam_state));
    must(src.m.stop_dirty_tracking());
}

/// Byte for byte, page by page: readable on both sides or on neither. Returns the pages that
/// differ; `compared` gets the pages readable on both.
template <class Src, class Dst>
std::uint64_t differing_pages(Src& src, Dst& dst, std::uint64_t& compared)
{
    std::array<std::byte, page> a{};
    std::array<std::byte, page> b{};
    std::uint64_t differing = 0;
    compared = 0;
    for (std::uint64_t gpa = 0; gpa < space; gpa += page) {
        const bool ra = static_cast<bool>(src.mem.read(Gpa{gpa}, a));
        const bool rb = static_cast<bool>(dst.mem.read(Gpa{gpa}, b));
        REQUIRE(ra == rb);
        if (!ra)
            continue;
        ++compared;
        if (std::memcmp(a.data(), b.data(), page) != 0)
            ++differing;
    }
    return differing;
}

} // namespace membacking::test::migration
