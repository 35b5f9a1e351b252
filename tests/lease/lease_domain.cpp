// The lease domain alone (lease/lease_domain.hpp, lease/lease_generation.hpp), with windows that
// are plain heap buffers: publishing never waits, a window is unmapped exactly once, after the
// last table that names it and the last lease pinning such a table are gone, and generation
// slots are reused. The concurrency case is meant for TSan and ASan (tests/run.sh runs this
// program under both): a lease that reached a freed window is a sanitizer error there.
#include <membacking/lease/lease_domain.hpp>

#include "test_support.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

using namespace membacking;
using membacking::detail::LeaseDomain;
using membacking::detail::LeasePiece;
using membacking::test::must;

namespace {

constexpr std::uint64_t window_bytes = 8192;
constexpr std::uint64_t tag = 0x5a5a'1234'8765'a5a5;
std::atomic<int> windows_unmapped{0};

void unmap_buffer(std::byte* base, std::uint64_t /*size*/) noexcept
{
    std::memset(base, 0, sizeof tag); // a lease that still saw it would read a wrong tag
    delete[] base;
    windows_unmapped.fetch_add(1);
}

/// Registers a fresh window for object `id` and returns it: its first 8 bytes are the tag.
detail::LeaseWindow* add_window(LeaseDomain& d, std::uintptr_t id)
{
    auto* base = new std::byte[window_bytes];
    std::memcpy(base, &tag, sizeof tag);
    std::memcpy(base + 4096, &tag, sizeof tag);
    d.add_window(id, base, window_bytes, true, &unmap_buffer);
    return d.window(id);
}

/// [0, 8 KiB) as two pieces of window w (contiguous: one lease piece).
std::vector<LeasePiece> table_of(detail::LeaseWindow* w)
{
    return {{0, 4096, w->base, true, w}, {4096, 8192, w->base + 4096, true, w}};
}

std::uint64_t first_word(const Lease& l, std::size_t piece = 0)
{
    std::uint64_t v = 0;
    std::memcpy(&v, l.spans()[piece].data(), sizeof v);
    return v;
}

} // namespace

TEST_CASE("lease domain: an empty domain refuses leases, probes nothing, and frees all it made")
{
    windows_unmapped = 0;
    {
        LeaseDomain d;
        auto l = d.take(0, 64, LeaseAccess::read);
        REQUIRE_FALSE(l);
        CHECK(l.error().code() == errc::unmapped);
        CHECK(d.probe(0, 64) == RangeProbe{Length{0}, Length{0}});
        detail::LeaseWindow* w = add_window(d, 1);
        d.publish(table_of(w));
        CHECK(d.probe(0, 16384) == RangeProbe{Length{8192}, Length{8192}});
    }
    CHECK(windows_unmapped.load() == 1);
}

TEST_CASE("lease domain: a lease pins its table: its window outlives the table, the registry and "
          "the domain, until the lease goes")
{
    windows_unmapped = 0;
    auto d = std::make_unique<LeaseDomain>();
    detail::LeaseWindow* w = add_window(*d, 1);
    d->publish(table_of(w));
    Lease l = must(d->take(0, 8192, LeaseAccess::read_write));
    REQUIRE(l.spans().size() == 1); // two table pieces, contiguous in one window
    CHECK(l.spans()[0].size() == 8192);
    d->publish({}); // the object leaves the guest: the registry lets go, the lease keeps it
    CHECK(d->window_count() == 0);
    CHECK(windows_unmapped.load() == 0);
    CHECK_FALSE(d->take(0, 8, LeaseAccess::read));
    d.reset();
    CHECK(windows_unmapped.load() == 0);
    CHECK(first_word(l) == tag);
    Lease moved = std::move(l);
    CHECK(l.empty());
    CHECK(first_word(moved) == tag);
    moved.reset();
    CHECK(windows_unmapped.load() == 1);
}

TEST_CASE("lease domain: generation slots are reused; a held lease pins one until released")
{
    LeaseDomain d;
    detail::LeaseWindow* w = add_window(d, 1);
    for (int i = 0; i < 100; ++i)
        d.publish(table_of(w));
    CHECK(d.generation_slots() == 2); // the current one and the one being replaced
    {
        const Lease held = must(d.take(0, 64, LeaseAccess::read));
        for (int i = 0; i < 100; ++i)
            d.publish(table_of(w));
        CHECK(d.generation_slots() == 3); // plus the one `held` pins
        CHECK(first_word(held) == tag);
    }
    for (int i = 0; i < 100; ++i)
        d.publish(table_of(w));
    CHECK(d.generation_slots() == 3); // the released slot is reused
}

TEST_CASE("lease domain: leases and probes on three threads while the table is replaced 20,000 "
          "times with a new window each time: no lease sees a freed window, each is unmapped "
          "once")
{
    windows_unmapped = 0;
    constexpr int rounds = 20000;
    {
        LeaseDomain d;
        d.publish(table_of(add_window(d, 0)));
        std::atomic<bool> done{false};
        std::atomic<int> started{0};
        std::atomic<std::uint64_t> leases{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < 3; ++t)
            threads.emplace_back([&] {
                // Each thread keeps its last few leases alive, so leases outlive several
                // publishes and pin old generations.
                std::array<Lease, 8> kept;
                std::size_t next = 0;
                std::uint64_t n = 0;
                started.fetch_add(1);
                while (!done.load(std::memory_order_relaxed)) {
                    auto l = d.take(next % 2 == 0 ? 0 : 4096, 200, LeaseAccess::read_write);
                    if (!l)
                        FAIL("a lease of mapped memory failed: " << l.error());
                    if (first_word(*l) != tag) // both offsets start a tagged page
                        FAIL("a lease reached a window that was unmapped");
                    kept[next++ % kept.size()] = std::move(*l);
                    if (d.probe(0, 8192).mapped != Length{8192})
                        FAIL("probe of mapped memory says it is not");
                    ++n;
                }
                leases += n;
            });
        while (started.load() < 3)
            std::this_thread::yield();
        for (int i = 1; i <= rounds; ++i)
            d.publish(table_of(add_window(d, static_cast<std::uintptr_t>(i))));
        done = true;
        for (auto& t : threads)
            t.join(); // the threads' kept leases are released here
        CHECK(leases.load() > 0);
        CHECK(d.window_count() == 1);
        CHECK(windows_unmapped.load() == rounds); // every replaced window, the current one stays
        CHECK(d.generation_slots() < 64);
    }
    CHECK(windows_unmapped.load() == rounds + 1);
}
