/**
 * @file detail/retirable_ref.hpp
 * Internal (namespace membacking::detail); includes detail/ only.
 *
 * RetirableRef: a reference count that many threads take and drop without writing a shared
 * cache line, and that its owner retires once no new reference can be taken. Whoever brings it
 * to "retired and zero" (the retiring owner or the last dropper) is told so exactly once, when
 * nobody else will touch it again, and frees the object. Linux's percpu_ref
 * (lib/percpu-refcount.c) has the same shape: sharded while live, one central count once
 * retired; here the switch needs no grace period, because each shard switches on its own.
 *
 * While live: acquire(shard) increments the shard's counter (detail/thread_shard.hpp gives each
 * thread its own line); release(shard) decrements the same one, so every counter is >= 0 and
 * counts the references taken on it that are still held. The caller guarantees that no acquire()
 * starts after retire() begins (the lease domain retires a window only after a grace period of
 * its own table, in which every lookup that could still find the window has ended).
 *
 * retire() sets the `retired` bit in each shard with one fetch_or, which returns the shard's
 * count at that instant. Every release of that shard is ordered against that fetch_or: one
 * before it was counted out already; one after it sees the bit in the value its own fetch_sub
 * returns, and decrements `central` instead. So the sum S of the counts retire() saw is exactly
 * the references that will go through `central`. retire() adds S + 1 to it (+1: a bias, so that
 * releasers who got there first, taking it below zero, cannot see 1 -> 0 early), then removes
 * the bias. Whoever moves `central` from 1 to 0 is last, and everyone else has finished with
 * the object: a shard release touches nothing after its fetch_sub, a central one nothing after
 * its own.
 *
 * Cost of acquire + release while live: two atomic read-modify-writes of the caller's shard.
 *
 * try_acquire() is for callers that cannot guarantee "no acquire after retire": it increments,
 * and if the value it got back already had the bit, retire() did not count it (its fetch_or on
 * that shard came first), so it undoes its own increment on the shard (never through `central`)
 * and fails. A caller that finds the object through a pointer must still validate that pointer
 * after a successful try_acquire (the lease domain's generations, lease/lease_domain.hpp).
 *
 * recycle() makes a freed RetirableRef live again (the domain reuses its generation slots). Only
 * a try_acquire that is going to fail can still touch a freed one (a reader that loaded the slot
 * before it was retired): recycle() waits for each such transient increment to be undone, which
 * takes two instructions of that reader, never a lease's lifetime.
 */
#pragma once

#include <membacking/detail/thread_shard.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>

namespace membacking::detail {

class RetirableRef {
public:
    RetirableRef() = default;
    RetirableRef(const RetirableRef&) = delete;
    RetirableRef& operator=(const RetirableRef&) = delete;

    /// Takes a reference on `shard`. Never after retire() began (see the file comment).
    void acquire(std::size_t shard) noexcept
    {
        shards_[shard].value.fetch_add(1, std::memory_order_relaxed);
    }

    /// Takes a reference on `shard` unless retire() already reached that shard: false then
    /// (nothing is held). Sequentially consistent, so that a caller can validate the pointer it
    /// found this object through after it (see the file comment).
    [[nodiscard]] bool try_acquire(std::size_t shard) noexcept
    {
        std::atomic<std::uint64_t>& s = shards_[shard].value;
        if ((s.fetch_add(1, std::memory_order_seq_cst) & retired_bit) == 0) [[likely]]
            return true;
        s.fetch_sub(1, std::memory_order_relaxed); // not counted by retire(): undo on the shard
        return false;
    }

    /// Drops a reference taken on `shard`. Returns true if the caller must free the object now:
    /// it dropped the last reference after retirement.
    [[nodiscard]] bool release(std::size_t shard) noexcept
    {
        const std::uint64_t before = shards_[shard].value.fetch_sub(1, std::memory_order_release);
        if ((before & retired_bit) == 0) [[likely]]
            return false;
        return central_.fetch_sub(1, std::memory_order_acq_rel) == 1;
    }

    /// Once: no acquire() may follow. Returns true if the caller must free the object now (no
    /// reference is held); otherwise the last release() returns true. Never waits.
    [[nodiscard]] bool retire() noexcept
    {
        std::int64_t held = 0;
        for (Padded<std::atomic<std::uint64_t>>& s : shards_)
            held += static_cast<std::int64_t>(
                s.value.fetch_or(retired_bit, std::memory_order_acq_rel) & ~retired_bit);
        retired_ = true;
        central_.fetch_add(held + 1, std::memory_order_acq_rel);
        return central_.fetch_sub(1, std::memory_order_acq_rel) == 1;
    }

    /// Makes a RetirableRef that was retired and then freed (retire() or the last release()
    /// returned true) live again, with no reference. Waits only for failing try_acquire()s
    /// still under way (see the file comment). Callers serialise it with retire().
    void recycle() noexcept
    {
        for (Padded<std::atomic<std::uint64_t>>& s : shards_)
            for (std::uint64_t expected = retired_bit;
                 !s.value.compare_exchange_weak(expected, 0, std::memory_order_acq_rel);
                 expected = retired_bit)
                std::this_thread::yield();
        retired_ = false;
    }

    /// References held, while no acquire, release or retire runs (for tests).
    [[nodiscard]] std::int64_t count() const noexcept
    {
        if (retired_)
            return central_.load(std::memory_order_acquire);
        std::int64_t held = 0;
        for (const Padded<std::atomic<std::uint64_t>>& s : shards_)
            held += static_cast<std::int64_t>(s.value.load(std::memory_order_acquire));
        return held;
    }
    /// Whether retire() ran (for tests, from the retiring thread).
    [[nodiscard]] bool retired() const noexcept { return retired_; }

private:
    static constexpr std::uint64_t retired_bit = std::uint64_t{1} << 63;

    std::array<Padded<std::atomic<std::uint64_t>>, shard_count> shards_{};
    std::atomic<std::int64_t> central_{0};
    bool retired_ = false; ///< written and read by the retiring thread only
};

} // namespace membacking::detail
