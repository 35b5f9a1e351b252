/**
 * @file lease/lease_domain.hpp
 * Internal (namespace membacking::detail); layer: lease (includes base/, detail/, lease/). The
 * whole body is Linux-only.
 *
 * LeaseDomain: where leases and probes of one guest look guest ranges up. One per mapping
 * manager; every VA mapper shares it (GuestMemory::lease and ::probe reach it through their
 * mapper), so a lazy mapper's handle leases exactly as the primary's does.
 *
 * The table: an immutable, sorted array of the active pieces (lease/lease_generation.hpp),
 * replaced as a whole on every topology change (publish(), on the control path, under the
 * mapping manager's lock). publish() puts the new table in a generation slot, makes that slot
 * current (an atomic pointer) and retires the previous one at once: it never waits, neither for
 * leases nor for lookups under way.
 *
 * Readers (take, probe) pin the current generation: one try_pin() (an atomic increment of the
 * thread's own shard of the slot's count), then a second load of the current pointer. If the
 * slot is still current, the pin was counted before any retirement of it (both are sequentially
 * consistent: the reader increments, then loads the pointer; the writer stores the pointer, then
 * retires, which reads every shard; at least one sees the other), so the table stays alive while
 * the pin is held. Otherwise the reader drops the pin and retries with the new slot. A lease
 * keeps its pin (the lease's only reference) until it is released; a probe drops it at once.
 *
 * The windows: one per mappable object in the table (lease/lease_window.hpp), made by the VA
 * policy when the object first becomes leasable (add_window). The registry holds one reference
 * while the object is in the current table, every table one per piece; publish() drops the
 * registry's reference of the windows the new table no longer names, so a window is unmapped
 * once no current or pinned table names it.
 * Private (anonymous) memory has no object and no window: its pieces are in the table (probe
 * sees them) but a lease of them is refused (errc::unsupported).
 *
 * Fast path of take(): the thread's shard index (a thread-local), the pin (one atomic increment,
 * two loads of the current pointer), a binary search in the table, and one pass over the pieces
 * that checks the range and writes the lease's iovecs; release is one atomic decrement. No
 * lock, no allocation up to Lease::inline_pieces pieces, no system call, no write to a line that
 * another thread leasing other memory writes.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/base/units.hpp>
#    include <membacking/detail/thread_shard.hpp>
#    include <membacking/lease/lease.hpp>
#    include <membacking/lease/lease_generation.hpp>
#    include <membacking/lease/lease_window.hpp>

#    include <algorithm>
#    include <atomic>
#    include <cstddef>
#    include <cstdint>
#    include <map>
#    include <memory>
#    include <string>
#    include <utility>
#    include <vector>

namespace membacking::detail {

class LeaseDomain {
public:
    /// A domain whose table is empty.
    LeaseDomain() : generations_(LeaseGenerations::make())
    {
        current_.store(
            generations_->activate(std::make_unique<const LeaseTable>(std::vector<LeasePiece>{})),
            std::memory_order_relaxed);
    }
    LeaseDomain(const LeaseDomain&) = delete;
    LeaseDomain& operator=(const LeaseDomain&) = delete;
    /// Retires the current table and lets go of the windows (leases still held keep theirs, and
    /// the generations they pin, until released). No lookup can run: every handle that looks up
    /// holds a mapper, and every mapper holds the domain.
    ~LeaseDomain()
    {
        LeaseGenerations::retire(current_.load(std::memory_order_relaxed));
        for (const auto& [object, w] : windows_)
            LeaseWindow::drop(w);
        generations_->drop_owner();
    }

    // ---- readers: any thread, lock-free ----

    /// A lease of [gpa, gpa + len). Errors: errc::unmapped naming the first GPA that is not
    /// mapped, errc::read_only naming the first read-only piece of a write lease,
    /// errc::unsupported for private memory or an object the VA policy cannot lease,
    /// errc::invalid_range for an empty or wrapping range, errc::resource_exhausted if a lease of
    /// many pieces cannot get memory for its arrays.
    [[nodiscard]] Result<Lease> take(std::uint64_t gpa, std::uint64_t len, LeaseAccess access)
    {
        // Built in place and returned by name from every path, so the lease is never moved.
        Result<Lease> out(std::in_place);
        Lease& lease = *out;
        const std::size_t shard = this_thread_shard();
        if (gpa + len > gpa) [[likely]] { // neither empty nor wrapping
            LeaseGeneration* g = pin(shard);
            const Scan s = fill(lease, g->table(), gpa, gpa + len, access, Lease::inline_pieces);
            if (s.failure == Failure::none && s.pieces <= Lease::inline_pieces) [[likely]] {
                lease.generation_ = g;
                lease.shard_ = shard;
                lease.gpa_ = Gpa(gpa);
                lease.size_ = Length(len);
                lease.access_ = access;
                return out;
            }
            LeaseGeneration::drop(g, shard);
        }
        take_slow(out, shard, gpa, len, access);
        return out;
    }
    /// How much of [gpa, gpa + len) is mapped and writable, from its start. No copy, no
    /// allocation, no lock.
    [[nodiscard]] RangeProbe probe(std::uint64_t gpa, std::uint64_t len) const noexcept
    {
        const std::uint64_t end = gpa + len < gpa ? ~std::uint64_t{0} : gpa + len;
        std::uint64_t mapped = gpa;
        std::uint64_t writable = gpa;
        bool still_writable = true;
        const std::size_t shard = this_thread_shard();
        LeaseGeneration* g = pin(shard);
        const LeaseTable& t = g->table();
        for (const LeasePiece* p = first_at(t, gpa);
             p != t.end() && p->gpa_start <= mapped && mapped < end; ++p) {
            mapped = std::min(p->gpa_end, end);
            still_writable = still_writable && p->writable;
            if (still_writable)
                writable = mapped;
        }
        LeaseGeneration::drop(g, shard);
        return {Length(mapped - gpa), Length(writable - gpa)};
    }

    // ---- control path: callers serialise (the mapping manager's lock) ----

    /// The window of the object with this identity, or nullptr.
    [[nodiscard]] LeaseWindow* window(std::uintptr_t object) const
    {
        auto it = windows_.find(object);
        return it == windows_.end() ? nullptr : it->second;
    }

    /// Registers a window the VA policy mapped for an object (it is unmapped when no current
    /// or pinned table names it). Windows that the next publish() does not name leave the
    /// registry there.
    void add_window(std::uintptr_t object, std::byte* base, std::uint64_t size, bool writable,
                    LeaseWindow::Unmap unmap)
    {
        auto owned = std::make_unique<LeaseWindow>(base, size, writable, unmap);
        windows_.emplace(object, owned.get());
        owned.release(); // NOLINT(bugprone-unused-return-value): the registry owns it now
    }

    /// Makes `pieces` (sorted, disjoint) the current table and retires the previous one (freed
    /// when its last pin goes; never waits). Then lets go of the windows no piece names.
    void publish(std::vector<LeasePiece> pieces)
    {
        LeaseGeneration* next =
            generations_->activate(std::make_unique<const LeaseTable>(std::move(pieces)));
        LeaseGeneration* old = current_.exchange(next, std::memory_order_seq_cst);
        LeaseGenerations::retire(old);
        const LeaseTable& now = next->table();
        for (auto it = windows_.begin(); it != windows_.end();) {
            LeaseWindow* w = it->second;
            const bool used = std::any_of(now.begin(), now.end(),
                                          [w](const LeasePiece& p) { return p.window == w; });
            if (used) {
                ++it;
                continue;
            }
            it = windows_.erase(it);
            LeaseWindow::drop(w);
        }
    }

    /// Windows in the registry (for tests).
    [[nodiscard]] std::size_t window_count() const noexcept { return windows_.size(); }
    /// Generation slots made so far (for tests).
    [[nodiscard]] std::size_t generation_slots() const noexcept { return generations_->slots(); }

private:
    enum class Failure : std::uint8_t { none, unmapped, read_only, unsupported };

    /// What a lookup found: how many pieces the lease needs, or why it failed.
    struct Scan {
        std::size_t pieces = 0;
        Failure failure = Failure::none;
        std::uint64_t at = 0; ///< the failing GPA
        std::uint64_t piece_start = 0;
        std::uint64_t piece_end = 0;
    };

    /// take() when the fast path did not make it: a bad range, a lookup that failed, or a lease
    /// of more pieces than Lease::inline_pieces (room is made unpinned, then the table is looked
    /// up again, since it may have changed meanwhile). Out of line, so that the fast path's code
    /// stays small.
    MEMBACKING_NOINLINE MEMBACKING_COLD void take_slow(Result<Lease>& out, std::size_t shard,
                                                       std::uint64_t gpa, std::uint64_t len,
                                                       LeaseAccess access)
    {
        if (len == 0 || gpa + len < gpa) {
            out = make_error(errc::invalid_range,
                             "cannot lease " + range_text(gpa, len) + ": empty or wrapping range");
            return;
        }
        Lease& lease = *out;
        std::size_t room = Lease::inline_pieces;
        for (;;) {
            LeaseGeneration* g = pin(shard);
            const Scan s = fill(lease, g->table(), gpa, gpa + len, access, room);
            if (s.failure == Failure::none && s.pieces <= room) {
                lease.generation_ = g;
                lease.shard_ = shard;
                lease.gpa_ = Gpa(gpa);
                lease.size_ = Length(len);
                lease.access_ = access;
                return;
            }
            LeaseGeneration::drop(g, shard);
            if (s.failure != Failure::none) {
                out = scan_error(s, gpa, len, access);
                return;
            }
            if (!lease.reserve(s.pieces)) {
                out = make_error(errc::resource_exhausted,
                                 "no memory for a lease of " + std::to_string(s.pieces) +
                                     " pieces at " + range_text(gpa, len));
                return;
            }
            room = s.pieces;
        }
    }

    /// Pins the current generation on `shard` (see the file comment). Lock-free: it retries
    /// only when a publish() made another slot current in between.
    [[nodiscard]] MEMBACKING_ALWAYS_INLINE LeaseGeneration* pin(std::size_t shard) const noexcept
    {
        for (;;) {
            LeaseGeneration* g = current_.load(std::memory_order_seq_cst);
            if (g->try_pin(shard)) [[likely]] {
                if (current_.load(std::memory_order_seq_cst) == g) [[likely]]
                    return g;
                LeaseGeneration::drop(g, shard);
            }
        }
    }

    /// The piece containing gpa, or the first one after it, or end (pieces are disjoint and
    /// sorted, so the one containing gpa is the last that starts at or before it).
    MEMBACKING_ALWAYS_INLINE static const LeasePiece* first_at(const LeaseTable& t,
                                                               std::uint64_t gpa) noexcept
    {
        const LeasePiece* p =
            std::upper_bound(t.begin(), t.end(), gpa, [](std::uint64_t g, const LeasePiece& piece) {
                return g < piece.gpa_start;
            });
        if (p != t.begin() && (p - 1)->gpa_end > gpa)
            return p - 1;
        return p;
    }

    /// One pass over the pieces of [gpa, end): checks them, and writes the merged runs (one per
    /// stretch contiguous in one window) into the lease's first `room` slots. The lease's count
    /// is set only when they all fit.
    MEMBACKING_ALWAYS_INLINE static Scan fill(Lease& lease, const LeaseTable& t, std::uint64_t gpa,
                                              std::uint64_t end, LeaseAccess access,
                                              std::size_t room) noexcept
    {
        iovec* iov = lease.iovs_ptr();
        std::span<std::byte>* spans = lease.spans_ptr();
        std::size_t pieces = 0;
        const std::byte* run_end = nullptr;
        const LeaseWindow* run_window = nullptr;
        std::uint64_t cursor = gpa;
        const LeasePiece* p = first_at(t, gpa);
        do {
            if (p == t.end() || p->gpa_start > cursor) [[unlikely]]
                return {0, Failure::unmapped, cursor, 0, 0};
            if (p->window == nullptr) [[unlikely]]
                return {0, Failure::unsupported, cursor, p->gpa_start, p->gpa_end};
            if (lease_writes(access) && !p->writable) [[unlikely]]
                return {0, Failure::read_only, cursor, p->gpa_start, p->gpa_end};
            std::byte* at = p->host + (cursor - p->gpa_start);
            const std::uint64_t n = std::min(p->gpa_end, end) - cursor;
            if (at == run_end && p->window == run_window) {
                if (pieces <= room) {
                    iov[pieces - 1].iov_len += n;
                    spans[pieces - 1] = {spans[pieces - 1].data(), iov[pieces - 1].iov_len};
                }
            } else {
                if (pieces < room) {
                    iov[pieces] = {at, n};
                    spans[pieces] = {at, n};
                }
                ++pieces;
                run_window = p->window;
            }
            run_end = at + n;
            cursor += n;
            ++p;
        } while (cursor < end);
        if (pieces <= room)
            lease.count_ = pieces;
        return {pieces, Failure::none, 0, 0, 0};
    }

    static std::string range_text(std::uint64_t gpa, std::uint64_t len)
    {
        return MemoryRange::hex(gpa) + "+" + MemoryRange::hex(len);
    }

    [[nodiscard]] static Error scan_error(const Scan& s, std::uint64_t gpa, std::uint64_t len,
                                          LeaseAccess access)
    {
        const std::string what = "cannot lease " + range_text(gpa, len) + ": ";
        switch (s.failure) {
        case Failure::unmapped:
            return make_error(errc::unmapped,
                              what + "GPA " + MemoryRange::hex(s.at) + " is not mapped");
        case Failure::read_only:
            return make_error(errc::read_only,
                              what + (access == LeaseAccess::write ? "a write" : "a read_write") +
                                  " lease of read-only memory at " +
                                  MemoryRange::hex(s.piece_start) + "-" +
                                  MemoryRange::hex(s.piece_end - 1));
        case Failure::unsupported:
        case Failure::none: break;
        }
        return make_error(errc::unsupported,
                          what + "memory at " + MemoryRange::hex(s.piece_start) + "-" +
                              MemoryRange::hex(s.piece_end - 1) +
                              " has no object to lease (private memory, or a VA policy without "
                              "lease windows)");
    }

    LeaseGenerations* const generations_; ///< shared with the generations leases pin
    std::atomic<LeaseGeneration*> current_{nullptr};
    std::map<std::uintptr_t, LeaseWindow*> windows_; ///< object identity -> its live window
};

} // namespace membacking::detail

#endif // MEMBACKING_OS_LINUX
