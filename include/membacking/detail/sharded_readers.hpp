/**
 * @file detail/sharded_readers.hpp
 * Internal (namespace membacking::detail); includes detail/ only.
 *
 * ShardedReaders: read-side sections and grace periods, for data that readers find through an
 * atomic pointer and a writer replaces (the lease table, mapping/lease_domain.hpp). A reader
 * brackets its use of the pointed-to data with enter()/exit(); a writer stores the new pointer,
 * calls synchronize(), and may then free the old data: every reader that could have loaded the
 * old pointer has left its section.
 *
 * How: every shard (one per thread, detail/thread_shard.hpp) has two counters; an epoch's parity
 * says which one new readers use. enter() reads the epoch, increments its shard's counter of that
 * parity, and reads the epoch again: if a writer flipped it in between, it undoes and retries, so
 * a reader counted under parity p really began while the epoch had parity p. synchronize() flips
 * the epoch and waits until the old parity's counters, summed over all shards, reach zero. Readers
 * arriving after the flip use the other parity, so the wait is for sections already under way:
 * bounded by the length of a section (a table lookup: short, and it never blocks), never by new
 * readers. All the operations that order a reader against a writer are sequentially consistent
 * (the Dekker pattern: the reader increments, then loads the data pointer; the writer stores the
 * pointer, then sums the counters; at least one of them sees the other).
 *
 * The reader's cost: two loads of the epoch (a line that only writers write), one atomic
 * increment and one decrement of its own shard's line. Writers must be serialised by the caller
 * (the mapping manager's lock); readers never block and never wait for writers.
 */
#pragma once

#include <membacking/detail/thread_shard.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>

namespace membacking::detail {

class ShardedReaders {
public:
    /// A reader's ticket: which shard and which counter its exit() decrements.
    struct Ticket {
        std::size_t shard;
        unsigned parity;
    };

    /// A read-side section: enter() now, exit() when it goes.
    class Section {
    public:
        explicit Section(ShardedReaders& readers) noexcept
            : readers_(readers), ticket_(readers.enter(this_thread_shard()))
        {}
        Section(const Section&) = delete;
        Section& operator=(const Section&) = delete;
        ~Section() { readers_.exit(ticket_); }

    private:
        ShardedReaders& readers_;
        Ticket ticket_;
    };

    ShardedReaders() = default;
    ShardedReaders(const ShardedReaders&) = delete;
    ShardedReaders& operator=(const ShardedReaders&) = delete;

    /// Begins a read-side section on `shard`. Lock-free: it retries only when a writer flipped
    /// the epoch between its two reads.
    [[nodiscard]] Ticket enter(std::size_t shard) noexcept
    {
        Counters& c = shards_[shard].value;
        for (;;) {
            const std::uint64_t epoch = epoch_.value.load(std::memory_order_seq_cst);
            const auto parity = static_cast<unsigned>(epoch & 1U);
            c.active[parity].fetch_add(1, std::memory_order_seq_cst);
            if (epoch_.value.load(std::memory_order_seq_cst) == epoch)
                return {shard, parity};
            c.active[parity].fetch_sub(1, std::memory_order_release);
        }
    }

    /// Ends the section `ticket` began.
    void exit(Ticket ticket) noexcept
    {
        shards_[ticket.shard].value.active[ticket.parity].fetch_sub(1, std::memory_order_release);
    }

    /// Waits until every section that began before this call has ended. Callers serialise
    /// their calls (and the pointer stores before them).
    void synchronize() noexcept
    {
        const std::uint64_t epoch = epoch_.value.load(std::memory_order_relaxed);
        epoch_.value.store(epoch + 1, std::memory_order_seq_cst);
        const auto parity = static_cast<unsigned>(epoch & 1U);
        while (readers(parity) != 0)
            std::this_thread::yield();
    }

    /// Grace periods begun so far (for tests).
    [[nodiscard]] std::uint64_t epoch() const noexcept
    {
        return epoch_.value.load(std::memory_order_seq_cst);
    }

    /// Sections under way (for tests): both parities, all shards.
    [[nodiscard]] std::uint64_t active() const noexcept { return readers(0) + readers(1); }

private:
    struct Counters {
        std::array<std::atomic<std::uint64_t>, 2> active{};
    };

    [[nodiscard]] std::uint64_t readers(unsigned parity) const noexcept
    {
        std::uint64_t sum = 0;
        for (const Padded<Counters>& s : shards_)
            sum += s.value.active[parity].load(std::memory_order_seq_cst);
        return sum;
    }

    std::array<Padded<Counters>, shard_count> shards_{};
    Padded<std::atomic<std::uint64_t>> epoch_{};
};

} // namespace membacking::detail
