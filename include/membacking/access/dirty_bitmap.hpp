/**
 * @file access/dirty_bitmap.hpp
 * Layer: access (includes base/, and os/windows.hpp on Windows). Linux and Windows.
 *
 * DirtyBitmap: one bit per 4 KiB guest page over the whole guest address space, where every
 * write through a tracked GuestMemory (access/dirty_tracking.hpp) records the pages it wrote, and
 * where a migration loop takes them back as runs (GPA, length) or as a bitmap. Or, in the byte
 * layout (DirtyMapLayout::bytes, chosen by ByteMapDirtyTracking), one byte per page: the same
 * storage, API and results, whose marks and take are access/dirty_byte_map.hpp's; everything
 * below about marking, barriers and clearing is the bit layout's.
 *
 * Storage: ceil(pages / 64) 64-bit words, rounded up to whole pages. Linux: a sealed memfd
 * (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL: its size can never change, so no process that maps
 * it can take SIGBUS), mapped MAP_SHARED | MAP_NORESERVE, so that a worker process
 * (ipc/remote_mapper.hpp) can map the same words and mark into them; Windows: committed pages,
 * which Windows backs only when touched. A 512 GiB guest has a 16 MiB bitmap; tmpfs backs a page
 * of it when it is first touched (a mark, or a harvest's scan).
 *
 * Marking (mark): test, then set. A plain load of the word; only if one of the page bits is
 * still clear, one `lock or` (fetch_or). A page written again before the next harvest costs a
 * load and a branch, no read-modify-write and no cache-line ownership change. No lock, no
 * system call.
 *
 * Why a harvest needs a process-wide barrier (and why that makes test-then-set sound): the writer
 * stores its data and then loads the word. x86 lets the load complete while the data store is
 * still in the store buffer. If the bit is already set the writer does nothing more, and a
 * harvester that clears the bit right then and copies the page could read the page without that
 * data, after which the page is clean and the write is lost. So take_*() clears the bits it
 * takes and then runs one process-wide memory barrier (Linux membarrier
 * MEMBARRIER_CMD_PRIVATE_EXPEDITED, Windows FlushProcessWriteBuffers) before returning: every
 * thread of the process that is running executes a full barrier (one that is not running has
 * drained its store buffer at its last context switch), so every write whose test saw a bit that
 * this harvest cleared is visible before the caller copies the page. Writers that find the bit
 * clear use `lock or`, which is a full barrier itself. The cost is one system call per harvest,
 * none per write.
 *
 * Writers in other processes (Linux): the private barrier reaches only this process's threads.
 * Once the bitmap has been shared (share_fd(), for ipc/remote_listener.hpp) a harvest also runs
 * MEMBARRIER_CMD_GLOBAL_EXPEDITED, which runs a full barrier on every CPU that is running a
 * process registered with MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED; a worker registers before it
 * maps the bitmap (map_shared()), so its marks are the same test-then-set as local ones, with
 * the same argument, and its access path is the local one instruction for instruction. A kernel
 * without the global command (before Linux 4.16) makes map_shared() fail: the worker cannot
 * connect tracked, rather than connect with marks a harvest could lose.
 *
 * Clearing: the harvester takes each word that a plain load finds non-zero with one `xchg` (whole
 * words) or `lock and` (the partial words at either end of a range): a concurrent mark is either
 * in the value taken or left set for the next harvest, never lost. A whole word that the load
 * finds all ones is cleared with a plain store instead (the floor of a fully dirty guest was one
 * locked instruction per word): its 64 pages are all in the result, so a mark that lands between
 * the load and the store (a `lock or` of a bit already set, or a test that finds it set) belongs
 * to a page that is taken, and the barrier above makes its data visible; harvests themselves are
 * serialised by the manager, so nothing else writes the word. A word with any bit clear must not
 * be cleared this way: a mark landing in between would be wiped and not taken
 * (tests/dirty/harvest.cpp proves the difference).
 *
 * Rejected: moving the bitmap's pages away atomically (MREMAP_DONTUNMAP leaves zero pages
 * behind) would turn every writer's next mark into a page fault, which the access path must not
 * take on success; and cmpxchg16b halves the locked instructions where the plain store removes
 * them. A byte per page (a mark is one plain store) makes the map 8x larger: 128 MiB to scan for
 * 512 GiB, above the 4.6 ms goal at any memory bandwidth this machine has; so it is the second
 * layout, for guests whose map a take can read in time, not a replacement.
 */
#pragma once

#include <membacking/access/dirty_byte_map.hpp>
#include <membacking/base/align.hpp>
#include <membacking/base/config.hpp>
#include <membacking/base/dirty_map_layout.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if MEMBACKING_OS_LINUX
#    include <membacking/os/linux.hpp> // the system-call seam

#    include <fcntl.h>
#    include <linux/membarrier.h>
#    include <sys/mman.h>
#    include <sys/stat.h>
#    include <unistd.h>
#elif MEMBACKING_OS_WINDOWS
#    include <membacking/os/windows.hpp> // <windows.h>, lean and without min/max macros
#endif

namespace membacking {

/// A run of dirty pages: [gpa, gpa + length), page-aligned.
struct DirtyRun {
    Gpa gpa;
    Length length;
    friend bool operator==(const DirtyRun&, const DirtyRun&) noexcept = default;
};

namespace detail {

#if MEMBACKING_OS_LINUX
/// membarrier(2) as the bitmap calls it: Sys::membarrier of the seam it was created through.
using MembarrierCall = int (*)(int cmd, unsigned flags) noexcept;

/// One full memory barrier on every running thread of this process (see the file comment).
/// Registration happens in DirtyBitmap::create.
[[nodiscard]] inline bool process_memory_barrier(MembarrierCall membarrier) noexcept
{
    return membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0) == 0;
}

/// Registers this process for `cmd`'s barrier (`registration`: its REGISTER_ command); the
/// error names the command and the kernel that has it. Cheap, and harmless to repeat.
template <class Sys>
[[nodiscard]] Result<void> register_memory_barrier(int registration, const char* command,
                                                   const char* kernel)
{
    if (Sys::membarrier(registration, 0) == 0)
        return {};
    const int error = errno;
    std::string why = "membarrier(";
    why += command;
    why += ") failed: ";
    why += error == EINVAL ? std::string("this kernel does not know the command")
                           : std::system_category().message(error);
    why += " (";
    why += command;
    why += " needs ";
    why += kernel;
    why += ")";
    return make_error(errc::unsupported, why);
}

/// The barrier of a harvest whose bitmap other processes mark (see the file comment).
[[nodiscard]] inline bool global_memory_barrier(MembarrierCall membarrier) noexcept
{
    return membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0) == 0;
}
#elif MEMBACKING_OS_WINDOWS
[[nodiscard]] inline bool process_memory_barrier() noexcept
{
    ::FlushProcessWriteBuffers();
    return true;
}
#endif

/// The system-call seam a manager's bitmap is created through: its VA policy's
/// (`LinuxMmap<Sys>::Syscalls`), so a test that injects failures into the VA policy reaches the
/// bitmap too; the real one for a policy without a seam.
template <class Va>
struct BitmapSyscalls {
#if MEMBACKING_OS_LINUX
    using type = os::LinuxSyscalls;
#else
    using type = void;
#endif
};
template <class Va>
requires requires
{
    typename Va::Syscalls;
}
struct BitmapSyscalls<Va> {
    using type = typename Va::Syscalls;
};

class DirtyBitmap {
public:
    static constexpr std::uint64_t page_shift = 12;
    static constexpr std::uint64_t bits_per_word = 64;

    /// The bytes of the map of guest addresses [0, address_space) in `layout`: whole pages.
    [[nodiscard]] static constexpr std::uint64_t
    bytes_for(std::uint64_t address_space, DirtyMapLayout layout = DirtyMapLayout::bits) noexcept
    {
        const std::uint64_t pages = (address_space + page_size - 1) >> page_shift;
        const std::uint64_t words = layout == DirtyMapLayout::bytes
                                        ? (pages + 7) / 8
                                        : (pages + bits_per_word - 1) / bits_per_word;
        return (words * sizeof(std::uint64_t) + page_size - 1) / page_size * page_size;
    }

    /// A bitmap for guest addresses [0, address_space), all clear. Linux: every system call
    /// (membarrier's registration, memfd_create, ftruncate, F_ADD_SEALS, mmap) goes through
    /// `Sys`, the seam tests replace; a failure closes what was made and names the step.
    ///
    /// Leak-free by construction: the object (and its shared_ptr's control block) is allocated
    /// first, empty, before any resource exists; the memfd belongs to a guard that closes it
    /// through the seam on every way out (an error, or an exception while its message is built)
    /// until the object takes it; and after the mapping exists nothing can throw: the words and
    /// the fd move into the object with two plain stores.
#if MEMBACKING_OS_LINUX
    template <class Sys = os::LinuxSyscalls>
#else
    template <class Sys = void>
#endif
    [[nodiscard]] static Result<std::shared_ptr<DirtyBitmap>>
    create(std::uint64_t address_space, DirtyMapLayout layout = DirtyMapLayout::bits)
    {
        const std::uint64_t pages = (address_space + page_size - 1) >> page_shift;
        const std::uint64_t bytes = bytes_for(address_space, layout);
#if MEMBACKING_OS_LINUX
        std::shared_ptr<DirtyBitmap> bitmap(
            new DirtyBitmap(pages, bytes, layout, &Sys::membarrier));
        // Only the bit map's harvest runs the process-wide barrier (file comment; a byte map's
        // needs a fence of its own: access/dirty_byte_map.hpp).
        if (layout == DirtyMapLayout::bits)
            MEMBACKING_TRY(
                (register_memory_barrier<Sys>(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                                              "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED",
                                              "Linux 4.14 or later: dirty tracking")));
        // errno is read while the return value is built, before the guard closes the memfd.
        auto failed = [&](const char* what) {
            const int error = errno;
            std::string why = "cannot create the dirty bitmap (";
            why += MemoryRange::hex(bytes);
            why += " bytes): ";
            why += what;
            return Error(std::error_code(error, std::system_category()), why);
        };
        SeamFd<Sys> fd{Sys::memfd_create("membacking-dirty", MFD_CLOEXEC | MFD_ALLOW_SEALING)};
        if (fd.fd < 0)
            return failed("memfd_create");
        if (Sys::ftruncate(fd.fd, static_cast<off_t>(bytes)) != 0)
            return failed("sizing its memfd (ftruncate)");
        if (Sys::add_seals(fd.fd, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
            return failed("sealing its memfd (F_ADD_SEALS)");
        void* p =
            Sys::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd.fd, 0);
        if (p == MAP_FAILED)
            return failed("mmap");
        bitmap->words_ = static_cast<std::atomic<std::uint64_t>*>(p);
        bitmap->fd_ = fd.release();
        return bitmap;
#else
        std::shared_ptr<DirtyBitmap> bitmap(new DirtyBitmap(pages, bytes, layout));
        void* p = ::VirtualAlloc(nullptr, bytes, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
        if (p == nullptr)
            return Error(
                std::error_code(static_cast<int>(::GetLastError()), std::system_category()),
                "cannot reserve the dirty bitmap (" + MemoryRange::hex(bytes) + " bytes)");
        bitmap->words_ = static_cast<std::atomic<std::uint64_t>*>(p);
        return bitmap;
#endif
    }

#if MEMBACKING_OS_LINUX
    /// The memfd of the words, to hand to a worker process (ipc/remote_listener.hpp; the
    /// caller duplicates it if it keeps it). From now on every harvest also runs the global
    /// barrier (file comment).
    [[nodiscard]] int share_fd() const noexcept
    {
        shared_.store(true, std::memory_order_seq_cst);
        return fd_;
    }
    /// Whether share_fd() was called (for tests).
    [[nodiscard]] bool shared() const noexcept
    {
        return shared_.load();
    }

    /// A worker's view of a manager's map for guest addresses [0, address_space) in `layout`
    /// (the manager's: ipc/protocol.hpp's hello names it): takes ownership of `fd` (what
    /// share_fd() gave the manager's side), which must be a sealed memfd of exactly
    /// bytes_for(address_space, layout) bytes whose size can never change. For the bit layout,
    /// registers this process for the global barrier first (file comment; a byte map needs
    /// none: access/dirty_byte_map.hpp). Marks only: a worker never harvests.
    /// Its system calls go through `Sys` (membarrier's registration, fstat, F_GET_SEALS, mmap).
    /// Leak-free as create(): `fd` is guarded from the start, the object allocated before the
    /// mapping exists.
    template <class Sys = os::LinuxSyscalls>
    [[nodiscard]] static Result<std::shared_ptr<DirtyBitmap>>
    map_shared(int fd, std::uint64_t address_space, DirtyMapLayout layout = DirtyMapLayout::bits)
    {
        SeamFd<Sys> owned{fd}; // closed through the seam on every way out but success
        const std::uint64_t pages = (address_space + page_size - 1) >> page_shift;
        const std::uint64_t bytes = bytes_for(address_space, layout);
        std::shared_ptr<DirtyBitmap> bitmap(
            new DirtyBitmap(pages, bytes, layout, &Sys::membarrier));
        auto fail = [&](errc code, const std::string& why) {
            std::string what = "the manager's dirty bitmap: ";
            what += why;
            return make_error(code, what);
        };
        struct stat st {};
        if (Sys::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
            return fail(errc::invalid_argument, "not a regular file (memfd)");
        if (static_cast<std::uint64_t>(st.st_size) != bytes)
            return fail(errc::invalid_argument,
                        "size " + MemoryRange::hex(static_cast<std::uint64_t>(st.st_size)) +
                            ", a guest of " + MemoryRange::hex(address_space) + " needs " +
                            MemoryRange::hex(bytes));
        const int seals = Sys::get_seals(fd);
        if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
            return fail(errc::invalid_argument,
                        "its size is not sealed (F_SEAL_SHRINK | F_SEAL_GROW): it could shrink "
                        "under the marks");
        if (layout == DirtyMapLayout::bits)
            if (auto registered = register_memory_barrier<Sys>(
                    MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED,
                    "MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED",
                    "Linux 4.16 or later: marking from another process");
                !registered)
                return fail(errc::unsupported, registered.error().message());
        void* p =
            Sys::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (p == MAP_FAILED)
            return fail(errc::invalid_argument, "mmap failed");
        bitmap->words_ = static_cast<std::atomic<std::uint64_t>*>(p);
        bitmap->fd_ = owned.release();
        return bitmap;
    }
#endif

    DirtyBitmap(const DirtyBitmap&) = delete;
    DirtyBitmap& operator=(const DirtyBitmap&) = delete;
    /// Frees what the object holds: nothing, for one whose creation failed (create()).
    ~DirtyBitmap()
    {
#if MEMBACKING_OS_LINUX
        if (words_ != nullptr)
            ::munmap(words_, bytes_);
        if (fd_ >= 0)
            ::close(fd_);
#else
        if (words_ != nullptr)
            ::VirtualFree(words_, 0, MEM_RELEASE);
#endif
    }

    /// The pages the bitmap covers, and its words (for the access path's marker).
    [[nodiscard]] std::uint64_t pages() const noexcept
    {
        return pages_;
    }
    [[nodiscard]] std::atomic<std::uint64_t>* words() const noexcept
    {
        return words_;
    }
    /// The same storage as one byte per page, for a byte map's marker (layout() == bytes).
    [[nodiscard]] unsigned char* marks() const noexcept
    {
        return reinterpret_cast<unsigned char*>(words_);
    }
    [[nodiscard]] DirtyMapLayout layout() const noexcept
    {
        return layout_;
    }
    /// The bytes reserved for the bitmap.
    [[nodiscard]] std::uint64_t reserved_bytes() const noexcept
    {
        return bytes_;
    }

    /// Marks every page of [gpa, gpa + len) (len > 0; the caller has bounds-checked it).
    MEMBACKING_ALWAYS_INLINE void mark(std::uint64_t gpa, std::uint64_t len) const noexcept
    {
        if (layout_ == DirtyMapLayout::bytes)
            DirtyByteMap::mark(marks(), gpa, len);
        else
            mark_words(words_, gpa, len);
    }

    /// The access path's mark, on the bare word array: test, then set (file comment).
    MEMBACKING_ALWAYS_INLINE static void mark_words(std::atomic<std::uint64_t>* words,
                                                    std::uint64_t gpa, std::uint64_t len) noexcept
    {
        // Keep the data store before the test in program order (the harvest's barrier covers
        // the hardware's reordering; this covers the compiler's). No instruction.
        std::atomic_signal_fence(std::memory_order_seq_cst);
        const std::uint64_t first = gpa >> page_shift;
        const std::uint64_t last = (gpa + len - 1) >> page_shift;
        if (first == last) [[likely]] {
            std::atomic<std::uint64_t>& w = words[first / bits_per_word];
            const std::uint64_t bit = std::uint64_t{1} << (first % bits_per_word);
            if ((w.load(std::memory_order_relaxed) & bit) == 0) [[unlikely]]
                w.fetch_or(bit, std::memory_order_relaxed);
            return;
        }
        mark_pages(words, first, last + 1);
    }

    /// The mark of a fixed-size access (Size a power of two, at most 8): one page, test-then-set
    /// on one bit. A naturally aligned access cannot cross a page, so the hot path is a shift, a
    /// load, a bit test and a branch; `Aligned` says the caller has checked the alignment (the
    /// atomics); otherwise a misaligned one takes the general mark, out of line.
    template <std::uint64_t Size, bool Aligned>
    MEMBACKING_ALWAYS_INLINE static void mark_one(std::atomic<std::uint64_t>* words,
                                                  std::uint64_t gpa) noexcept
    {
        static_assert(Size != 0 && Size <= bits_per_word / 8 && (Size & (Size - 1)) == 0);
        // The data store stays before the test in program order, as in mark_words.
        std::atomic_signal_fence(std::memory_order_seq_cst);
        if constexpr (!Aligned && Size > 1)
            if (gpa % Size != 0) [[unlikely]] {
                mark_misaligned(words, gpa, Size);
                return;
            }
        const std::uint64_t page = gpa >> page_shift;
        const std::uint64_t w = words[page / bits_per_word].load(std::memory_order_relaxed);
        if (((w >> (page % bits_per_word)) & 1) == 0) [[unlikely]]
            set_bit(words, page);
    }

    /// Sets every bit of [first, end) pages, word by word, test-then-set.
    static void mark_pages(std::atomic<std::uint64_t>* words, std::uint64_t first,
                           std::uint64_t end) noexcept
    {
        while (first < end) {
            const std::uint64_t word = first / bits_per_word;
            const std::uint64_t lo = first % bits_per_word;
            const std::uint64_t hi = std::min<std::uint64_t>(bits_per_word, lo + (end - first));
            const std::uint64_t mask = range_mask(lo, hi);
            std::atomic<std::uint64_t>& w = words[word];
            if ((w.load(std::memory_order_relaxed) & mask) != mask)
                w.fetch_or(mask, std::memory_order_relaxed);
            first += hi - lo;
        }
    }

    /// Clears every bit of [gpa, gpa + len) without reporting it (start of tracking).
    void clear(std::uint64_t gpa, std::uint64_t len) noexcept
    {
        if (layout_ == DirtyMapLayout::bytes) {
            DirtyByteMap::clear(marks(), gpa >> page_shift, (gpa + len) >> page_shift);
            return;
        }
        for_each_word(gpa, len, [](std::atomic<std::uint64_t>& w, std::uint64_t mask) {
            if ((w.load(std::memory_order_relaxed) & mask) != 0)
                w.fetch_and(~mask, std::memory_order_relaxed);
        });
    }

    /// ORs `bits` (bit i = page i from gpa, gpa page-aligned) into the bitmap: a partition's log.
    void merge(std::uint64_t gpa, std::span<const std::uint64_t> bits) noexcept
    {
        const std::uint64_t base = gpa >> page_shift;
        for (std::size_t i = 0; i < bits.size(); ++i) {
            std::uint64_t b = bits[i];
            while (b != 0) {
                const auto lo = static_cast<std::uint64_t>(std::countr_zero(b));
                const auto n = static_cast<std::uint64_t>(std::countr_one(b >> lo));
                const std::uint64_t page = base + i * bits_per_word + lo;
                const std::uint64_t end = std::min(page + n, pages_);
                if (page < end)
                    mark_range(page, end);
                b = lo + n == bits_per_word ? 0 : b & ~range_mask(0, lo + n);
            }
        }
    }

    /// Takes (reads and clears) the dirty pages of [gpa, gpa + len), page-aligned and inside the
    /// bitmap, appending them to `out` as maximal runs in ascending order. Ends with the
    /// process-wide barrier (false if that failed: the caller must not trust the pages' bytes).
    [[nodiscard]] bool take_runs(std::uint64_t gpa, std::uint64_t len,
                                 std::vector<DirtyRun>& out) const
    {
        // The run being built, [run_start, run_end) in pages; run_end == no_run before the
        // first. A new run that starts where the current one ends extends it, across words.
        constexpr std::uint64_t no_run = ~std::uint64_t{0};
        std::uint64_t run_start = 0;
        std::uint64_t run_end = no_run;
        auto begin_at = [&](std::uint64_t page) {
            if (run_end != page) {
                if (run_end != no_run)
                    out.push_back({Gpa(run_start << page_shift),
                                   Length((run_end - run_start) << page_shift)});
                run_start = page;
            }
        };
        take_words(
            gpa, len,
            [&](std::uint64_t page0, std::uint64_t bits) {
                // One run per iteration: lo = its first bit; filling the zeros below it and
                // adding one carries through the run, so the carry's bit is its end.
                while (bits != 0) {
                    const auto lo = static_cast<std::uint64_t>(std::countr_zero(bits));
                    const std::uint64_t carry = (bits | (bits - 1)) + 1;
                    begin_at(page0 + lo);
                    run_end = page0 + static_cast<std::uint64_t>(std::countr_zero(carry));
                    bits &= carry;
                }
            },
            [&](std::uint64_t page0, std::uint64_t pages) { // a stretch of all-ones words
                begin_at(page0);
                run_end = page0 + pages;
            });
        if (run_end != no_run)
            out.push_back(
                {Gpa(run_start << page_shift), Length((run_end - run_start) << page_shift)});
        return barrier();
    }

    /// Takes the dirty pages of [gpa, gpa + len) into `out`: bit i of word i / 64 is the page at
    /// gpa + i * 4 KiB. `out` must hold ceil(pages / 64) words; the bits are OR-ed in.
    [[nodiscard]] bool take_bitmap(std::uint64_t gpa, std::uint64_t len,
                                   std::span<std::uint64_t> out) const noexcept
    {
        const std::uint64_t base = gpa >> page_shift;
        auto bits_of = [&](std::uint64_t page0, std::uint64_t bits) {
            while (bits != 0) {
                const auto lo = static_cast<std::uint64_t>(std::countr_zero(bits));
                const std::uint64_t i = page0 + lo - base;
                out[i / bits_per_word] |= std::uint64_t{1} << (i % bits_per_word);
                bits &= bits - 1;
            }
        };
        take_words(gpa, len, bits_of, [&](std::uint64_t page0, std::uint64_t pages) {
            for (std::uint64_t p = 0; p < pages; p += bits_per_word)
                bits_of(page0 + p, ~std::uint64_t{0});
        });
        return barrier();
    }

private:
    /// The barrier that ends a harvest: this process's threads, and once shared, the workers'.
    [[nodiscard]] bool barrier() const noexcept
    {
        if (layout_ == DirtyMapLayout::bytes) {
            DirtyByteMap::fence();
            return true;
        }
#if MEMBACKING_OS_LINUX
        if (!process_memory_barrier(membarrier_))
            return false;
        if (shared_.load(std::memory_order_seq_cst))
            return global_memory_barrier(membarrier_);
        return true;
#else
        return process_memory_barrier();
#endif
    }

    /// Marks pages [first, end) in either layout.
    void mark_range(std::uint64_t first, std::uint64_t end) const noexcept
    {
        if (layout_ == DirtyMapLayout::bytes)
            DirtyByteMap::mark_pages(marks(), first, end);
        else
            mark_pages(words_, first, end);
    }

    /// mark_one's rare paths, out of line so that the hot path keeps its registers.
    MEMBACKING_NOINLINE MEMBACKING_COLD static void set_bit(std::atomic<std::uint64_t>* words,
                                                            std::uint64_t page) noexcept
    {
        words[page / bits_per_word].fetch_or(std::uint64_t{1} << (page % bits_per_word),
                                             std::memory_order_relaxed);
    }
    MEMBACKING_NOINLINE MEMBACKING_COLD static void
    mark_misaligned(std::atomic<std::uint64_t>* words, std::uint64_t gpa,
                    std::uint64_t len) noexcept
    {
        mark_words(words, gpa, len);
    }

    /// An empty bitmap (no words, no fd): create() and map_shared() allocate it before they
    /// make anything it will own, then hand that over.
#if MEMBACKING_OS_LINUX
    DirtyBitmap(std::uint64_t pages, std::uint64_t bytes, DirtyMapLayout layout,
                MembarrierCall membarrier) noexcept
        : pages_(pages), bytes_(bytes), layout_(layout), membarrier_(membarrier)
    {}

    /// A descriptor made through the seam `Sys`, closed through it unless release()d.
    template <class Sys>
    struct SeamFd {
        explicit SeamFd(int owned) noexcept : fd(owned) {}
        SeamFd(const SeamFd&) = delete;
        SeamFd& operator=(const SeamFd&) = delete;
        ~SeamFd()
        {
            if (fd >= 0)
                Sys::close(fd);
        }
        [[nodiscard]] int release() noexcept { return std::exchange(fd, -1); }
        int fd;
    };
#else
    DirtyBitmap(std::uint64_t pages, std::uint64_t bytes, DirtyMapLayout layout) noexcept
        : pages_(pages), bytes_(bytes), layout_(layout)
    {}
#endif

    /// Bits [lo, hi) of a word, 0 <= lo < hi <= 64.
    [[nodiscard]] static constexpr std::uint64_t range_mask(std::uint64_t lo,
                                                            std::uint64_t hi) noexcept
    {
        const std::uint64_t upto =
            hi == bits_per_word ? ~std::uint64_t{0} : (std::uint64_t{1} << hi) - 1;
        return upto & ~((std::uint64_t{1} << lo) - 1);
    }

    /// f(word, mask) for every word that [gpa, gpa + len) touches, with the mask of its pages.
    template <class F>
    void for_each_word(std::uint64_t gpa, std::uint64_t len, F f) const noexcept
    {
        std::uint64_t first = gpa >> page_shift;
        const std::uint64_t end = (gpa + len) >> page_shift;
        while (first < end) {
            const std::uint64_t lo = first % bits_per_word;
            const std::uint64_t hi = std::min<std::uint64_t>(bits_per_word, lo + (end - first));
            f(words_[first / bits_per_word], range_mask(lo, hi));
            first += hi - lo;
        }
    }

    /// f(first page of the word, bits taken) for every word of the range that had bits set, and
    /// full(first page, pages) for every stretch of whole words that were all ones. Whole words:
    /// plain loads skip clean ones four at a time; a word found all ones is cleared with a plain
    /// store (file comment: sound because every bit of it is taken), any other non-zero word
    /// with one xchg. Partial words at the ends: lock and.
    template <class F, class Full>
    void take_words(std::uint64_t gpa, std::uint64_t len, F f, Full full) const noexcept
    {
        std::uint64_t first = gpa >> page_shift;
        const std::uint64_t end = (gpa + len) >> page_shift;
        if (layout_ == DirtyMapLayout::bytes) {
            DirtyByteMap::take(marks(), first, end, f, full);
            return;
        }
        auto partial = [&](std::uint64_t lo, std::uint64_t hi) {
            std::atomic<std::uint64_t>& w = words_[first / bits_per_word];
            const std::uint64_t mask = range_mask(lo, hi);
            if ((w.load(std::memory_order_relaxed) & mask) != 0)
                if (const std::uint64_t bits = w.fetch_and(~mask, std::memory_order_acquire) & mask;
                    bits != 0)
                    f(first - lo, bits);
            first += hi - lo;
        };
        if (first < end && first % bits_per_word != 0)
            partial(first % bits_per_word,
                    std::min<std::uint64_t>(bits_per_word, first % bits_per_word + (end - first)));
        constexpr std::uint64_t ones = ~std::uint64_t{0};
        std::atomic<std::uint64_t>* w = words_ + first / bits_per_word;
        std::atomic<std::uint64_t>* const whole_end =
            w + (end - first) / bits_per_word; // first <= end
        auto page_of = [&](const std::atomic<std::uint64_t>* at) {
            return static_cast<std::uint64_t>(at - words_) * bits_per_word;
        };
        while (w != whole_end) {
            if (whole_end - w >= 4) {
                const std::uint64_t a = w[0].load(std::memory_order_relaxed);
                const std::uint64_t b = w[1].load(std::memory_order_relaxed);
                const std::uint64_t c = w[2].load(std::memory_order_relaxed);
                const std::uint64_t d = w[3].load(std::memory_order_relaxed);
                if ((a | b | c | d) == 0) {
                    w += 4;
                    continue;
                }
            }
            const std::uint64_t v = w->load(std::memory_order_relaxed);
            if (v == 0) {
                ++w;
            } else if (v == ones) {
                // A stretch of all-ones words: each loaded, found all ones, then zeroed.
                std::atomic<std::uint64_t>* const from = w;
                w->store(0, std::memory_order_relaxed);
                ++w;
                while (whole_end - w >= 4) {
                    const std::uint64_t a = w[0].load(std::memory_order_relaxed);
                    const std::uint64_t b = w[1].load(std::memory_order_relaxed);
                    const std::uint64_t c = w[2].load(std::memory_order_relaxed);
                    const std::uint64_t d = w[3].load(std::memory_order_relaxed);
                    if ((a & b & c & d) != ones)
                        break;
                    for (int i = 0; i < 4; ++i)
                        w[i].store(0, std::memory_order_relaxed);
                    w += 4;
                }
                while (w != whole_end && w->load(std::memory_order_relaxed) == ones) {
                    w->store(0, std::memory_order_relaxed);
                    ++w;
                }
                full(page_of(from), static_cast<std::uint64_t>(w - from) * bits_per_word);
            } else {
                f(page_of(w), w->exchange(0, std::memory_order_acquire));
                ++w;
            }
        }
        first += (end - first) / bits_per_word * bits_per_word;
        if (first < end)
            partial(0, end - first);
    }

    std::atomic<std::uint64_t>* words_ = nullptr; ///< null only while create() builds it
    std::uint64_t pages_;
    std::uint64_t bytes_;
    DirtyMapLayout layout_;
#if MEMBACKING_OS_LINUX
    int fd_ = -1;               ///< the memfd of the words
    MembarrierCall membarrier_; ///< the seam's membarrier (the harvest's barriers)
    mutable std::atomic<bool> shared_ =
        false; ///< share_fd() called: harvests run the global barrier
#endif
};

} // namespace detail
} // namespace membacking
