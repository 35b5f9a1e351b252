// detail::IntervalMap: the one overlap walk and split-out behind MappingList, the mapping
// manager's books and every partition's windows. Edge cases at each boundary, then a randomized
// comparison against a page-by-page model.
#include <membacking/detail/interval_map.hpp>

#include "test_support.hpp"

#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <vector>

using namespace membacking;
using membacking::test::range;

namespace {

constexpr std::uint64_t pg = page_size;

/// A piece of something: `origin` is the page of the original entry that this piece's first
/// page came from, so a slice can be checked to carry the right part of its source.
struct Piece {
    MemoryRange range;
    std::uint64_t id = 0;     ///< which original entry
    std::uint64_t origin = 0; ///< offset of range.start() in the original entry
    friend bool operator==(const Piece&, const Piece&) = default;
};

struct RangeOfPiece {
    MemoryRange operator()(const Piece& p) const noexcept { return p.range; }
};

using Map = detail::IntervalMap<Piece, RangeOfPiece>;

Piece slice(const Piece& p, const MemoryRange& part)
{
    return {part, p.id, p.origin + (part.start() - p.range.start())};
}

Piece piece(std::uint64_t start, std::uint64_t end, std::uint64_t id)
{
    return {range(start * pg, end * pg), id, 0};
}

MemoryRange pages(std::uint64_t start, std::uint64_t end)
{
    return range(start * pg, end * pg);
}

std::vector<MemoryRange> ranges_of(const Map& m)
{
    std::vector<MemoryRange> out;
    for (const auto& [start, p] : m) {
        CHECK(start == p.range.start());
        out.push_back(p.range);
    }
    return out;
}

std::vector<std::uint64_t> overlapping_ids(const Map& m, const MemoryRange& r)
{
    std::vector<std::uint64_t> out;
    m.for_each_overlapping(r, [&](const Piece& p) { out.push_back(p.id); });
    return out;
}

/// [1,3) [3,4) [6,9): two adjacent entries and a gap.
Map sample()
{
    Map m;
    m.insert(piece(1, 3, 1));
    m.insert(piece(3, 4, 2));
    m.insert(piece(6, 9, 3));
    return m;
}

} // namespace

TEST_CASE("IntervalMap lookups: exact, by address, by range, first overlap")
{
    const Map m = sample();
    REQUIRE(m.size() == 3);
    CHECK(m.find_exact(pages(1, 3))->id == 1);
    CHECK(m.find_exact(pages(1, 2)) == nullptr); // same start, other size
    CHECK(m.find_exact(pages(0, 3)) == nullptr);

    CHECK(m.containing(0) == nullptr);
    CHECK(m.containing(pg)->id == 1);
    CHECK(m.containing(3 * pg - 1)->id == 1); // last byte
    CHECK(m.containing(3 * pg)->id == 2);     // first byte of the adjacent one
    CHECK(m.containing(4 * pg) == nullptr);   // the gap
    CHECK(m.containing(9 * pg) == nullptr);   // one past the end

    CHECK(m.containing(pages(7, 9))->id == 3);
    CHECK(m.containing(pages(2, 4)) == nullptr); // spans two entries
    CHECK(m.containing(pages(5, 7)) == nullptr); // starts in the gap
    CHECK(m.containing(MemoryRange()) == nullptr);

    CHECK(m.first_overlap(pages(0, 1)) == nullptr); // touching is not overlapping
    CHECK(m.first_overlap(pages(4, 6)) == nullptr);
    CHECK(m.first_overlap(pages(9, 10)) == nullptr);
    CHECK(m.first_overlap(pages(0, 2))->id == 1);
    CHECK(m.first_overlap(pages(2, 7))->id == 1); // the one starting before the range
    CHECK(m.first_overlap(pages(5, 7))->id == 3);
    CHECK(m.first_overlap(range(2 * pg, 2 * pg)) == nullptr); // an empty range meets nothing
}

TEST_CASE("IntervalMap::gap_around finds the free range around an address, within bounds")
{
    const Map m = sample();                                     // [1,3) [3,4) [6,9)
    CHECK(m.gap_around(0, pages(0, 12)) == pages(0, 1));        // before the first entry
    CHECK(m.gap_around(pg - 1, pages(0, 12)) == pages(0, 1));   // its last byte
    CHECK(m.gap_around(5 * pg, pages(0, 12)) == pages(4, 6));   // between two entries
    CHECK(m.gap_around(4 * pg, pages(0, 12)) == pages(4, 6));   // first byte after an entry
    CHECK(m.gap_around(9 * pg, pages(0, 12)) == pages(9, 12));  // after the last, up to bounds
    CHECK(m.gap_around(5 * pg, pages(5, 12)) == pages(5, 6));   // bounds clip the start
    CHECK(m.gap_around(4 * pg, pages(0, 5)) == pages(4, 5));    // and the end
    CHECK(m.gap_around(10 * pg, pages(0, 10)) == std::nullopt); // outside the bounds
    CHECK(m.gap_around(pg, pages(0, 12)) == std::nullopt);      // an entry holds it
    CHECK(m.gap_around(3 * pg, pages(0, 12)) == std::nullopt);  // the adjacent one's first byte
    CHECK(m.gap_around(9 * pg - 1, pages(0, 12)) == std::nullopt);
    CHECK(Map().gap_around(7, pages(0, 2)) == pages(0, 2)); // empty map: all of the bounds
}

TEST_CASE("IntervalMap walks the overlapping entries in address order, and only those")
{
    const Map m = sample();
    CHECK(overlapping_ids(m, pages(0, 20)) == std::vector<std::uint64_t>{1, 2, 3});
    CHECK(overlapping_ids(m, pages(2, 4)) == std::vector<std::uint64_t>{1, 2});
    CHECK(overlapping_ids(m, pages(3, 7)) == std::vector<std::uint64_t>{2, 3});
    CHECK(overlapping_ids(m, pages(4, 6)).empty());
    CHECK(overlapping_ids(m, pages(8, 9)) == std::vector<std::uint64_t>{3});
    CHECK(overlapping_ids(m, range(3 * pg, 3 * pg)).empty());
}

TEST_CASE("IntervalMap::cover lists whole entries and names the first one cut")
{
    const Map m = sample();
    auto all = m.cover(pages(0, 10));
    CHECK(all.cut == nullptr);
    REQUIRE(all.inside.size() == 3);
    CHECK(all.inside[2].id == 3);

    auto two = m.cover(pages(1, 4)); // exactly the two adjacent ones
    CHECK(two.cut == nullptr);
    CHECK(two.inside.size() == 2);

    auto cut_front = m.cover(pages(2, 10));
    REQUIRE(cut_front.cut != nullptr);
    CHECK(cut_front.cut->id == 1);

    auto cut_back = m.cover(pages(0, 8));
    REQUIRE(cut_back.cut != nullptr);
    CHECK(cut_back.cut->id == 3);

    auto gap = m.cover(pages(4, 6));
    CHECK(gap.cut == nullptr);
    CHECK(gap.inside.empty());
}

TEST_CASE("IntervalMap::punch keeps the outside parts, sliced from the right place")
{
    SUBCASE("the middle of one entry: two pieces remain")
    {
        Map m;
        m.insert(piece(0, 10, 7));
        m.punch(pages(3, 5), slice);
        CHECK(ranges_of(m) == std::vector<MemoryRange>{pages(0, 3), pages(5, 10)});
        CHECK(m.at(0) == Piece{pages(0, 3), 7, 0});
        CHECK(m.at(5 * pg) == Piece{pages(5, 10), 7, 5 * pg});
    }
    SUBCASE("across several entries: the ends are trimmed, the inside ones go")
    {
        Map m = sample();
        m.punch(pages(2, 7), slice);
        CHECK(ranges_of(m) == std::vector<MemoryRange>{pages(1, 2), pages(7, 9)});
        CHECK(m.at(7 * pg) == Piece{pages(7, 9), 3, pg});
    }
    SUBCASE("exact bounds and gaps split nothing")
    {
        Map m = sample();
        m.punch(pages(3, 6), slice); // entry 2 exactly, plus the gap
        CHECK(ranges_of(m) == std::vector<MemoryRange>{pages(1, 3), pages(6, 9)});
        m.punch(pages(4, 6), slice); // only the gap
        CHECK(m.size() == 2);
    }
    SUBCASE("punch_edit changes nothing until it is applied")
    {
        Map m = sample();
        auto edit = m.punch_edit(pages(0, 2), slice);
        CHECK(edit.erase == std::vector<std::uint64_t>{pg});
        REQUIRE(edit.insert.size() == 1);
        CHECK(edit.insert[0] == Piece{pages(2, 3), 1, pg});
        CHECK(m.size() == 3);
        CHECK(m.find_exact(pages(1, 3)) != nullptr);
        m.apply(std::move(edit));
        CHECK(ranges_of(m) == std::vector<MemoryRange>{pages(2, 3), pages(3, 4), pages(6, 9)});
    }
}

TEST_CASE("IntervalMap values may change in place; erase removes by start")
{
    Map m = sample();
    m.find_exact(pages(6, 9))->id = 42;
    m.containing(pg)->origin = 5;
    CHECK(m.at(6 * pg).id == 42);
    CHECK(m.at(pg).origin == 5);
    m.erase(3 * pg);
    m.erase(100 * pg); // nothing there: nothing happens
    CHECK(ranges_of(m) == std::vector<MemoryRange>{pages(1, 3), pages(6, 9)});
    m.insert(piece(3, 6, 9)); // the freed space, exactly between two entries
    CHECK(m.size() == 3);
    m.clear();
    CHECK(m.empty());
}

// Random inserts (into free space), punches, covers and gaps, checked after every step against a
// model that records, for every page, which entry holds it and at which offset of that entry.
TEST_CASE("IntervalMap agrees with a page-by-page model under random edits")
{
    constexpr std::uint64_t space = 64; // pages
    std::mt19937_64 rng(0x1e7e5a1);     // fixed: a failure reproduces
    auto pick = [&](std::uint64_t lo, std::uint64_t hi) {
        return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng);
    };
    struct ModelPage {
        std::uint64_t id;
        std::uint64_t origin;
    };
    std::map<std::uint64_t, ModelPage> model; // page -> who holds it
    Map m;
    std::uint64_t next_id = 1;

    for (int step = 0; step < 4000; ++step) {
        const std::uint64_t a = pick(0, space - 1);
        const std::uint64_t b = pick(a + 1, std::min(space, a + 16));
        const MemoryRange r = pages(a, b);
        bool model_free = true;
        for (std::uint64_t p = a; p < b; ++p)
            model_free = model_free && !model.contains(p);
        CHECK((m.first_overlap(r) == nullptr) == model_free);

        switch (pick(0, 2)) {
        case 0: // insert where free
            if (model_free) {
                const std::uint64_t id = next_id++;
                m.insert(piece(a, b, id));
                for (std::uint64_t p = a; p < b; ++p)
                    model[p] = {id, (p - a) * pg};
            }
            break;
        case 1: // punch
            m.punch(r, slice);
            for (std::uint64_t p = a; p < b; ++p)
                model.erase(p);
            break;
        default: { // cover: every entry inside must lie wholly in r, the cut one must not
            const auto c = m.cover(r);
            for (const Piece& p : c.inside)
                CHECK(r.contains(p.range));
            if (c.cut != nullptr)
                CHECK_FALSE(r.contains(c.cut->range));
            break;
        }
        }

        // Every page agrees: same holder, same offset into it; entries are disjoint and keyed by
        // their start.
        std::uint64_t covered = 0;
        std::uint64_t previous_end = 0;
        for (const auto& [start, p] : m) {
            REQUIRE(start == p.range.start());
            REQUIRE(p.range.start() >= previous_end);
            previous_end = p.range.end();
            for (std::uint64_t page = p.range.start() / pg; page < p.range.end() / pg; ++page) {
                auto it = model.find(page);
                REQUIRE(it != model.end());
                CHECK(it->second.id == p.id);
                CHECK(it->second.origin == p.origin + (page * pg - p.range.start()));
                ++covered;
            }
        }
        REQUIRE(covered == model.size());

        // The gap around a random page is the run of free pages the model has there.
        const std::uint64_t q = pick(0, space - 1);
        const auto gap = m.gap_around(q * pg + pick(0, pg - 1), pages(0, space));
        if (model.contains(q)) {
            CHECK(gap == std::nullopt);
        } else {
            std::uint64_t lo = q;
            while (lo > 0 && !model.contains(lo - 1))
                --lo;
            std::uint64_t hi = q + 1;
            while (hi < space && !model.contains(hi))
                ++hi;
            CHECK(gap == pages(lo, hi));
        }
    }
}
