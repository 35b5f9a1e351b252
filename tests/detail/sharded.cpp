// The lease fast path's two mechanisms, alone: detail::ShardedReaders (read-side sections and
// grace periods) and detail::RetirableRef (a sharded count with retirement). The concurrency
// cases are meant for TSan and ASan (tests/run.sh runs this file under both): a use after free or
// a data race in the protocol is a sanitizer error there, and a lost or doubled free is a failed
// CHECK everywhere.
#include <membacking/detail/retirable_ref.hpp>
#include <membacking/detail/sharded_readers.hpp>
#include <membacking/detail/thread_shard.hpp>

#include "test_support.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <set>
#include <thread>
#include <vector>

using namespace membacking::detail;

TEST_CASE("threads get distinct shards, each on its own pair of cache lines")
{
    static_assert(sizeof(Padded<std::atomic<std::uint64_t>>) == shard_alignment);
    static_assert(alignof(Padded<std::atomic<std::uint64_t>>) == shard_alignment);
    std::set<std::size_t> seen;
    std::vector<std::size_t> got(4);
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < got.size(); ++i)
        threads.emplace_back([&got, i] {
            got[i] = this_thread_shard();
            CHECK(this_thread_shard() == got[i]); // stable
        });
    for (auto& t : threads)
        t.join();
    for (const std::size_t s : got) {
        CHECK(s < shard_count);
        seen.insert(s);
    }
    CHECK(seen.size() == got.size());
}

TEST_CASE("ShardedReaders: synchronize waits for the sections under way, not for later ones")
{
    ShardedReaders readers;
    CHECK(readers.active() == 0);
    const auto ticket = readers.enter(3);
    CHECK(readers.active() == 1);

    std::atomic<bool> synchronized{false};
    std::thread writer([&] {
        readers.synchronize();
        synchronized = true;
    });
    // Once the writer has flipped the epoch, a new section is not waited for: the writer
    // finishes while it is open, as soon as the first one ends.
    while (readers.epoch() == 0)
        std::this_thread::yield();
    {
        const ShardedReaders::Section later(readers);
        CHECK_FALSE(synchronized.load()); // still waiting for `ticket`
        readers.exit(ticket);
        while (!synchronized)
            std::this_thread::yield();
        CHECK(readers.active() == 1); // `later`
    }
    writer.join();
    CHECK(readers.active() == 0);
}

TEST_CASE("ShardedReaders: a writer that frees after synchronize never frees what a reader uses")
{
    struct Data {
        std::uint64_t a;
        std::uint64_t b; // always a + 1
    };
    ShardedReaders readers;
    std::atomic<Data*> current{new Data{0, 1}};
    std::atomic<bool> done{false};
    std::atomic<std::uint64_t> reads{0};
    std::atomic<int> started{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t)
        threads.emplace_back([&] {
            started.fetch_add(1);
            std::uint64_t n = 0;
            while (!done.load(std::memory_order_relaxed)) {
                const ShardedReaders::Section section(readers);
                const Data* d = current.load(std::memory_order_seq_cst);
                const std::uint64_t a = d->a;
                const std::uint64_t b = d->b;
                if (b != a + 1) // ASan/TSan catch the free; this catches a reused block
                    FAIL("torn or freed data");
                ++n;
            }
            reads += n;
        });
    while (started.load() < 3)
        std::this_thread::yield();
    for (std::uint64_t i = 1; i <= 20000; ++i) {
        Data* old = current.exchange(new Data{i, i + 1}, std::memory_order_seq_cst);
        readers.synchronize();
        delete old;
    }
    done = true;
    for (auto& t : threads)
        t.join();
    delete current.load();
    CHECK(reads.load() > 0);
    CHECK(readers.active() == 0);
}

TEST_CASE("RetirableRef: retire frees at once when nothing is held, else the last release does")
{
    SUBCASE("unused")
    {
        RetirableRef r;
        CHECK(r.retire());
    }
    SUBCASE("held on two shards")
    {
        RetirableRef r;
        r.acquire(1);
        r.acquire(2);
        r.acquire(2);
        CHECK(r.count() == 3);
        CHECK_FALSE(r.release(2));
        CHECK_FALSE(r.retire());
        CHECK(r.retired());
        CHECK(r.count() == 2);
        CHECK_FALSE(r.release(1));
        CHECK(r.release(2));
    }
    SUBCASE("released before retirement")
    {
        RetirableRef r;
        r.acquire(0);
        CHECK_FALSE(r.release(0));
        CHECK(r.retire());
    }
}

TEST_CASE("RetirableRef: many threads dropping references while it is retired: exactly one free, "
          "after the last drop")
{
    for (int round = 0; round < 300; ++round) {
        struct Object {
            RetirableRef refs;
            std::atomic<int> frees{0};
        };
        auto* o = new Object;
        constexpr int threads_n = 3;
        constexpr int per_thread = 50;
        std::atomic<int> freed_by{0};
        std::atomic<int> ready{0};
        // Every reference is taken before retirement (the lease domain's guarantee).
        std::vector<std::thread> threads;
        for (int t = 0; t < threads_n; ++t)
            threads.emplace_back([&] {
                const std::size_t shard = this_thread_shard();
                for (int i = 0; i < per_thread; ++i)
                    o->refs.acquire(shard);
                ready.fetch_add(1);
                while (ready.load() < threads_n + 1)
                    std::this_thread::yield();
                for (int i = 0; i < per_thread; ++i)
                    if (o->refs.release(shard))
                        freed_by.fetch_add(1);
            });
        while (ready.load() < threads_n)
            std::this_thread::yield();
        ready.fetch_add(1);
        if (o->refs.retire())
            freed_by.fetch_add(1);
        for (auto& t : threads)
            t.join();
        REQUIRE(freed_by.load() == 1);
        delete o;
    }
}
