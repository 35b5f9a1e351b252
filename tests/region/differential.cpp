// Randomized differential test of the region manager against a brute-force model.
//
// 10,000 fixed-seed sequences of random operations (add region, map, unmap, remove, add mapping,
// remove mappings) with random failure injection into the sinks. After every step the manager's
// own state, the VA side (per page: which object, file offset and writability) and the mock
// partition's view (per page: which window, with which permissions) must equal what a per-page
// brute-force model computes from first principles: among mapped regions covering a page, the
// highest priority wins, ties to the earliest registered.
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>

#include "pages.hpp"
#include "recording_sink.hpp"
#include "test_support.hpp"

#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace membacking;
using membacking::test::RecordingSink;

namespace {

constexpr std::uint64_t space_pages = 32;
constexpr int sequences = 10000;
constexpr int steps_per_sequence = 30;
constexpr std::uint64_t base_seed = 0x5eed0000;

struct ModelPage {
    std::uintptr_t object = 0; // 0 = private
    std::uint64_t file_offset = 0;
    bool writable = false;
    friend bool operator==(const ModelPage&, const ModelPage&) = default;
};

struct ModelRegion {
    RegionId id;
    MemoryRange range;
    std::uint8_t priority = 0;
    std::optional<MapParams> params;
    std::map<std::uint64_t, ModelPage> pages; // region-relative page offset -> backing

    bool holds_private() const
    {
        for (const auto& [off, p] : pages)
            if (p.object == 0)
                return true;
        return false;
    }
    bool all_writable() const
    {
        for (const auto& [off, p] : pages)
            if (!p.writable)
                return false;
        return true;
    }
};

struct Model {
    std::map<RegionId, ModelRegion> regions;

    bool conflicts(const MemoryRange& r, std::uint8_t prio) const
    {
        for (const auto& [id, o] : regions) {
            if (!r.overlaps(o.range))
                continue;
            const bool ok = prio < o.priority    ? o.range.contains(r)
                            : prio == o.priority ? o.range == r
                                                 : r.contains(o.range);
            if (!ok)
                return true;
        }
        return false;
    }

    /// The visible region at gpa, by the plain rule.
    const ModelRegion* visible_at(std::uint64_t gpa) const
    {
        const ModelRegion* best = nullptr;
        for (const auto& [id, r] : regions) // ascending id = registration order
            if (r.params && r.range.contains(gpa) && (!best || r.priority > best->priority))
                best = &r;
        return best;
    }

    std::set<RegionId> visible_set() const
    {
        std::set<RegionId> out;
        for (std::uint64_t p = 0; p < space_pages; ++p)
            if (const ModelRegion* r = visible_at(p * page_size))
                out.insert(r->id);
        return out;
    }
};

struct Harness {
    RecordingSink sink;
    RegionManager<NestedPriority, RecordingSink> rm{sink};
    Model model;
    std::vector<Mappable> objects{test::make_memfd(), test::make_memfd()};
    std::mt19937_64 rng;
    std::vector<RegionId> known; // ids ever issued, including removed ones (stale ids)
    std::string trace;

    explicit Harness(std::uint64_t seed) : rng(seed) {}

    std::uint64_t pick(std::uint64_t n)
    {
        return std::uniform_int_distribution<std::uint64_t>(0, n - 1)(rng);
    }
    bool chance(int percent) { return pick(100) < static_cast<std::uint64_t>(percent); }

    MemoryRange random_range(std::uint64_t limit_pages)
    {
        const std::uint64_t len = std::min<std::uint64_t>(std::uint64_t{1} << pick(6), limit_pages);
        const std::uint64_t start = pick(limit_pages) & ~(len - 1); // aligned: nests often
        const std::uint64_t end = std::min(start + len, limit_pages);
        return MemoryRange::valid_or_abort(start * page_size, end * page_size);
    }

    RegionId random_id()
    {
        if (known.empty() || chance(3))
            return RegionId{999999};
        return known[pick(known.size())];
    }

    // ---- comparison ----

    void check_state() const
    {
        INFO(trace);
        for (std::uint64_t p = 0; p < space_pages; ++p) {
            const std::uint64_t gpa = p * page_size;
            const ModelRegion* v = model.visible_at(gpa);
            // VA side
            std::optional<RecordingSink::Page> want_va;
            if (v) {
                auto it = v->pages.find(gpa - v->range.start());
                if (it != v->pages.end())
                    want_va =
                        RecordingSink::Page{it->second.object, it->second.file_offset,
                                            it->second.writable && v->params->writable, v->id};
            }
            const auto got_va = sink.page(gpa);
            REQUIRE_MESSAGE(got_va == want_va, "VA view differs at " << MemoryRange::hex(gpa));
            // Partition side
            const auto win = sink.partition.lookup(gpa);
            REQUIRE_MESSAGE(win.has_value() == (v != nullptr),
                            "partition view differs at " << MemoryRange::hex(gpa));
            if (v) {
                CHECK(win->gpa == v->range.start());
                CHECK(win->size == v->range.size());
                CHECK(win->writable == (v->params->writable && v->all_writable()));
                CHECK(win->executable == v->params->executable);
            }
        }
        // The manager's own books
        REQUIRE(rm.regions().size() == model.regions.size());
        const std::set<RegionId> vis = model.visible_set();
        for (const auto& [id, m] : model.regions) {
            const auto* r = rm.find(id);
            REQUIRE(r != nullptr);
            CHECK(r->map_params == m.params);
            CHECK(r->active() == vis.contains(id));
            std::map<std::uint64_t, ModelPage> pages;
            for (const auto& [off, rmap] : r->mappings)
                for (const std::uint64_t o : test::pages_of(rmap.range))
                    pages[o] = ModelPage{rmap.backing.object.identity(),
                                         rmap.backing.is_private()
                                             ? 0
                                             : rmap.backing.file_offset + (o - rmap.range.start()),
                                         rmap.writable};
            REQUIRE(pages == m.pages);
        }
    }

    // ---- one random step ----

    void step()
    {
        const bool inject = chance(25);
        if (inject)
            sink.fail_call(1 + pick(6));
        const Model before = model;
        std::optional<errc> expect_error; // the validation error the model predicts
        Result<void> result;
        std::ostringstream what;

        const std::uint64_t kind = pick(100);
        if (kind < 20) {
            const MemoryRange r =
                chance(3) ? MemoryRange::valid_or_abort(0x3000, 0x3000) : random_range(space_pages);
            const auto prio = static_cast<std::uint8_t>(pick(4));
            what << "add_region " << r << " prio " << int(prio);
            if (r.empty())
                expect_error = errc::invalid_range;
            else if (model.conflicts(r, prio))
                expect_error = errc::overlap;
            auto id = rm.add_region("r", r, prio, MappingType::Device);
            if (id) {
                known.push_back(*id);
                model.regions[*id] = ModelRegion{*id, r, prio, std::nullopt, {}};
                what << " -> " << *id;
                result = {};
            } else {
                result = id.error();
            }
        } else if (kind < 40) {
            const RegionId id = random_id();
            const MapParams params{chance(70), chance(50), false};
            what << "map " << id << (params.writable ? " rw" : " ro")
                 << (params.executable ? "x" : "");
            auto it = model.regions.find(id);
            if (it == model.regions.end()) {
                expect_error = errc::not_found;
            } else if (it->second.params != params) {
                // A visible region changes permissions in place; a region becoming visible
                // transiently disables the ones under it, which must not discard private memory.
                const auto vis_before = model.visible_set();
                Model after = model;
                after.regions[id].params = params;
                for (RegionId lost : vis_before)
                    if (!after.visible_set().contains(lost) &&
                        model.regions.at(lost).holds_private())
                        expect_error = errc::conflict;
                if (!expect_error)
                    model = after;
            }
            result = rm.map_region(id, params);
        } else if (kind < 52) {
            const RegionId id = random_id();
            what << "unmap " << id;
            auto it = model.regions.find(id);
            if (it == model.regions.end())
                expect_error = errc::not_found;
            else if (it->second.params) {
                if (model.visible_set().contains(id) && it->second.holds_private())
                    expect_error = errc::conflict;
                else
                    it->second.params.reset();
            }
            result = rm.unmap_region(id);
        } else if (kind < 60) {
            const RegionId id = random_id();
            what << "remove " << id;
            if (!model.regions.contains(id)) {
                expect_error = errc::not_found;
            } else {
                // Private memory may only go last: refused if regions under it would reappear.
                const auto vis_before = model.visible_set();
                Model after = model;
                after.regions.erase(id);
                bool reappear = false;
                for (RegionId v : after.visible_set())
                    reappear = reappear || !vis_before.contains(v);
                if (vis_before.contains(id) && model.regions.at(id).holds_private() && reappear)
                    expect_error = errc::conflict;
                else
                    model = after;
            }
            result = rm.remove_region(id);
        } else if (kind < 85) {
            const RegionId id = random_id();
            auto it = model.regions.find(id);
            const std::uint64_t limit =
                it == model.regions.end()
                    ? 8
                    : it->second.range.size() / page_size + (chance(10) ? 2 : 0);
            const MemoryRange rel = random_range(std::max<std::uint64_t>(limit, 1));
            const bool priv = chance(15);
            const bool writable = priv ? !chance(5) : chance(75);
            const std::size_t obj = pick(2);
            const std::uint64_t file_off = pick(16) * page_size;
            what << "add_mapping " << id << " " << rel << (priv ? " private" : " file")
                 << (writable ? " rw" : " ro");
            RegionMapping m{rel,
                            priv ? MappingBacking::private_memory()
                                 : MappingBacking::file(objects[obj], Offset{file_off}),
                            writable,
                            {}};
            if (it == model.regions.end()) {
                expect_error = errc::not_found;
            } else if (rel.empty()) {
                expect_error = errc::invalid_range;
            } else if (rel.end() > it->second.range.size()) {
                expect_error = errc::out_of_range;
            } else if (priv && !writable) {
                expect_error = errc::invalid_argument;
            } else {
                ModelRegion after = it->second;
                bool covers_private = false;
                for (const std::uint64_t o : test::pages_of(rel)) {
                    auto old = after.pages.find(o);
                    covers_private =
                        covers_private || (old != after.pages.end() && old->second.object == 0);
                    after.pages[o] = ModelPage{priv ? 0 : objects[obj].identity(),
                                               priv ? 0 : file_off + (o - rel.start()), writable};
                }
                if (covers_private && model.visible_set().contains(id))
                    expect_error = errc::conflict;
                else if (after.holds_private() && !after.all_writable())
                    expect_error = errc::conflict;
                else
                    it->second = after;
            }
            result = rm.add_mapping(id, m);
        } else {
            const RegionId id = random_id();
            auto it = model.regions.find(id);
            const std::uint64_t limit =
                it == model.regions.end()
                    ? 8
                    : it->second.range.size() / page_size + (chance(10) ? 2 : 0);
            const MemoryRange rel = random_range(std::max<std::uint64_t>(limit, 1));
            what << "remove_mappings " << id << " " << rel;
            if (it == model.regions.end())
                expect_error = errc::not_found;
            else if (!rel.empty() && rel.end() > it->second.range.size())
                expect_error = errc::out_of_range;
            else
                for (const std::uint64_t o : test::pages_of(rel))
                    it->second.pages.erase(o);
            result = rm.remove_mappings(id, rel);
        }

        const bool injected_fired = inject && !sink.failure_pending();
        sink.clear_failure();
        what << (result ? " ok" : " error: " + result.error().full_message())
             << (injected_fired ? " [injected failure fired]" : "");
        trace += what.str() + "\n";

        if (expect_error) {
            INFO(trace);
            REQUIRE_FALSE(result.has_value());
            if (!injected_fired)
                CHECK(membacking::test::error_of(result) == *expect_error);
            model = before;
        } else if (!result) {
            // The only legitimate failure of a valid operation is an injected one, and then
            // nothing may have changed.
            INFO(trace);
            REQUIRE(injected_fired);
            model = before;
        } else {
            INFO(trace);
            REQUIRE_FALSE(injected_fired); // a fired failure must never be swallowed
        }
        check_state();
    }
};

} // namespace

TEST_CASE("differential: region manager vs brute-force model, with failure injection")
{
    for (int s = 0; s < sequences; ++s) {
        const std::uint64_t seed = base_seed + static_cast<std::uint64_t>(s);
        CAPTURE(seed);
        Harness h(seed);
        for (int i = 0; i < steps_per_sequence; ++i)
            h.step();
    }
}
