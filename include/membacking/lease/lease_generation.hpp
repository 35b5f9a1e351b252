/**
 * @file lease/lease_generation.hpp
 * Internal (namespace membacking::detail); layer: lease (includes detail/, lease/).
 *
 * What a lease holds on to: the generation of the lease table it was taken from.
 *
 * LeaseTable: an immutable, sorted array of the active pieces of guest memory (GPA range -> the
 * host address of its first byte in its object's lease window), made by the lease domain on
 * every topology change. It holds one reference per piece on the piece's window, so every window
 * it names stays mapped as long as the table lives.
 *
 * LeaseGeneration: a slot that carries one table at a time and a sharded, retirable reference
 * count (detail/retirable_ref.hpp). The domain publishes a table by putting it in an idle slot
 * and storing that slot as current; it retires the previous slot at once (never waits). A
 * reader pins the current slot with one try_acquire() on its own shard and validates that the
 * slot is still current (lease_domain.hpp); a lease keeps that one reference until it is
 * released, so taking and releasing a lease is one atomic read-modify-write each, however many
 * pieces and windows it spans. The thread that drops the last reference of a retired slot (the
 * control path, or the one releasing the last lease of an old table) frees its table, which
 * unmaps the windows nothing else holds, and marks the slot idle for reuse.
 *
 * LeaseGenerations: the slots, owned together. Slots are never freed while the pool lives (a
 * reader may touch a slot it loaded just before that slot was retired and reused: its
 * try_acquire() or the validation then fails). The pool lives while its domain does and while any
 * slot is in use; the last of those frees it, so leases that outlive their domain stay valid.
 */
#pragma once

#include <membacking/detail/retirable_ref.hpp>
#include <membacking/lease/lease_window.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace membacking::detail {

/// One active piece of guest memory, as leases see it.
struct LeasePiece {
    std::uint64_t gpa_start;
    std::uint64_t gpa_end; ///< exclusive
    std::byte* host;       ///< its first byte in the window; nullptr: not leasable (private)
    bool writable;         ///< the guest may write it (and so may a lease)
    LeaseWindow* window;   ///< nullptr: not leasable
};

/// A published table: immutable; keeps its pieces' windows mapped.
class LeaseTable {
public:
    explicit LeaseTable(std::vector<LeasePiece> p) noexcept : pieces_(std::move(p))
    {
        for (const LeasePiece& piece : pieces_)
            if (piece.window != nullptr)
                LeaseWindow::hold(piece.window);
    }
    LeaseTable(const LeaseTable&) = delete;
    LeaseTable& operator=(const LeaseTable&) = delete;
    ~LeaseTable()
    {
        for (const LeasePiece& piece : pieces_)
            if (piece.window != nullptr)
                LeaseWindow::drop(piece.window);
    }
    [[nodiscard]] const LeasePiece* begin() const noexcept { return pieces_.data(); }
    [[nodiscard]] const LeasePiece* end() const noexcept { return pieces_.data() + pieces_.size(); }

private:
    std::vector<LeasePiece> pieces_;
};

class LeaseGenerations;

/// One slot of the pool: a table and the references that pin it (see the file comment).
class LeaseGeneration {
public:
    explicit LeaseGeneration(LeaseGenerations& pool) noexcept : pool_(pool) {}
    LeaseGeneration(const LeaseGeneration&) = delete;
    LeaseGeneration& operator=(const LeaseGeneration&) = delete;

    /// Pins this slot on `shard` if it is not retired there yet; the caller then validates that
    /// the slot is still the current one, and drops the reference if not.
    [[nodiscard]] bool try_pin(std::size_t shard) noexcept { return refs_.try_acquire(shard); }

    /// Drops a reference taken by try_pin on `shard`; the last one after retirement frees the
    /// table and makes the slot idle.
    static void drop(LeaseGeneration* g, std::size_t shard) noexcept
    {
        if (g->refs_.release(shard)) [[unlikely]]
            g->reclaim();
    }

    /// The table; valid while the caller holds a validated pin (or on the control path).
    [[nodiscard]] const LeaseTable& table() const noexcept { return *table_; }

    /// References held (for tests; exact while nothing else runs).
    [[nodiscard]] std::int64_t pins() const noexcept { return refs_.count(); }

private:
    friend class LeaseGenerations;

    inline void reclaim() noexcept;

    RetirableRef refs_;
    std::unique_ptr<const LeaseTable> table_;
    /// No table and no reference: the pool may reuse the slot. Set by reclaim() (release),
    /// cleared by the pool on the control path.
    std::atomic<bool> idle_{false};
    LeaseGenerations& pool_;
};

/// The slots, and who keeps them (see the file comment). Control-path calls are serialised by
/// the domain's caller.
class LeaseGenerations {
public:
    /// A pool with one owner (the domain): released with drop_owner().
    [[nodiscard]] static LeaseGenerations* make() { return new LeaseGenerations; }
    LeaseGenerations(const LeaseGenerations&) = delete;
    LeaseGenerations& operator=(const LeaseGenerations&) = delete;

    /// Control path: a slot that carries `table` and is live (no reference, not retired). Reuses
    /// an idle slot; makes one when every slot is in use.
    [[nodiscard]] LeaseGeneration* activate(std::unique_ptr<const LeaseTable> table)
    {
        LeaseGeneration* g = nullptr;
        for (const auto& s : slots_)
            if (s->idle_.load(std::memory_order_acquire)) {
                g = s.get();
                g->refs_.recycle();
                g->idle_.store(false, std::memory_order_relaxed);
                break;
            }
        if (g == nullptr)
            g = slots_.emplace_back(std::make_unique<LeaseGeneration>(*this)).get();
        g->table_ = std::move(table);
        users_.fetch_add(1, std::memory_order_relaxed);
        return g;
    }

    /// Control path: no new pin may succeed on g any more (the caller made another slot current
    /// first). Frees its table now if nothing pins it, else the last drop does. Never waits.
    static void retire(LeaseGeneration* g) noexcept
    {
        if (g->refs_.retire())
            g->reclaim();
    }

    /// The owner lets go; the pool goes when no slot is in use either.
    void drop_owner() noexcept { drop_user(); }

    /// Slots made so far (for tests: stays small when nothing holds old tables).
    [[nodiscard]] std::size_t slots() const noexcept { return slots_.size(); }

private:
    friend class LeaseGeneration;
    LeaseGenerations() = default;

    void drop_user() noexcept
    {
        if (users_.fetch_sub(1, std::memory_order_acq_rel) == 1)
            delete this;
    }

    std::vector<std::unique_ptr<LeaseGeneration>> slots_;
    std::atomic<std::size_t> users_{1}; ///< the owner, plus every slot that is not idle
};

void LeaseGeneration::reclaim() noexcept
{
    table_.reset();
    LeaseGenerations& pool = pool_;
    idle_.store(true, std::memory_order_release); // the control path may reuse it from here on
    pool.drop_user();
}

} // namespace membacking::detail
