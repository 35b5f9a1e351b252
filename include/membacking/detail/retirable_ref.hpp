/**
 * @file detail/retirable_ref.hpp
 * Internal (namespace membacking::detail); includes detail/ only.
 *
 * RetirableRef: a reference count that many threads take and drop without writing a shared
 * cache line, and that its owner retires once no new reference can be taken. Whoever brings it
 * to "retired and zero" (the retiring owner or the last dropper) is told so exactly once, after
 * every other thread has stopped touching it, and frees the object. This is Linux's percpu_ref
 * (lib/percpu-refcount.c): sharded while live, one central count once retired, a grace period
 * between the two.
 *
 * While live: acquire(shard) increments the shard's counter (detail/thread_shard.hpp gives each
 * thread its own line); release(shard) decrements the same one, inside a read-side section
 * (detail/sharded_readers.hpp) in which it first checks `retired`. The caller guarantees that no
 * acquire() starts after retire() begins (the lease domain retires a window only after a grace
 * period of its own table, in which every lookup that could still find the window has ended).
 *
 * retire(): sets `retired`, then waits for a grace period: every release that began before saw
 * `retired` false and has finished its shard decrement; every later one sees it true and
 * decrements `central` instead. Then the shards' sum S is final, and retire adds S + 1 to
 * `central` (+1: a bias that keeps it above zero while it is being moved), then removes the
 * bias. Whoever moves `central` from 1 to 0 is last. Before the addition, `central` is at most
 * zero (it only fell), so nobody can see 1 -> 0 early.
 *
 * Freeing: the one who is last may find other releasers still inside their sections (after
 * their decrement, before their exit): it waits for one more grace period, then frees. Writers
 * of the grace period are serialised: the retirer's wait ends before `central` can reach zero.
 *
 * Cost of acquire + release while live: four atomic read-modify-writes of lines the caller's
 * shard owns, and loads of two lines written only at retirement.
 */
#pragma once

#include <membacking/detail/sharded_readers.hpp>
#include <membacking/detail/thread_shard.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace membacking::detail {

class RetirableRef {
public:
    RetirableRef() = default;
    RetirableRef(const RetirableRef&) = delete;
    RetirableRef& operator=(const RetirableRef&) = delete;

    /// Takes a reference on `shard`. Never after retire() began (see the file comment).
    void acquire(std::size_t shard) noexcept
    {
        shards_[shard].value.fetch_add(1, std::memory_order_seq_cst);
    }

    /// Drops a reference taken on `shard`. Returns true if the caller must free the object now:
    /// it dropped the last reference after retirement, and nobody else touches it any more.
    [[nodiscard]] bool release(std::size_t shard) noexcept
    {
        const ShardedReaders::Ticket ticket = sections_.enter(shard);
        if (!retired_.value.load(std::memory_order_seq_cst)) [[likely]] {
            shards_[shard].value.fetch_sub(1, std::memory_order_seq_cst);
            sections_.exit(ticket);
            return false;
        }
        const bool last = central_.fetch_sub(1, std::memory_order_acq_rel) == 1;
        sections_.exit(ticket);
        return last && quiesce();
    }

    /// Once: no acquire() may follow. Returns true if the caller must free the object now (no
    /// reference is held); otherwise the last release() returns true. Waits for a grace period
    /// (bounded by the length of a release: a few instructions, never a block).
    [[nodiscard]] bool retire() noexcept
    {
        retired_.value.store(true, std::memory_order_seq_cst);
        sections_.synchronize();
        std::int64_t held = 0;
        for (const Padded<std::atomic<std::int64_t>>& s : shards_)
            held += s.value.load(std::memory_order_seq_cst);
        central_.fetch_add(held + 1, std::memory_order_acq_rel);
        return central_.fetch_sub(1, std::memory_order_acq_rel) == 1 && quiesce();
    }

    /// References held, while no acquire or release runs (for tests).
    [[nodiscard]] std::int64_t count() const noexcept
    {
        if (retired_.value.load(std::memory_order_seq_cst))
            return central_.load(std::memory_order_seq_cst);
        std::int64_t held = 0;
        for (const Padded<std::atomic<std::int64_t>>& s : shards_)
            held += s.value.load(std::memory_order_seq_cst);
        return held;
    }
    [[nodiscard]] bool retired() const noexcept
    {
        return retired_.value.load(std::memory_order_seq_cst);
    }

private:
    /// Waits until every release section under way has ended; returns true (for chaining).
    bool quiesce() noexcept
    {
        sections_.synchronize();
        return true;
    }

    std::array<Padded<std::atomic<std::int64_t>>, shard_count> shards_{};
    ShardedReaders sections_;
    Padded<std::atomic<bool>> retired_{};
    std::atomic<std::int64_t> central_{0};
};

} // namespace membacking::detail
