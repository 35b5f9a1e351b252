/**
 * @file access/dirty_byte_map.hpp
 * Layer: access (includes base/config.hpp only). x86-64 (the soundness argument below is TSO's).
 *
 * The byte-map layout of DirtyBitmap (DirtyMapLayout::bytes, chosen by ByteMapDirtyTracking):
 * one byte per 4 KiB guest page, 1 = dirty, 0 = clean. These are its marks and its harvest; the
 * storage (a sealed memfd or committed pages) and the dispatch are DirtyBitmap's.
 *
 * Why a second layout: the bit map's mark has to load its word and test the bit after the data
 * store (a `lock or` for every write would cost more), and on the machines this was measured on
 * any load after the store makes a one-store loop three times slower (README, dirty-tracking
 * benchmarks). A byte can be set with one plain store, no load and no branch: the tracked write
 * costs what the untracked one costs. The price is memory: 8x the bit map (16 MiB for a 64 GiB
 * guest, 128 MiB for 512 GiB), which a harvest must read. So the byte map is for guests whose
 * map a harvest reads in time, the bit map for the largest ones; a VMM picks one at compile time.
 *
 * Marking: a release store of 1 to the page's byte after the data is written (a plain `mov` on
 * x86-64; release keeps the compiler from moving it above the data stores). A write that spans
 * pages stores every page's byte. No lock, no load, no system call.
 *
 * Harvest (take): 64 pages (64 bytes, 8 words) at a time. Clean chunks are skipped after plain
 * loads; a word whose 8 bytes are all 1 is cleared with one plain 8-byte store; in any other word
 * only the bytes that were found 1 are cleared, each with a plain byte store. Bytes found 0 are
 * never written, so a mark that lands on one is left for the next harvest. The harvest ends
 * with one full fence (`mfence`) before the caller copies pages.
 *
 * Why that loses no write, with no locked instruction and no process-wide barrier (the bit map
 * needs both): a writer's stores become visible in program order (x86-TSO), its data before its
 * mark. Take a mark M that the harvester's clear C of the same byte could hide. If M is ordered
 * after C in the byte's coherence order, the byte stays 1 and the next harvest takes the page.
 * If M is ordered before C, then M, and so the data before it, was visible before C was; the
 * fence after C makes C visible before any later load of the harvester, so the copy the caller
 * makes after take() sees the data. Marks from other processes (a worker mapping the same memfd)
 * are the same stores under the same argument.
 */
#pragma once

#include <membacking/base/config.hpp>

#include <atomic>
#include <bit>
#include <cstdint>

namespace membacking::detail {

struct DirtyByteMap {
    static constexpr std::uint64_t page_shift = 12;
    static constexpr std::uint64_t pages_per_chunk = 64;            ///< one result word of take()
    static constexpr std::uint64_t all_marked = 0x0101010101010101; ///< a word of 8 set bytes

    /// Marks the pages of [gpa, gpa + len), len > 0 and bounds-checked by the caller.
    MEMBACKING_ALWAYS_INLINE static void mark(unsigned char* marks, std::uint64_t gpa,
                                              std::uint64_t len) noexcept
    {
        const std::uint64_t first = gpa >> page_shift;
        const std::uint64_t last = (gpa + len - 1) >> page_shift;
        set(marks + first);
        if (last != first) [[unlikely]]
            mark_pages(marks, first + 1, last + 1);
    }

    /// The mark of a fixed-size access of Size bytes (a power of two, at most 8) at gpa; with
    /// `Aligned` (the caller checked gpa % Size == 0) it cannot cross a page: one store.
    template <std::uint64_t Size, bool Aligned>
    MEMBACKING_ALWAYS_INLINE static void mark_one(unsigned char* marks, std::uint64_t gpa) noexcept
    {
        static_assert(Size != 0 && Size <= 8 && (Size & (Size - 1)) == 0);
        // A misaligned access may cross a page: out of line (a test of the low bits here is
        // one fused instruction; checking for the crossing itself costs more on the hot path).
        if constexpr (!Aligned && Size > 1)
            if (gpa % Size != 0) [[unlikely]] {
                mark_misaligned(marks, gpa, Size);
                return;
            }
        set(marks + (gpa >> page_shift));
    }

    /// Marks pages [first, end).
    static void mark_pages(unsigned char* marks, std::uint64_t first, std::uint64_t end) noexcept
    {
        for (std::uint64_t p = first; p < end; ++p)
            set(marks + p);
    }

    /// Clears pages [first, end) without reporting them (the start of tracking).
    static void clear(unsigned char* marks, std::uint64_t first, std::uint64_t end) noexcept
    {
        for (; first < end && first % 8 != 0; ++first)
            __atomic_store_n(marks + first, 0, __ATOMIC_RELAXED);
        for (; end - first >= 8; first += 8)
            __atomic_store_n(word(marks, first), std::uint64_t{0}, __ATOMIC_RELAXED);
        for (; first < end; ++first)
            __atomic_store_n(marks + first, 0, __ATOMIC_RELAXED);
    }

    /// Takes (reads and clears, file comment) the marks of pages [first, end): f(page0, bits) for
    /// every chunk of 64 pages from page0 (a multiple of 64) that had pages taken, bit i = page
    /// page0 + i; full(page0, 64) instead for a chunk whose 64 pages were all taken. The caller
    /// ends the harvest with fence().
    template <class F, class Full>
    static void take(unsigned char* marks, std::uint64_t first, std::uint64_t end, F f,
                     Full full) noexcept
    {
        while (first < end) {
            const std::uint64_t page0 = first - first % pages_per_chunk;
            if (first == page0 && end - first >= pages_per_chunk) {
                take_chunk(marks, page0, f, full);
                first += pages_per_chunk;
                continue;
            }
            // A chunk that the range covers only partly: byte by byte, only inside the range.
            const std::uint64_t stop =
                end - page0 < pages_per_chunk ? end : page0 + pages_per_chunk;
            std::uint64_t bits = 0;
            for (std::uint64_t p = first; p < stop; ++p)
                if (__atomic_load_n(marks + p, __ATOMIC_RELAXED) != 0) {
                    __atomic_store_n(marks + p, 0, __ATOMIC_RELAXED);
                    bits |= std::uint64_t{1} << (p - page0);
                }
            if (bits != 0)
                f(page0, bits);
            first = stop;
        }
    }

    /// The end of a harvest: the clears visible before any later load (file comment).
    /// `mfence` itself: the argument is x86-TSO's, and GCC's ThreadSanitizer refuses
    /// std::atomic_thread_fence.
    static void fence() noexcept { asm volatile("mfence" ::: "memory"); }

private:
    MEMBACKING_NOINLINE MEMBACKING_COLD static void
    mark_misaligned(unsigned char* marks, std::uint64_t gpa, std::uint64_t len) noexcept
    {
        mark(marks, gpa, len);
    }
    MEMBACKING_ALWAYS_INLINE static void set(unsigned char* mark) noexcept
    {
        __atomic_store_n(mark, 1, __ATOMIC_RELEASE);
    }
    [[nodiscard]] static std::uint64_t* word(unsigned char* marks, std::uint64_t page) noexcept
    {
        return reinterpret_cast<std::uint64_t*>(marks + page); // page % 8 == 0: aligned
    }

    /// The 8 marks of a word (each byte 0 or 1) as 8 bits, byte i -> bit i: the multiply
    /// gathers every byte's low bit into the top byte.
    [[nodiscard]] static std::uint64_t gather(std::uint64_t v) noexcept
    {
        return ((v & all_marked) * 0x0102040810204080) >> 56;
    }

    /// One whole chunk of 64 pages from page0 (a multiple of 64).
    template <class F, class Full>
    MEMBACKING_ALWAYS_INLINE static void take_chunk(unsigned char* marks, std::uint64_t page0, F& f,
                                                    Full& full) noexcept
    {
        std::uint64_t* w = word(marks, page0);
        std::uint64_t v[8];
        std::uint64_t any = 0;
        std::uint64_t every = all_marked;
        for (int i = 0; i < 8; ++i) {
            v[i] = __atomic_load_n(w + i, __ATOMIC_RELAXED);
            any |= v[i];
            every &= v[i];
        }
        if (any == 0)
            return;
        if (every == all_marked) { // all 64 taken: plain word stores
            for (int i = 0; i < 8; ++i)
                __atomic_store_n(w + i, std::uint64_t{0}, __ATOMIC_RELAXED);
            full(page0, pages_per_chunk);
            return;
        }
        // Clear exactly the bytes found set: a word of 8 with one store, the others one byte
        // store per taken page, found by its bit (one loop over the chunk: a branch per dirty
        // page, not one per byte).
        std::uint64_t bits = 0;
        std::uint64_t single = 0; // the taken pages not in a word of 8
        for (int i = 0; i < 8; ++i) {
            const std::uint64_t taken = gather(v[i]) << (8 * i);
            bits |= taken;
            if (v[i] == all_marked)
                __atomic_store_n(w + i, std::uint64_t{0}, __ATOMIC_RELAXED);
            else
                single |= taken;
        }
        for (; single != 0; single &= single - 1)
            __atomic_store_n(marks + page0 + static_cast<std::uint64_t>(std::countr_zero(single)),
                             0, __ATOMIC_RELAXED);
        f(page0, bits);
    }
};

} // namespace membacking::detail
