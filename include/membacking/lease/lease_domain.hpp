/**
 * @file lease/lease_domain.hpp
 * Internal (namespace membacking::detail); layer: lease (includes base/, detail/, lease/). The
 * whole body is Linux-only.
 *
 * LeaseDomain: where leases and probes of one guest look guest ranges up. One per mapping
 * manager; every VA mapper shares it (GuestMemory::lease and ::probe reach it through their
 * mapper), so a lazy mapper's handle leases exactly as the primary's does.
 *
 * The table: an immutable, sorted array of the active pieces (GPA range -> the host address of
 * its first byte in the object's lease window, writable, window), published through an atomic
 * pointer and replaced as a whole on every topology change (publish(), on the control path,
 * under the mapping manager's lock). Readers (take, probe) bracket their lookup with a read-side
 * section (detail/sharded_readers.hpp); publish() waits for the sections that may still use the
 * old table (a lookup: short, never blocking) before freeing it.
 *
 * The windows: one per mappable object in the table (lease/lease_window.hpp), made by the VA
 * policy when the object first becomes leasable (add_window), retired by publish() once the new
 * table no longer references it. Retiring happens after the grace period, so no lookup can take
 * a new reference on a retired window; references already taken keep it mapped until released.
 * Private (anonymous) memory has no object and no window: its pieces are in the table (probe
 * sees them) but a lease of them is refused (errc::unsupported).
 *
 * Fast path of take(): a read-side section (two epoch loads, increment and decrement of the
 * thread's shard), a binary search in the table, one sharded reference per piece; no lock, no
 * allocation up to Lease::inline_pieces pieces, no system call, no write to a line that another
 * thread leasing other memory writes.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/base/units.hpp>
#    include <membacking/detail/sharded_readers.hpp>
#    include <membacking/detail/thread_shard.hpp>
#    include <membacking/lease/lease.hpp>
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

/// One active piece of guest memory, as leases see it.
struct LeasePiece {
    std::uint64_t gpa_start;
    std::uint64_t gpa_end; ///< exclusive
    std::byte* host;       ///< its first byte in the window; nullptr: not leasable (private)
    bool writable;         ///< the guest may write it (and so may a lease)
    LeaseWindow* window;   ///< nullptr: not leasable
};

class LeaseDomain {
public:
    LeaseDomain() = default;
    LeaseDomain(const LeaseDomain&) = delete;
    LeaseDomain& operator=(const LeaseDomain&) = delete;
    /// Retires every window (leases still held keep theirs until released). No lookup can run:
    /// every handle that looks up holds a mapper, and every mapper holds the domain.
    ~LeaseDomain()
    {
        delete table_.load(std::memory_order_relaxed);
        for (const auto& [object, w] : windows_)
            LeaseWindow::retire(w);
    }

    // ---- readers: any thread, lock-free ----

    /// A lease of [gpa, gpa + len). Errors: errc::unmapped naming the first GPA that is not
    /// mapped, errc::read_only naming the first read-only piece of a write lease,
    /// errc::unsupported for private memory or an object the VA policy cannot lease,
    /// errc::invalid_range for an empty or wrapping range, errc::resource_exhausted if a lease of
    /// many pieces cannot get memory for its arrays.
    [[nodiscard]] Result<Lease> take(std::uint64_t gpa, std::uint64_t len, LeaseAccess access)
    {
        if (len == 0 || gpa + len < gpa) [[unlikely]]
            return bad_range(gpa, len);
        Lease lease;
        lease.shard_ = this_thread_shard();
        lease.gpa_ = Gpa(gpa);
        lease.size_ = Length(len);
        lease.access_ = access;
        std::size_t room = Lease::inline_pieces;
        for (;;) {
            Scan s;
            {
                const ShardedReaders::Ticket ticket = readers_.enter(lease.shard_);
                s = scan(table_.load(std::memory_order_seq_cst), gpa, gpa + len, access);
                if (s.failure == Failure::none && s.pieces <= room)
                    fill(lease, s, gpa + len);
                readers_.exit(ticket);
            }
            if (s.failure != Failure::none) [[unlikely]]
                return scan_error(s, gpa, len, access);
            if (s.pieces <= room) [[likely]]
                return lease;
            // More pieces than the lease has room for: make room outside the section, then look
            // again (the table may have changed meanwhile).
            if (!lease.reserve(s.pieces)) [[unlikely]]
                return make_error(errc::resource_exhausted,
                                  "no memory for a lease of " + std::to_string(s.pieces) +
                                      " pieces at " + range_text(gpa, len));
            room = s.pieces;
        }
    }

    /// How much of [gpa, gpa + len) is mapped and writable, from its start. No copy, no
    /// allocation, no lock.
    [[nodiscard]] RangeProbe probe(std::uint64_t gpa, std::uint64_t len) const noexcept
    {
        const std::uint64_t end = gpa + len < gpa ? ~std::uint64_t{0} : gpa + len;
        std::uint64_t mapped = gpa;
        std::uint64_t writable = gpa;
        bool still_writable = true;
        const ShardedReaders::Ticket ticket = readers_.enter(this_thread_shard());
        const Table* t = table_.load(std::memory_order_seq_cst);
        for (const LeasePiece* p = t ? first_at(*t, gpa) : nullptr;
             p != nullptr && p != t->end() && p->gpa_start <= mapped && mapped < end; ++p) {
            mapped = std::min(p->gpa_end, end);
            still_writable = still_writable && p->writable;
            if (still_writable)
                writable = mapped;
        }
        readers_.exit(ticket);
        return {Length(mapped - gpa), Length(writable - gpa)};
    }

    // ---- control path: callers serialise (the mapping manager's lock) ----

    /// The window of the object with this identity, or nullptr.
    [[nodiscard]] LeaseWindow* window(std::uintptr_t object) const
    {
        auto it = windows_.find(object);
        return it == windows_.end() ? nullptr : it->second;
    }

    /// Registers a window the VA policy mapped for an object (it is unmapped when retired and
    /// unreferenced). Windows that the next publish() does not reference are retired there.
    void add_window(std::uintptr_t object, std::byte* base, std::uint64_t size, bool writable,
                    LeaseWindow::Unmap unmap)
    {
        auto owned = std::make_unique<LeaseWindow>(base, size, writable, unmap);
        windows_.emplace(object, owned.get());
        owned.release(); // NOLINT(bugprone-unused-return-value): the registry owns it now
    }

    /// Replaces the table with `pieces` (sorted, disjoint), waits until no lookup uses the old
    /// one, then retires the windows that no piece references any more.
    void publish(std::vector<LeasePiece> pieces)
    {
        auto next = std::make_unique<Table>(std::move(pieces));
        const Table* old = table_.exchange(next.release(), std::memory_order_seq_cst);
        readers_.synchronize();
        delete old;
        const Table& now = *table_.load(std::memory_order_relaxed);
        for (auto it = windows_.begin(); it != windows_.end();) {
            LeaseWindow* w = it->second;
            const bool used = std::any_of(now.begin(), now.end(),
                                          [w](const LeasePiece& p) { return p.window == w; });
            if (used) {
                ++it;
                continue;
            }
            it = windows_.erase(it);
            LeaseWindow::retire(w);
        }
    }

    /// Windows mapped and not yet retired (for tests).
    [[nodiscard]] std::size_t window_count() const noexcept { return windows_.size(); }

private:
    /// The published table: immutable once published.
    class Table {
    public:
        explicit Table(std::vector<LeasePiece> p) : pieces_(std::move(p)) {}
        [[nodiscard]] const LeasePiece* begin() const noexcept { return pieces_.data(); }
        [[nodiscard]] const LeasePiece* end() const noexcept
        {
            return pieces_.data() + pieces_.size();
        }

    private:
        std::vector<LeasePiece> pieces_;
    };

    enum class Failure : std::uint8_t { none, unmapped, read_only, unsupported };

    /// What a lookup found: the first piece and how many merged pieces, or why it failed.
    struct Scan {
        const LeasePiece* first = nullptr;
        std::size_t pieces = 0;
        Failure failure = Failure::none;
        std::uint64_t at = 0; ///< the failing GPA
        std::uint64_t piece_start = 0;
        std::uint64_t piece_end = 0;
    };

    /// The piece containing gpa, or the first one after it, or end (pieces are disjoint and
    /// sorted, so the one containing gpa is the last that starts at or before it).
    static const LeasePiece* first_at(const Table& t, std::uint64_t gpa) noexcept
    {
        const LeasePiece* p =
            std::upper_bound(t.begin(), t.end(), gpa, [](std::uint64_t g, const LeasePiece& piece) {
                return g < piece.gpa_start;
            });
        if (p != t.begin() && (p - 1)->gpa_end > gpa)
            return p - 1;
        return p;
    }

    /// Whether b continues a in host memory too (same window, adjacent bytes): one iovec.
    static bool continues(const LeasePiece& a, const LeasePiece& b) noexcept
    {
        return a.window == b.window && a.host + (a.gpa_end - a.gpa_start) == b.host;
    }

    static Scan scan(const Table* t, std::uint64_t gpa, std::uint64_t end,
                     LeaseAccess access) noexcept
    {
        Scan s;
        const LeasePiece* p = t ? first_at(*t, gpa) : nullptr;
        s.first = p;
        std::uint64_t cursor = gpa;
        const LeasePiece* prev = nullptr;
        for (; cursor < end; ++p) {
            if (p == nullptr || p == t->end() || p->gpa_start > cursor)
                return {nullptr, 0, Failure::unmapped, cursor, 0, 0};
            if (p->window == nullptr)
                return {nullptr, 0, Failure::unsupported, cursor, p->gpa_start, p->gpa_end};
            if (lease_writes(access) && !p->writable)
                return {nullptr, 0, Failure::read_only, cursor, p->gpa_start, p->gpa_end};
            if (prev == nullptr || !continues(*prev, *p))
                ++s.pieces;
            prev = p;
            cursor = p->gpa_end;
        }
        return s;
    }

    /// Takes the references and fills the lease (inside the read-side section).
    static void fill(Lease& lease, const Scan& s, std::uint64_t end) noexcept
    {
        std::uint64_t cursor = lease.gpa_.value();
        std::byte* run = nullptr;
        std::uint64_t run_len = 0;
        LeaseWindow* run_window = nullptr;
        for (const LeasePiece* p = s.first; cursor < end; ++p) {
            std::byte* at = p->host + (cursor - p->gpa_start);
            const std::uint64_t n = std::min(p->gpa_end, end) - cursor;
            if (run != nullptr && run_window == p->window && run + run_len == at) {
                run_len += n;
            } else {
                if (run != nullptr)
                    lease.push(run, run_len, run_window);
                p->window->refs.acquire(lease.shard_);
                run = at;
                run_len = n;
                run_window = p->window;
            }
            cursor += n;
        }
        lease.push(run, run_len, run_window);
    }

    static std::string range_text(std::uint64_t gpa, std::uint64_t len)
    {
        return MemoryRange::hex(gpa) + "+" + MemoryRange::hex(len);
    }

    [[nodiscard]] static Error bad_range(std::uint64_t gpa, std::uint64_t len)
    {
        return make_error(errc::invalid_range,
                          "cannot lease " + range_text(gpa, len) + ": empty or wrapping range");
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

    std::atomic<const Table*> table_{nullptr};
    mutable ShardedReaders readers_;
    std::map<std::uintptr_t, LeaseWindow*> windows_; ///< object identity -> its live window
};

} // namespace membacking::detail

#endif // MEMBACKING_OS_LINUX
