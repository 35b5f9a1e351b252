// The harvest of detail::DirtyBitmap, in both layouts (a bit and a byte per page), against a
// page-by-page model: take_runs and take_bitmap
// return exactly the set pages of the range (runs maximal, merged across words, ascending),
// clear exactly those and leave every bit outside the range; over patterns that reach every
// path of the word scan (clean words skipped four at a time, stretches of all-ones words cleared
// with plain stores, other words exchanged, partial words at both ends). And the soundness of
// the plain-store clear under concurrency: writers that keep marking while a harvester keeps
// taking lose no mark.
#include <membacking/access/dirty_bitmap.hpp>

#include "test_support.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <thread>
#include <vector>

using namespace membacking;
using membacking::detail::DirtyBitmap;

namespace {

constexpr std::uint64_t page = page_size;
constexpr std::uint64_t words = 40;
constexpr std::uint64_t pages = words * 64;

/// The layout a test case runs in (doctest's templated cases take types).
template <DirtyMapLayout L>
struct In {
    static constexpr DirtyMapLayout layout = L;
};
#define BOTH_LAYOUTS In<DirtyMapLayout::bits>, In<DirtyMapLayout::bytes>

std::shared_ptr<DirtyBitmap> bitmap(DirtyMapLayout layout)
{
    auto b = DirtyBitmap::create(pages * page, layout);
    REQUIRE(b);
    return std::move(b).value();
}

/// Marks the model's pages in the bitmap.
void load(const DirtyBitmap& b, const std::vector<bool>& model)
{
    for (std::uint64_t p = 0; p < model.size(); ++p)
        if (model[p])
            b.mark(p * page, page);
}

/// The model's runs of [first, end) pages, maximal, ascending.
std::vector<DirtyRun> runs_of(const std::vector<bool>& model, std::uint64_t first,
                              std::uint64_t end)
{
    std::vector<DirtyRun> out;
    for (std::uint64_t p = first; p < end; ++p) {
        if (!model[p])
            continue;
        if (!out.empty() && out.back().gpa.value() + out.back().length.value() == p * page)
            out.back().length = Length{out.back().length.value() + page};
        else
            out.push_back({Gpa{p * page}, Length{page}});
    }
    return out;
}

/// A pattern with clean words, all-ones stretches of 1 to 9 words, and random words.
std::vector<bool> pattern(std::mt19937_64& rng)
{
    std::vector<bool> model(pages);
    std::uint64_t w = 0;
    while (w < words) {
        const std::uint64_t kind = rng() % 4;
        const std::uint64_t n = std::min<std::uint64_t>(words - w, 1 + rng() % 9);
        for (std::uint64_t i = w * 64; i < (w + n) * 64; ++i)
            model[i] = kind == 1 || (kind == 2 && rng() % 3 == 0) || (kind == 3 && rng() % 64 != 0);
        w += n;
    }
    return model;
}

} // namespace

TEST_CASE_TEMPLATE("take_runs and take_bitmap take exactly the range's set pages, as maximal runs",
                   Layout, BOTH_LAYOUTS)
{
    std::mt19937_64 rng(13);
    const auto b = bitmap(Layout::layout);
    REQUIRE(b->layout() == Layout::layout);
    for (int round = 0; round < 400; ++round) {
        const std::vector<bool> model = pattern(rng);
        std::uint64_t first = rng() % pages;
        std::uint64_t end = first + rng() % (pages - first + 1);
        if (round % 4 == 0) { // whole words, and the whole bitmap
            first = first / 64 * 64;
            end = round % 8 == 0 ? pages : (end + 63) / 64 * 64;
        }
        CAPTURE(round);
        CAPTURE(first);
        CAPTURE(end);
        load(*b, model);
        const bool as_runs = round % 2 == 0;
        std::vector<bool> taken(pages);
        if (as_runs) {
            std::vector<DirtyRun> runs{{Gpa{0x1000}, Length{page}}}; // appended to, kept
            REQUIRE(b->take_runs(first * page, (end - first) * page, runs));
            std::vector<DirtyRun> expected{{Gpa{0x1000}, Length{page}}};
            for (const DirtyRun& r : runs_of(model, first, end))
                expected.push_back(r);
            CHECK(runs == expected);
        } else {
            std::vector<std::uint64_t> out((end - first + 63) / 64 + 1, 0);
            REQUIRE(b->take_bitmap(first * page, (end - first) * page, out));
            for (std::uint64_t p = first; p < end; ++p)
                CHECK((((out[(p - first) / 64] >> ((p - first) % 64)) & 1) != 0) == model[p]);
            CHECK(out.back() == 0); // nothing past the range's bits
        }
        // Inside the range: all clear. Outside: exactly the model. (A second take returns what
        // is left; the whole bitmap is then clean for the next round.)
        std::vector<DirtyRun> rest;
        REQUIRE(b->take_runs(0, pages * page, rest));
        std::vector<bool> left = model;
        for (std::uint64_t p = first; p < end; ++p)
            left[p] = false;
        CHECK(rest == runs_of(left, 0, pages));
    }
}

TEST_CASE_TEMPLATE(
    "writers that mark while a harvester takes lose no mark (all-ones words included)", Layout,
    BOTH_LAYOUTS)
{
    // Three writers mark every page of a large bitmap once, in ascending order. In even words
    // they interleave (writer t: pages t, t + 3, ...), so that a harvester that keeps taking
    // finds words partly set while other writers mark into them (the exchange, or the byte
    // map's byte clears); each odd word belongs to one writer, which fills it whole while the
    // harvester runs, so that takes also meet whole words of ones (the plain-store clears) in
    // every round, whatever the scheduler does. A page marked once is set once, so it must be
    // in exactly one take: a mark that a clear wiped out would be in none.
    constexpr std::uint64_t big = 256 * 64;
    auto created = DirtyBitmap::create(big * page, Layout::layout);
    REQUIRE(created);
    const std::shared_ptr<DirtyBitmap> b = std::move(created).value();
    constexpr std::uint64_t writers = 3;
    std::uint64_t full_words = 0; // 64-page-aligned whole words inside the runs taken
    std::uint64_t wrong = 0;      // pages taken zero times or more than once
    for (int round = 0; round < 2000 && (round < 200 || full_words < 200); ++round) {
        std::atomic<std::uint64_t> running{writers};
        std::vector<std::thread> threads;
        for (std::uint64_t t = 0; t < writers; ++t)
            threads.emplace_back([&, t] {
                for (std::uint64_t p = 0; p < big; ++p) {
                    const std::uint64_t w = p / 64;
                    if ((w % 2 == 0 ? p : w / 2) % writers == t)
                        b->mark(p * page, page);
                }
                running.fetch_sub(1, std::memory_order_release);
            });
        std::vector<std::uint8_t> times(big);
        auto take_all = [&] {
            std::vector<DirtyRun> runs;
            REQUIRE(b->take_runs(0, big * page, runs));
            for (const DirtyRun& r : runs) {
                const std::uint64_t first = r.gpa.value() / page;
                const std::uint64_t end = (r.gpa + r.length).value() / page;
                full_words += end / 64 > (first + 63) / 64 ? end / 64 - (first + 63) / 64 : 0;
                for (std::uint64_t p = first; p < end; ++p)
                    ++times[p];
            }
        };
        while (running.load(std::memory_order_acquire) != 0)
            take_all();
        for (std::thread& t : threads)
            t.join();
        take_all(); // what the writers marked after the last concurrent take
        for (const std::uint8_t n : times)
            wrong += n == 1 ? 0 : 1;
    }
    CHECK(wrong == 0);
    CHECK(full_words >= 200);
}

TEST_CASE("a byte map is one byte per page, 8x the bit map, and marks with plain stores")
{
    // 1 GiB: 262144 pages. Bits: 32 KiB; bytes: 256 KiB.
    constexpr std::uint64_t gib = std::uint64_t{1} << 30;
    CHECK(DirtyBitmap::bytes_for(gib, DirtyMapLayout::bits) == 32 * 1024);
    CHECK(DirtyBitmap::bytes_for(gib, DirtyMapLayout::bytes) == 256 * 1024);
    CHECK(DirtyBitmap::bytes_for(page, DirtyMapLayout::bytes) == page); // whole pages
    const auto b = bitmap(DirtyMapLayout::bytes);
    // A write across two pages marks both bytes, and nothing else.
    b->mark(5 * page - 8, 16);
    for (std::uint64_t p = 0; p < pages; ++p)
        CHECK(b->marks()[p] == (p == 4 || p == 5 ? 1 : 0));
    // clear() resets without reporting.
    b->clear(0, pages * page);
    std::vector<DirtyRun> runs;
    REQUIRE(b->take_runs(0, pages * page, runs));
    CHECK(runs.empty());
}
