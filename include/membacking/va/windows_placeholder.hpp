/**
 * @file va/windows_placeholder.hpp
 * Layer: va (includes base/, detail/, os/windows.hpp, va/). The whole body is Windows-only.
 *
 * WindowsPlaceholder<Sys>: the Windows VaPolicy, built on placeholders (Windows 10 1803 and
 * later; Wine 9 and later). Reference: sparse_mmap's windows.rs; its quirks are fixed here.
 *
 * The reservation is a placeholder: address space that nothing else can take, that can be split
 * and coalesced, and that a section view or private memory can *replace* in place. Windows maps
 * only into a placeholder of exactly the mapping's size, and a view can only be unmapped whole,
 * so the policy keeps books of what it mapped (`pieces`: offset, end, section or private,
 * file offset, permission), and keeps one invariant:
 *
 *     every gap between pieces is exactly one placeholder.
 *
 * - reserve: VirtualAlloc2(MEM_RESERVE | MEM_RESERVE_PLACEHOLDER). An alignment above the 64 KiB
 *   that every reservation has is obtained as on Linux: reserve size + alignment, split off the
 *   aligned part, release the ends.
 * - map_file(off, len, section, file_offset, writable): clear [off, off+len) (below), which leaves
 *   it inside one gap; split the gap's placeholder (VirtualFree(MEM_RELEASE |
 *   MEM_PRESERVE_PLACEHOLDER)) so [off, off+len) is exactly one placeholder; MapViewOfFile3(...,
 *   MEM_REPLACE_PLACEHOLDER).
 * - commit_private(off, len): the same, with VirtualAlloc2(MEM_RESERVE | MEM_COMMIT |
 *   MEM_REPLACE_PLACEHOLDER): zero-filled private memory, read-write.
 * - unmap(off, len): clear [off, off+len).
 * - clear: each section view that overlaps is unmapped whole with UnmapViewOfFile2(
 *   MEM_PRESERVE_PLACEHOLDER); if it reached outside the range, its placeholder is split and the
 *   head and tail are mapped again from the same section at their file offsets (a view cannot be
 *   unmapped in part). Private memory in the range is released back to a placeholder
 *   (VirtualFree(MEM_RELEASE | MEM_PRESERVE_PLACEHOLDER)). Then the placeholders between the
 *   neighbouring pieces are coalesced into one (VirtualFree(MEM_RELEASE |
 *   MEM_COALESCE_PLACEHOLDERS)): the invariant holds again.
 * - protect(off, len, writable): private memory, and whole views within the protection they
 *   were mapped with, are VirtualProtect()ed in place: no moment without memory, so a region
 *   toggled between read-write and read-only (PAM, RAM visibility) never faults a reader. A
 *   view's protection is bounded by the protection it was mapped with (VirtualProtect cannot
 *   make a view mapped read-only writable), so such a view, or part of a view, changes
 *   protection by being mapped again, from the same section at the same file offset, with the
 *   new one: the bytes are the section's, so nothing is lost. The books remember each view's
 *   mapped protection; an undo, or the re-map of a head or tail, restores it. A range that is
 *   not wholly mapped is refused.
 * - hints: Windows has no transparent huge pages and binds NUMA nodes only when memory is mapped,
 *   so advise_hugepages and bind_numa report errc::unsupported (the mapping manager counts THP
 *   advice that was refused and fails an explicit NUMA request, as it should); set_name has no
 *   Windows counterpart and reports errc::unsupported too.
 * - objects: create_shared_memory is a pagefile-backed section (CreateFileMappingW of
 *   INVALID_HANDLE_VALUE, PAGE_READWRITE); large-page sections need SeLockMemoryPrivilege and are
 *   not offered (errc::unsupported).
 *
 * All or nothing. Every step that changes the address space pushes its inverse onto an undo log
 * (detail/undo_log.hpp), and the books are restored from a copy when an operation fails: a view
 * that was unmapped is mapped again, a split placeholder is coalesced, a coalesced one split
 * again at its old boundaries. The one thing an undo cannot bring back is the *contents* of
 * private memory that a failing operation had already released: it is committed again,
 * zero-filled. Private memory is therefore released last, after every view has been dealt
 * with, so only a failure of the final coalesce (or, for a map or commit over private memory,
 * of the new mapping) can cost them. The mapping manager never maps over private memory.
 *
 * Not atomic: unlike MAP_FIXED, replacing a mapping leaves a moment in which the range is a bare
 * placeholder, and a partial unmap briefly removes the head and tail too. An access from another
 * thread then faults; GuestMemory resolves such a fault through the mapping manager, whose lock
 * the control operation holds, and retries after it, so accessors see old or new memory, never
 * an error. `features` therefore lacks VaFeatures::atomic_replace.
 *
 * Thread-safety: a mutex serialises the policy's own operations (the mapping manager serialises
 * them anyway). Every Win32 call goes through Sys (os/windows.hpp), which tests replace to fail
 * the n-th call.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_WINDOWS

#    include <membacking/base/align.hpp>
#    include <membacking/base/fatal.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/base/units.hpp>
#    include <membacking/detail/interval_map.hpp>
#    include <membacking/detail/undo_log.hpp>
#    include <membacking/os/windows.hpp>
#    include <membacking/va/detail/va_arguments.hpp>
#    include <membacking/va/mappable.hpp>
#    include <membacking/va/va_policy.hpp>

#    include <algorithm>
#    include <cstddef>
#    include <cstdint>
#    include <memory>
#    include <mutex>
#    include <optional>
#    include <string>
#    include <utility>
#    include <vector>

namespace membacking {

template <class Sys = os::WindowsSyscalls>
class WindowsPlaceholder {
public:
    static constexpr VaFeatures features = VaFeatures::none;

    static constexpr std::uint64_t two_mib = std::uint64_t{2} << 20;
    static constexpr std::uint64_t one_gib = std::uint64_t{1} << 30;

    /// One mapped piece of the reservation, as the books have it.
    struct Piece {
        std::uint64_t offset = 0;
        std::uint64_t end = 0;
        Mappable object; ///< the section; empty for private memory
        std::uint64_t file_offset = 0;
        bool writable = false;
        /// A view's protection when it was mapped, the most VirtualProtect can give it back
        /// (unused for private memory, which VirtualProtect changes either way).
        bool mapped_writable = false;

        [[nodiscard]] bool is_private() const noexcept { return object.empty(); }
        [[nodiscard]] std::uint64_t size() const noexcept { return end - offset; }
        /// The part [from, to) of this piece (a section's file offset moves with it).
        [[nodiscard]] Piece slice(std::uint64_t from, std::uint64_t to) const
        {
            Piece p = *this;
            p.offset = from;
            p.end = to;
            if (!p.is_private())
                p.file_offset = file_offset + (from - offset);
            return p;
        }
        friend bool operator==(const Piece&, const Piece&) = default;
    };

    /// The base alignment for a reservation of `size` bytes (the same rule as LinuxMmap's).
    [[nodiscard]] static constexpr std::uint64_t default_alignment(std::uint64_t size) noexcept
    {
        return size < two_mib ? page_size : size < one_gib ? two_mib : one_gib;
    }

    /// Reserves `size` bytes (rounded up to a page) as one placeholder, aligned as LinuxMmap's.
    [[nodiscard]] static Result<WindowsPlaceholder> reserve(std::uint64_t size,
                                                            std::uint64_t min_alignment)
    {
        if (size == 0)
            return make_error(errc::invalid_argument,
                              "cannot reserve an empty guest address space");
        if (!is_power_of_two(min_alignment))
            return make_error(errc::invalid_argument, "reservation alignment " +
                                                          MemoryRange::hex(min_alignment) +
                                                          " is not a power of two");
        if (!Sys::has_placeholders())
            return make_error(errc::unsupported,
                              "this Windows has no placeholder API (VirtualAlloc2, "
                              "MapViewOfFile3, UnmapViewOfFile2: Windows 10 1803 or later)");
        const std::uint64_t align = std::max(
            {default_alignment(size), min_alignment, os::windows_abi::allocation_granularity});
        const auto usable = checked_align_up(size, page_size);
        // Every reservation is 64 KiB aligned already; more needs room to slide.
        const std::uint64_t slack =
            align > os::windows_abi::allocation_granularity ? align : std::uint64_t{0};
        const auto total = usable ? checked_add(*usable, slack) : std::nullopt;
        if (!total || *total > static_cast<std::uint64_t>(SIZE_MAX))
            return make_error(errc::invalid_argument,
                              "guest address space of " + MemoryRange::hex(size) +
                                  " bytes overflows with alignment " + MemoryRange::hex(align));
        void* p = Sys::virtual_alloc2(nullptr, static_cast<SIZE_T>(*total),
                                      MEM_RESERVE | os::windows_abi::mem_reserve_placeholder,
                                      PAGE_NOACCESS);
        if (p == nullptr)
            return os::last_error([&] {
                return "failed to reserve " + MemoryRange::hex(*total) +
                       " bytes of address space (a placeholder) for guest memory";
            });
        auto* raw = static_cast<std::byte*>(p);
        const auto raw_addr = reinterpret_cast<std::uintptr_t>(raw);
        const std::uint64_t head = ((raw_addr + (align - 1)) & ~(align - 1)) - raw_addr;
        std::byte* aligned = raw + head;
        if (auto r = trim(raw, head, *usable, *total); !r) {
            release_all(raw, *total);
            return std::move(r).error();
        }
        return WindowsPlaceholder(aligned, *usable);
    }

    WindowsPlaceholder(WindowsPlaceholder&& other) noexcept
        : base_(std::exchange(other.base_, nullptr)), size_(std::exchange(other.size_, 0)),
          state_(std::move(other.state_))
    {}
    WindowsPlaceholder& operator=(WindowsPlaceholder&& other) noexcept
    {
        if (this != &other) {
            release();
            base_ = std::exchange(other.base_, nullptr);
            size_ = std::exchange(other.size_, 0);
            state_ = std::move(other.state_);
        }
        return *this;
    }
    WindowsPlaceholder(const WindowsPlaceholder&) = delete;
    WindowsPlaceholder& operator=(const WindowsPlaceholder&) = delete;
    ~WindowsPlaceholder() { release(); }

    [[nodiscard]] std::byte* base() const noexcept { return base_; }
    /// The usable size: what reserve() was asked for, rounded up to a page.
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    /// The reserved size (the same: Windows needs no huge-page tail).
    [[nodiscard]] std::uint64_t reserved_size() const noexcept { return size_; }

    Result<void> map_file(std::uint64_t off, std::uint64_t len, const Mappable& object,
                          std::uint64_t file_offset, bool writable)
    {
        MEMBACKING_TRY(detail::check_map_file(off, len, object, file_offset, size_));
        return transaction([&](detail::UndoLog& undo) {
            return replace(off, off + len,
                           Piece{off, off + len, object, file_offset, writable, writable}, undo);
        });
    }

    /// Zero-filled private memory, read-write.
    Result<void> commit_private(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        return transaction([&](detail::UndoLog& undo) {
            return replace(off, off + len, Piece{off, off + len, {}, 0, true, true}, undo);
        });
    }

    /// Back to reserved and inaccessible (a placeholder); private pages are released.
    Result<void> unmap(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        return transaction(
            [&](detail::UndoLog& undo) { return replace(off, off + len, std::nullopt, undo); });
    }

    Result<void> protect(std::uint64_t off, std::uint64_t len, bool writable)
    {
        MEMBACKING_TRY(check(off, len));
        const std::uint64_t end = off + len;
        return transaction([&](detail::UndoLog& undo) -> Result<void> {
            // Wholly mapped first: nothing changes if it is not.
            std::uint64_t cursor = off;
            for (const Piece* p : overlapping(off, end)) {
                if (p->offset > cursor)
                    break;
                cursor = p->end;
            }
            if (cursor < end)
                return make_error(errc::unmapped, "cannot change the protection of " +
                                                      describe(off, len) +
                                                      ": it is not wholly mapped");
            std::vector<std::pair<Piece, bool>> parts; // the part; whether it is a whole piece
            for (const Piece* p : overlapping(off, end))
                if (p->writable != writable)
                    parts.emplace_back(p->slice(std::max(off, p->offset), std::min(end, p->end)),
                                       off <= p->offset && p->end <= end);
            for (auto& [part, whole] : parts) {
                part.writable = writable;
                if (part.is_private() || (whole && (part.mapped_writable || !writable))) {
                    // In place: no moment without memory.
                    MEMBACKING_TRY(protect_in_place(part, undo));
                } else {
                    // Part of a view, or more than it was mapped with: map it again.
                    part.mapped_writable = writable;
                    MEMBACKING_TRY(replace(part.offset, part.end, part, undo));
                }
            }
            return {};
        });
    }

    Result<void> advise_hugepages(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        return make_error(errc::unsupported,
                          "Windows has no transparent huge pages (" + describe(off, len) + ")");
    }

    Result<void> bind_numa(std::uint64_t off, std::uint64_t len, std::uint32_t node)
    {
        MEMBACKING_TRY(check(off, len));
        return make_error(errc::unsupported, "binding " + describe(off, len) + " to NUMA node " +
                                                 std::to_string(node) +
                                                 " after mapping it is not possible on Windows");
    }

    Result<void> set_name(std::uint64_t off, std::uint64_t len, const char* /*name*/)
    {
        MEMBACKING_TRY(check(off, len));
        return make_error(errc::unsupported, "Windows cannot name address space");
    }

    /// The section's size now (its maximum size, NtQuerySection): what a view of it may reach.
    [[nodiscard]] static Result<std::uint64_t> object_size(const Mappable& object)
    {
        if (object.empty())
            return make_error(errc::invalid_argument, "no object to take the size of");
        std::uint64_t size = 0;
        if (!Sys::query_section_size(object.native_handle(), &size))
            return os::last_error(
                [] { return std::string("failed to query the size of a mapped section"); });
        return size;
    }

    /// A pagefile-backed section of `size` bytes. Windows sections are nameless here: a named one
    /// would be a global object another process could open.
    [[nodiscard]] static Result<Mappable> create_shared_memory(std::uint64_t size, const char* name)
    {
        if (size == 0)
            return make_error(errc::invalid_argument,
                              "shared memory '" + std::string(name) + "' of 0 bytes");
        HANDLE h = Sys::create_pagefile_section(size, PAGE_READWRITE);
        if (h == nullptr)
            return os::last_error([&] {
                return "failed to create a pagefile-backed section for shared memory '" +
                       std::string(name) + "' of " + MemoryRange::hex(size) + " bytes";
            });
        return Mappable::adopt(h);
    }

    [[nodiscard]] static Result<Mappable>
    create_hugetlb_memory(std::uint64_t size, const char* name, std::uint64_t page_bytes)
    {
        return make_error(errc::unsupported,
                          "large-page memory '" + std::string(name) + "' (" +
                              MemoryRange::hex(size) + " bytes in pages of " +
                              MemoryRange::hex(page_bytes) +
                              ") needs SeLockMemoryPrivilege; this policy does not offer it");
    }

    /// The books: every mapped piece in address order (tests and dumps).
    [[nodiscard]] std::vector<Piece> pieces() const
    {
        std::lock_guard lock(state_->mutex);
        std::vector<Piece> out;
        for (const auto& [start, p] : state_->pieces)
            out.push_back(p);
        return out;
    }

private:
    struct PieceRange {
        MemoryRange operator()(const Piece& p) const
        {
            return MemoryRange::valid_or_abort(p.offset, p.end);
        }
    };
    using Books = detail::IntervalMap<Piece, PieceRange>;

    /// The part of a piece that `part` covers (the slicer IntervalMap::punch takes).
    static Piece slice_of(const Piece& p, const MemoryRange& part)
    {
        return p.slice(part.start(), part.end());
    }

    struct State {
        std::mutex mutex;
        Books pieces; ///< by offset; disjoint; the gaps between them are one placeholder each
    };

    WindowsPlaceholder(std::byte* base, std::uint64_t size)
        : base_(base), size_(size), state_(std::make_unique<State>())
    {}

    static constexpr ULONG split_flags = MEM_RELEASE | os::windows_abi::mem_preserve_placeholder;
    static constexpr ULONG coalesce_flags =
        MEM_RELEASE | os::windows_abi::mem_coalesce_placeholders;

    static DWORD protection(bool writable) noexcept
    {
        return writable ? PAGE_READWRITE : PAGE_READONLY;
    }

    void* at(std::uint64_t off) const noexcept { return base_ + off; }

    static std::string describe(std::uint64_t off, std::uint64_t len)
    {
        return detail::describe_va_range(off, len);
    }

    Result<void> check(std::uint64_t off, std::uint64_t len) const
    {
        return detail::check_va_range(off, len, size_);
    }

    /// Runs `op` under the lock with an undo log; on failure rolls the address space back and
    /// restores the books.
    template <class Op>
    Result<void> transaction(Op&& op)
    {
        std::lock_guard lock(state_->mutex);
        Books saved = state_->pieces;
        detail::UndoLog undo;
        Result<void> r = op(undo);
        if (r) {
            undo.commit();
            return r;
        }
        undo.rollback();
        state_->pieces = std::move(saved);
        return r;
    }

    // ---- the books ----

    /// The pieces that overlap [off, end), in address order.
    std::vector<const Piece*> overlapping(std::uint64_t off, std::uint64_t end) const
    {
        std::vector<const Piece*> out;
        state_->pieces.for_each_overlapping(MemoryRange::valid_or_abort(off, end),
                                            [&](const Piece& p) { out.push_back(&p); });
        return out;
    }

    /// The gap (one placeholder) that holds `off`, which no piece covers.
    std::pair<std::uint64_t, std::uint64_t> gap_at(std::uint64_t off) const
    {
        const std::optional<MemoryRange> gap =
            state_->pieces.gap_around(off, MemoryRange::valid_or_abort(0, size_));
        MEMBACKING_CHECK(gap.has_value(), "placeholder books: the offset is not in a gap");
        return {gap->start(), gap->end()};
    }

    // ---- steps: one Win32 call each, pushing its inverse ----

    /// Splits the placeholder [start, end) at `at`.
    Result<void> split(std::uint64_t start, std::uint64_t at, std::uint64_t end,
                       detail::UndoLog& undo)
    {
        if (!Sys::virtual_free(this->at(start), static_cast<SIZE_T>(at - start), split_flags))
            return os::last_error([&] {
                return "failed to split the placeholder " + describe(start, end - start) + " at " +
                       MemoryRange::hex(at);
            });
        undo.push([this, start, end]() -> Result<void> {
            return raw_coalesce(start, end, "re-joining a split placeholder");
        });
        return {};
    }

    /// Coalesces the placeholders that tile [start, end), whose inner boundaries are `cuts`.
    Result<void> coalesce(std::uint64_t start, std::uint64_t end, std::vector<std::uint64_t> cuts,
                          detail::UndoLog& undo)
    {
        MEMBACKING_TRY(raw_coalesce(start, end, "failed to coalesce the placeholders of"));
        undo.push([this, start, end, cuts = std::move(cuts)]() -> Result<void> {
            std::uint64_t from = start;
            for (std::uint64_t cut : cuts) {
                if (!Sys::virtual_free(at(from), static_cast<SIZE_T>(cut - from), split_flags))
                    return os::last_error([&] {
                        return "failed to split the placeholder at " + MemoryRange::hex(cut) +
                               " again";
                    });
                from = cut;
            }
            return {};
        });
        return {};
    }

    Result<void> raw_coalesce(std::uint64_t start, std::uint64_t end, const char* what)
    {
        if (!Sys::virtual_free(at(start), static_cast<SIZE_T>(end - start), coalesce_flags))
            return os::last_error(
                [&] { return std::string(what) + " " + describe(start, end - start); });
        return {};
    }

    /// Replaces the placeholder that is exactly [p.offset, p.end) with p.
    Result<void> place(const Piece& p, detail::UndoLog& undo)
    {
        MEMBACKING_TRY(raw_place(p, "failed to"));
        undo.push([this, p]() -> Result<void> { return raw_remove(p, "failed to undo:"); });
        state_->pieces.insert(p);
        return {};
    }

    /// Turns p (exactly one piece) back into a placeholder of its size.
    Result<void> remove(const Piece& p, detail::UndoLog& undo)
    {
        MEMBACKING_TRY(raw_remove(p, "failed to"));
        // A view comes back whole from its section; private memory comes back zero-filled.
        undo.push([this, p]() -> Result<void> { return raw_place(p, "failed to undo:"); });
        state_->pieces.erase(p.offset);
        return {};
    }

    Result<void> raw_place(const Piece& p, const char* what)
    {
        void* want = at(p.offset);
        void* got = nullptr;
        if (p.is_private())
            got = Sys::virtual_alloc2(want, static_cast<SIZE_T>(p.size()),
                                      MEM_RESERVE | MEM_COMMIT |
                                          os::windows_abi::mem_replace_placeholder,
                                      protection(p.writable));
        else
            got = Sys::map_view_of_file3(p.object.native_handle(), want, p.file_offset,
                                         static_cast<SIZE_T>(p.size()),
                                         os::windows_abi::mem_replace_placeholder,
                                         protection(p.mapped_writable || p.writable));
        if (got == nullptr)
            return os::last_error([&] {
                return std::string(what) +
                       (p.is_private()
                            ? " commit private memory at "
                            : " map section offset " + MemoryRange::hex(p.file_offset) + " at ") +
                       describe(p.offset, p.size());
            });
        MEMBACKING_CHECK(got == want, "a placeholder was replaced at another address");
        if (!p.is_private() && p.mapped_writable && !p.writable) {
            // A view mapped writable and protected read-only since (undo and re-maps of its
            // parts bring it back that way, so a later protect stays in place).
            DWORD old = 0;
            if (!Sys::virtual_protect(want, static_cast<SIZE_T>(p.size()), PAGE_READONLY, &old)) {
                Error e = os::last_error([&] {
                    return std::string(what) + " protect the view at " +
                           describe(p.offset, p.size());
                });
                if (!Sys::unmap_view_of_file2(want, os::windows_abi::mem_preserve_placeholder))
                    detail::fatal("could not unmap a view whose protection failed");
                return e;
            }
        }
        return {};
    }

    Result<void> raw_remove(const Piece& p, const char* what)
    {
        const BOOL ok =
            p.is_private()
                ? Sys::virtual_free(at(p.offset), static_cast<SIZE_T>(p.size()), split_flags)
                : Sys::unmap_view_of_file2(at(p.offset), os::windows_abi::mem_preserve_placeholder);
        if (!ok)
            return os::last_error([&] {
                return std::string(what) +
                       (p.is_private() ? " release private memory at " : " unmap the view at ") +
                       describe(p.offset, p.size());
            });
        return {};
    }

    /// VirtualProtect of private memory (any part) or of a whole view within the protection it
    /// was mapped with; the books split around the part.
    Result<void> protect_in_place(const Piece& part, detail::UndoLog& undo)
    {
        DWORD old = 0;
        if (!Sys::virtual_protect(at(part.offset), static_cast<SIZE_T>(part.size()),
                                  protection(part.writable), &old))
            return os::last_error([&] {
                return "failed to change the protection of " + describe(part.offset, part.size());
            });
        undo.push([this, part]() -> Result<void> {
            DWORD ignored = 0;
            if (!Sys::virtual_protect(at(part.offset), static_cast<SIZE_T>(part.size()),
                                      protection(!part.writable), &ignored))
                return os::last_error(
                    [&] { return std::string("failed to restore a protection"); });
            return {};
        });
        state_->pieces.punch(PieceRange{}(part), slice_of);
        state_->pieces.insert(part);
        return {};
    }

    // ---- the operation ----

    /// Makes [off, end) hold `next` (or nothing), keeping the invariant.
    Result<void> replace(std::uint64_t off, std::uint64_t end, const std::optional<Piece>& next,
                         detail::UndoLog& undo)
    {
        auto gap = clear(off, end, undo);
        if (!gap)
            return std::move(gap).error();
        const auto [gap_start, gap_end] = *gap;
        if (!next)
            return {};
        // Carve [off, end) out of its gap, then fill it.
        if (gap_start < off)
            MEMBACKING_TRY(split(gap_start, off, gap_end, undo));
        if (end < gap_end)
            MEMBACKING_TRY(split(off, end, gap_end, undo));
        return place(*next, undo);
    }

    /// Leaves [off, end) unmapped, inside one gap (one placeholder), which it returns.
    Result<std::pair<std::uint64_t, std::uint64_t>> clear(std::uint64_t off, std::uint64_t end,
                                                          detail::UndoLog& undo)
    {
        std::vector<Piece> hit;
        for (const Piece* p : overlapping(off, end))
            hit.push_back(*p);
        if (hit.empty())
            return gap_at(off);

        // Views first: each is unmapped whole; the parts outside [off, end) come back from the
        // same section. These steps can all be undone exactly.
        for (const Piece& p : hit) {
            if (p.is_private())
                continue;
            MEMBACKING_TRY(remove(p, undo));
            std::uint64_t rest = p.offset; // where the placeholder left by the view starts
            if (p.offset < off) {
                MEMBACKING_TRY(split(p.offset, off, p.end, undo));
                MEMBACKING_TRY(place(p.slice(p.offset, off), undo));
                rest = off;
            }
            if (end < p.end) {
                MEMBACKING_TRY(split(rest, end, p.end, undo));
                MEMBACKING_TRY(place(p.slice(end, p.end), undo));
            }
        }
        // Private memory last: releasing it is the one step whose undo loses data.
        for (const Piece& p : hit) {
            if (!p.is_private())
                continue;
            const Piece cut = p.slice(std::max(off, p.offset), std::min(end, p.end));
            MEMBACKING_TRY(remove_private_part(cut, undo));
        }

        // [off, end) and its neighbouring gaps are now placeholders cut at the old piece edges:
        // join them into one.
        const auto [gap_start, gap_end] = gap_at(off);
        std::vector<std::uint64_t> cuts;
        for (const Piece& p : hit)
            for (std::uint64_t edge : {std::max(off, p.offset), std::min(end, p.end)})
                if (edge > gap_start && edge < gap_end && (cuts.empty() || cuts.back() != edge))
                    cuts.push_back(edge);
        if (!cuts.empty())
            MEMBACKING_TRY(coalesce(gap_start, gap_end, std::move(cuts), undo));
        return std::pair{gap_start, gap_end};
    }

    /// Releases `cut`, a part of one private piece, back to a placeholder; the books keep the
    /// rest of that piece.
    Result<void> remove_private_part(const Piece& cut, detail::UndoLog& undo)
    {
        MEMBACKING_TRY(raw_remove(cut, "failed to"));
        undo.push([this, cut]() -> Result<void> { return raw_place(cut, "failed to undo:"); });
        state_->pieces.punch(PieceRange{}(cut), slice_of);
        return {};
    }

    /// Trims an over-sized reservation [raw, raw + total) to [raw + head, raw + head + usable).
    static Result<void> trim(std::byte* raw, std::uint64_t head, std::uint64_t usable,
                             std::uint64_t total)
    {
        if (head > 0) {
            if (!Sys::virtual_free(raw, static_cast<SIZE_T>(head), split_flags))
                return os::last_error(
                    [] { return std::string("failed to split the reservation for alignment"); });
            if (!Sys::virtual_free(raw, 0, MEM_RELEASE))
                return os::last_error([] { return std::string("failed to trim the reservation"); });
        }
        const std::uint64_t tail = total - head - usable;
        if (tail > 0) {
            if (!Sys::virtual_free(raw + head, static_cast<SIZE_T>(usable), split_flags))
                return os::last_error(
                    [] { return std::string("failed to split the reservation for alignment"); });
            if (!Sys::virtual_free(raw + head + usable, 0, MEM_RELEASE))
                return os::last_error([] { return std::string("failed to trim the reservation"); });
        }
        return {};
    }

    /// Frees whatever is left in [p, p + len): views, private memory and placeholders alike.
    /// Walks the address space itself rather than the books, so it also cleans up after a
    /// reservation whose trimming failed.
    static void release_all(std::byte* p, std::uint64_t len) noexcept
    {
        std::byte* cursor = p;
        std::byte* const end = p + len;
        while (cursor < end) {
            MEMORY_BASIC_INFORMATION info{};
            if (Sys::virtual_query(cursor, &info, sizeof(info)) == 0)
                return;
            auto* region_end = static_cast<std::byte*>(info.BaseAddress) + info.RegionSize;
            if (info.State != MEM_FREE) {
                // A failure here leaves address space behind, nothing worse: the pages are ours.
                if (info.Type == MEM_MAPPED)
                    (void)Sys::unmap_view_of_file2(info.AllocationBase, 0);
                else
                    (void)Sys::virtual_free(info.AllocationBase, 0, MEM_RELEASE);
            }
            cursor = region_end;
        }
    }

    void release() noexcept
    {
        if (base_ != nullptr)
            release_all(base_, size_);
        base_ = nullptr;
    }

    std::byte* base_ = nullptr;
    std::uint64_t size_ = 0;
    std::unique_ptr<State> state_;
};

static_assert(detail::check_va_policy<WindowsPlaceholder<>>());

/// A pagefile-backed section of `size` bytes (`name` appears in error messages only): the shared
/// memory a device maps into a device region (DeviceRegion::map), Windows' create_memfd.
/// Zero-filled; write it through a view (MapViewOfFile), or map it and write through the guest.
[[nodiscard]] inline Result<Mappable> create_section(const std::string& name, Length size)
{
    return WindowsPlaceholder<>::create_shared_memory(size.value(), name.c_str());
}

} // namespace membacking

#endif // MEMBACKING_OS_WINDOWS
