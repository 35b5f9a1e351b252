// The lease fast path's mechanism, alone: detail::RetirableRef (a sharded count with retirement,
// try_acquire for readers that find it through a pointer, and recycling). The concurrency
// cases are meant for TSan and ASan (tests/run.sh runs this file under both): a use after free or
// a data race in the protocol is a sanitizer error there, and a lost or doubled free is a failed
// CHECK everywhere.
#include <membacking/detail/retirable_ref.hpp>
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

TEST_CASE("RetirableRef: try_acquire fails once retired, counts nothing then, and recycle makes "
          "it live again")
{
    RetirableRef r;
    REQUIRE(r.try_acquire(5));
    CHECK(r.count() == 1);
    CHECK_FALSE(r.retire()); // held on shard 5
    CHECK_FALSE(r.try_acquire(5));
    CHECK_FALSE(r.try_acquire(6));
    CHECK(r.count() == 1); // the failed ones were not counted
    CHECK(r.release(5));   // the last reference frees
    r.recycle();
    CHECK_FALSE(r.retired());
    CHECK(r.count() == 0);
    REQUIRE(r.try_acquire(6));
    CHECK(r.count() == 1);
    CHECK_FALSE(r.release(6));
    CHECK(r.retire());
}

TEST_CASE("RetirableRef: readers that find it through a pointer and validate it never use a freed "
          "one; every one is freed exactly once")
{
    // The lease domain's protocol (lease/lease_domain.hpp), on its own: a writer replaces the
    // current object and retires the old one without waiting; readers try_acquire, validate the
    // pointer, use the object, then release. Objects are recycled through a pool, as the domain
    // recycles generation slots. A use after free is an ASan or TSan error; a torn object is a
    // failed check.
    struct Object {
        RetirableRef refs;
        std::uint64_t a = 0;
        std::uint64_t b = 1; // always a + 1 while live
        std::atomic<bool> idle{false};
    };
    std::vector<std::unique_ptr<Object>> pool;
    pool.push_back(std::make_unique<Object>());
    std::atomic<Object*> current{pool.back().get()};
    std::atomic<bool> done{false};
    std::atomic<std::uint64_t> reads{0};
    std::atomic<int> started{0};
    std::atomic<int> frees{0};
    const auto reclaim = [&frees](Object* o) {
        o->a = 0;
        o->b = 0;
        frees.fetch_add(1);
        o->idle.store(true, std::memory_order_release);
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t)
        threads.emplace_back([&] {
            const std::size_t shard = this_thread_shard();
            started.fetch_add(1);
            std::uint64_t n = 0;
            while (!done.load(std::memory_order_relaxed)) {
                Object* o = current.load(std::memory_order_seq_cst);
                if (!o->refs.try_acquire(shard))
                    continue;
                if (current.load(std::memory_order_seq_cst) == o) {
                    const std::uint64_t a = o->a;
                    const std::uint64_t b = o->b;
                    if (b != a + 1)
                        FAIL("torn or reclaimed object");
                    ++n;
                }
                if (o->refs.release(shard))
                    reclaim(o);
            }
            reads += n;
        });
    while (started.load() < 3)
        std::this_thread::yield();
    std::uint64_t made = 1;
    for (std::uint64_t i = 1; i <= 20000; ++i) {
        Object* next = nullptr;
        for (const auto& o : pool)
            if (o->idle.load(std::memory_order_acquire)) {
                next = o.get();
                next->refs.recycle();
                next->idle.store(false, std::memory_order_relaxed);
                break;
            }
        if (next == nullptr) {
            next = pool.emplace_back(std::make_unique<Object>()).get();
            ++made;
        }
        next->a = i;
        next->b = i + 1;
        Object* old = current.exchange(next, std::memory_order_seq_cst);
        if (old->refs.retire())
            reclaim(old);
    }
    done = true;
    for (auto& t : threads)
        t.join();
    if (current.load()->refs.retire())
        reclaim(current.load());
    CHECK(reads.load() > 0);
    CHECK(frees.load() == 20001); // every object published, exactly once
    CHECK(pool.size() == made);
    CHECK(pool.size() < 100); // slots are reused, not one per publish
}
