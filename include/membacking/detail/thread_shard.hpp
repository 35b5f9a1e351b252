/**
 * @file detail/thread_shard.hpp
 * Internal (namespace membacking::detail); includes nothing from the library.
 *
 * Which shard of a sharded counter the calling thread uses, and the padded slot such a counter
 * is made of. Sharded counters (detail/retirable_ref.hpp) give each
 * thread its own cache line to write, so that threads working on disjoint data never write one
 * line between them (the lease fast path must scale across threads).
 *
 * Threads get shards round-robin on their first call: the first `shard_count` threads of the
 * process get distinct shards, later ones share (still correct, since every shard is an atomic
 * that any thread may update; only contention grows). A shard is two cache lines: adjacent-line
 * prefetchers (Intel's L2 spatial prefetcher, AMD's up/down prefetcher) fetch lines in pairs, and
 * a neighbour's line dragged along with ours is false sharing all the same.
 */
#pragma once

#include <atomic>
#include <cstddef>

namespace membacking::detail {

/// Shards per sharded counter.
inline constexpr std::size_t shard_count = 64;

/// Bytes per shard: two 64-byte lines (see the file comment).
inline constexpr std::size_t shard_alignment = 128;

/// One shard: a T alone on its own pair of cache lines.
template <class T>
struct alignas(shard_alignment) Padded {
    T value{};
};

/// The calling thread's shard index, in [0, shard_count). Assigned on the thread's first call
/// (one relaxed atomic increment, no allocation, no lock), then a thread-local read.
[[nodiscard]] inline std::size_t this_thread_shard() noexcept
{
    static std::atomic<std::size_t> next{0};
    thread_local const std::size_t mine =
        next.fetch_add(1, std::memory_order_relaxed) % shard_count;
    return mine;
}

} // namespace membacking::detail
