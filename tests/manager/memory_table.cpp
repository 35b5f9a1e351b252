// The memory table and its run-time listeners (issue 12 §2): the table as pieces (object, offset,
// permission), private memory marked unshareable, the listener contract (initial table, whole
// pieces removed before pieces added, permission changes, all-or-nothing with rollback of every
// mapper, partition and listener, cut-off), a random sequence of 1,000 operations checked against
// the memory table and the memory-map dump after each one, a refusing listener at every step, and
// listeners added and removed while control calls run (run under TSan in CI). Portable: the
// Windows build runs it too (tests/windows, win_memory_table).
#include <membacking/mapping/detail/memory_table.hpp>
#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <latch>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
using Manager = MockGuestMemoryManager;
using Kind = MemoryTableChange::Kind;

/// A PC-like guest: x86 legacy RAM over 0..4 MiB in a 16 MiB address space.
Manager legacy_guest()
{
    return must(Manager::builder()
                    .x86_legacy_support(true)
                    .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                    .build(Length{16 * MiB}));
}

/// A listener that keeps the view a VFIO container would (IOVA -> piece) and checks the contract
/// on every change: removed pieces are whole pieces it holds, added pieces overlap nothing it
/// still holds. It refuses a change when `refuse` says so (applying nothing).
class RecordingListener {
public:
    explicit RecordingListener(std::string name = "recorder") : name_(std::move(name)) {}

    [[nodiscard]] std::string name() const { return name_; }

    Result<void> apply(const MemoryTableChange& change)
    {
        ++calls_;
        if (refuse && refuse(change))
            return make_error(errc::resource_exhausted, "no IOMMU entries left");
        if (change.kind == Kind::initial && (!view_.empty() || !change.removed.empty()))
            ++violations_;
        auto next = view_;
        for (const MemoryPiece& p : change.removed) {
            auto it = next.find(p.gpa.start());
            if (it == next.end() || !(it->second == p))
                ++violations_; // not a whole piece this listener holds
            else
                next.erase(it);
        }
        for (const MemoryPiece& p : change.added) {
            for (const auto& [start, q] : next)
                if (q.gpa.overlaps(p.gpa))
                    ++violations_; // would map over something still mapped
            next.emplace(p.gpa.start(), p);
        }
        view_ = std::move(next);
        if (change.kind == Kind::rollback)
            ++rollbacks_;
        changes_.push_back(change);
        return {};
    }

    [[nodiscard]] std::vector<MemoryPiece> view() const
    {
        std::vector<MemoryPiece> out;
        for (const auto& [start, p] : view_)
            out.push_back(p);
        return out;
    }

    std::function<bool(const MemoryTableChange&)> refuse;
    [[nodiscard]] int violations() const { return violations_; }
    [[nodiscard]] int calls() const { return calls_; }
    [[nodiscard]] int rollbacks() const { return rollbacks_; }
    [[nodiscard]] const std::vector<MemoryTableChange>& changes() const { return changes_; }
    void clear_changes() { changes_.clear(); }

private:
    std::string name_;
    std::map<std::uint64_t, MemoryPiece> view_;
    std::vector<MemoryTableChange> changes_;
    int violations_ = 0;
    int calls_ = 0;
    int rollbacks_ = 0;
};
static_assert(MemoryListener<RecordingListener>);

struct Nameless {
    Result<void> apply(const MemoryTableChange&) { return {}; }
};
struct WrongReturn {
    std::string name() const { return "x"; }
    bool apply(const MemoryTableChange&) { return true; }
};
static_assert(!NamedListener<Nameless> && !MemoryListener<Nameless>);
static_assert(NamedListener<WrongReturn> && !AppliesTableChanges<WrongReturn>);

/// A piece in a form that compares with the dump: (gpa, object identity, offset, writable).
struct Flat {
    MemoryRange gpa;
    std::uintptr_t object = 0;
    std::uint64_t offset = 0;
    bool writable = false;
    RegionId region;
    friend bool operator==(const Flat&, const Flat&) = default;
};

std::vector<Flat> flatten(const std::vector<MemoryPiece>& pieces)
{
    std::vector<Flat> out;
    for (const MemoryPiece& p : pieces)
        out.push_back({p.gpa, p.object.identity(), p.offset.value(), p.writable, p.region});
    return out;
}

/// What the memory map dump shows the guest: every active region's mappings, adjacent ones that
/// continue each other merged (the table's pieces are maximal), by GPA.
std::vector<Flat> shown_by(const MemoryMap& map)
{
    std::vector<Flat> out;
    for (const MemoryMap::Region& r : map.regions) {
        if (!r.active)
            continue;
        for (const MemoryMap::Mapping& m : r.mappings) {
            const Flat f{m.gpa, m.object, m.file_offset, m.writable, r.id};
            if (!out.empty() && out.back().region == r.id &&
                out.back().gpa.end() == m.gpa.start() && out.back().object == m.object &&
                out.back().writable == m.writable &&
                (m.private_memory || out.back().offset + out.back().gpa.size() == m.file_offset)) {
                out.back().gpa = MemoryRange::valid_or_abort(out.back().gpa.start(), m.gpa.end());
                continue;
            }
            out.push_back(f);
        }
    }
    std::ranges::sort(out, {}, [](const Flat& f) { return f.gpa.start(); });
    return out;
}

/// Everything a rollback must restore, in comparable form. Region ids are left out (names are
/// kept): a device region whose move fails is placed back where it was under a new region id
/// (manager/detail/device_regions.hpp), which is not the listeners' concern.
struct Snapshot {
    std::string dump;
    std::vector<Flat> table;
    std::vector<MockPartition::Window> windows;
    std::vector<Flat> listener_view;
    friend bool operator==(const Snapshot&, const Snapshot&) = default;
};

std::vector<Flat> without_ids(std::vector<Flat> pieces)
{
    for (Flat& f : pieces)
        f.region = RegionId{};
    return pieces;
}

Snapshot snapshot(const Manager& m, const MockPartition& p, const RecordingListener& l)
{
    const std::string json = m.memory_map().to_json();
    return {std::regex_replace(json, std::regex(R"("id":[0-9]+,"name")"), R"("name")"),
            without_ids(flatten(m.memory_table())), p.windows(), without_ids(flatten(l.view()))};
}

// ---- the random workload: regions over each other, device BAR moves, visibility toggles ----

class Workload {
public:
    Workload(Manager& m, std::uint32_t seed) : m_(m), rng_(seed)
    {
        // Three sizes: two devices never share one range. (Equal-priority regions over the same
        // range show the earliest registered, and a device whose move fails is placed back as a
        // new region: the other one would then show, a change of topology of its own.)
        for (std::uint64_t i = 0; i < 3; ++i) {
            objects_.push_back(test::make_object(0x40000));
            devices_.push_back(must(m_.device_memory_mapper().new_region(
                "bar" + std::to_string(i), Length{0x20000 - 0x8000 * i})));
        }
    }

    /// One random control operation; its result (errors are part of the workload: overlaps,
    /// unmapping what is not there).
    Result<void> step() { return next()(); }

    /// The next random control operation, chosen but not run: running it again repeats it.
    std::function<Result<void>()> next()
    {
        switch (pick(6)) {
        case 0: { // a visibility toggle of a PAM segment, the VGA window or the F segment
            const MemoryRange r =
                x86_legacy::ranges.at(1 + pick(x86_legacy::ranges.size() - 1)).range;
            const auto v = static_cast<RamVisibility>(pick(3));
            return [this, r, v] { return m_.ram_visibility_control().set_ram_visibility(r, v); };
        }
        case 1: { // a device BAR moves (above RAM, or under the legacy area's RAM)
            static constexpr std::array<std::uint64_t, 6> places = {
                0xa0000, 0xc0000, 8 * MiB, 8 * MiB + 0x10000, 12 * MiB, 15 * MiB};
            auto* dev = &devices_.at(pick(devices_.size()));
            const Gpa at{places.at(pick(places.size()))};
            const Protection prot = pick(2) ? Protection::read_write : Protection::read_only;
            return [dev, at, prot] { return dev->map_to_guest(at, prot); };
        }
        case 2: {
            auto* dev = &devices_.at(pick(devices_.size()));
            return [dev] { return dev->unmap_from_guest(); };
        }
        case 3: { // a device's own mappings change (sub-mappings, a hole)
            auto* dev = &devices_.at(pick(devices_.size()));
            const std::uint64_t at = 0x4000 * pick(8);
            if (pick(3) == 0) {
                const Length len{0x4000 * (1 + pick(2))};
                return [dev, at, len] { return dev->unmap(Offset{at}, len); };
            }
            const DeviceMapping dm{.offset = Offset{at},
                                   .length = Length{0x4000 * (1 + pick(4))},
                                   .object = objects_.at(pick(objects_.size())),
                                   .object_offset = Offset{0x4000 * pick(8)},
                                   .protection =
                                       pick(2) ? Protection::read_write : Protection::read_only};
            return [dev, dm] { return dev->map(dm); };
        }
        case 4: { // a region of its own over others (mapped and unmapped by priority)
            if (regions_.size() < 4 && pick(2) == 0) {
                // A new region with one mapping (unmapped: it changes no table).
                const std::uint64_t start = 4 * MiB + 0x10000 * pick(64);
                const MemoryRange where = range(start, start + 0x10000 * (1 + pick(8)));
                const auto priority = static_cast<std::uint8_t>(pick(4));
                const RegionMapping first{
                    .range = range(0, 0x10000),
                    .backing = MappingBacking::file(objects_.at(pick(objects_.size())),
                                                    Offset{0x10000 * pick(3)}),
                    .writable = pick(2) == 0,
                    .policy = {}};
                return [this, where, priority, first]() -> Result<void> {
                    auto id = m_.add_region("r" + std::to_string(next_++), where, priority,
                                            MappingType::Ram);
                    if (!id)
                        return std::move(id).error();
                    regions_.push_back(*id);
                    return m_.add_mapping(*id, first);
                };
            }
            if (regions_.empty())
                return [] { return Result<void>{}; };
            const RegionId id = regions_.at(pick(regions_.size()));
            switch (pick(4)) {
            case 0: {
                const MapParams params{
                    .writable = pick(2) == 0, .executable = false, .prefetch = false};
                return [this, id, params] { return m_.map_region(id, params); };
            }
            case 1: return [this, id] { return m_.unmap_region(id); };
            case 2: {
                const RegionMapping rm{.range = range(0x4000 * pick(4), 0x4000 * (4 + pick(4))),
                                       .backing =
                                           MappingBacking::file(objects_.at(pick(objects_.size())),
                                                                Offset{0x4000 * pick(8)}),
                                       .writable = pick(2) == 0,
                                       .policy = {}};
                return [this, id, rm] { return m_.add_mapping(id, rm); };
            }
            default: {
                const MemoryRange rel = range(0x4000 * pick(2), 0x4000 * (2 + pick(2)));
                return [this, id, rel] { return m_.remove_mappings(id, rel); };
            }
            }
        }
        default: { // a region goes away
            if (regions_.empty())
                return [] { return Result<void>{}; };
            const RegionId id = regions_.at(pick(regions_.size()));
            return [this, id]() -> Result<void> {
                MEMBACKING_TRY(m_.remove_region(id));
                std::erase(regions_, id);
                return {};
            };
        }
        }
    }

private:
    std::size_t pick(std::size_t n)
    {
        return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng_);
    }

    Manager& m_;
    std::mt19937 rng_;
    std::vector<Mappable> objects_;
    std::vector<Manager::Device> devices_;
    std::vector<RegionId> regions_;
    int next_ = 0;
};

} // namespace

// ---- the table ----

TEST_CASE("the memory table lists the active memory as pieces: object, offset, permission")
{
    Manager m = legacy_guest();
    const std::vector<MemoryPiece> table = m.memory_table();
    REQUIRE_FALSE(table.empty());
    CHECK(flatten(table) == shown_by(m.memory_map()));
    // RAM is one memfd: every piece is shareable, and a GPA's offset in it is the GPA.
    for (const MemoryPiece& p : table) {
        CHECK(p.shareable());
        CHECK(p.object.native_handle() != Mappable{}.native_handle());
        CHECK(p.offset.value() == p.gpa.start());
        CHECK(p.writable);
        CHECK(p.type == MappingType::Ram);
    }
    CHECK(require_shareable(table).has_value());
    // One piece per RAM region (legacy ranges and the rest of RAM), by GPA, no gaps.
    CHECK(table.front().gpa.start() == 0);
    CHECK(table.back().gpa.end() == 4 * MiB);
    for (std::size_t i = 1; i < table.size(); ++i)
        CHECK(table[i - 1].gpa.end() == table[i].gpa.start());
    CHECK(table.size() == x86_legacy::ranges.size() + 1);

    // A read-only PAM segment shows as a read-only piece; unmapped, it is gone.
    auto control = m.ram_visibility_control();
    must(control.set_ram_visibility(x86_legacy::pam_segments[0], RamVisibility::read_only));
    auto t = m.memory_table();
    auto seg = std::ranges::find(t, x86_legacy::pam_segments[0], &MemoryPiece::gpa);
    REQUIRE(seg != t.end());
    CHECK_FALSE(seg->writable);
    must(control.set_ram_visibility(x86_legacy::pam_segments[0], RamVisibility::unmapped));
    t = m.memory_table();
    CHECK(std::ranges::find(t, x86_legacy::pam_segments[0], &MemoryPiece::gpa) == t.end());
    CHECK(flatten(t) == shown_by(m.memory_map()));
}

TEST_CASE("private memory is in the table but marked unshareable, and refused for export")
{
    Manager m = must(Manager::builder()
                         .add_backing(RamBackingRequest({range(0, MiB)}).private_memory(true))
                         .build(Length{4 * MiB}));
    const auto table = m.memory_table();
    REQUIRE(table.size() == 1);
    CHECK_FALSE(table[0].shareable());
    CHECK(table[0].object.empty());
    CHECK(table[0].object.native_handle() == Mappable{}.native_handle()); // -1 (nullptr on Windows)
    CHECK(table[0].describe() == "0x0-0x100000 (private memory, rw)");
    auto r = require_shareable(table);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::unsupported);
    CHECK(r.error().message().starts_with("guest memory at 0x0-0x100000 (region #1) is private "
                                          "memory, which cannot be shared with another process "
                                          "or device"));

    // A vhost-user-shaped listener refuses private memory: registering it fails with that error.
    struct VhostUser {
        std::string name() const { return "vhost-user-net"; }
        Result<void> apply(const MemoryTableChange& c) { return require_shareable(c.added); }
    };
    auto reg = m.add_memory_listener(std::make_shared<VhostUser>());
    REQUIRE_FALSE(reg);
    CHECK(reg.error().code() == errc::unsupported);
    CHECK(reg.error().message() ==
          "memory listener 'vhost-user-net' (#1) refused the initial table");
}

// ---- the listener contract ----

TEST_CASE("a listener gets the table at registration, then each change, in whole pieces")
{
    Manager m = legacy_guest();
    auto l = std::make_shared<RecordingListener>();
    const ListenerId id = must(m.add_memory_listener(l));
    REQUIRE(l->changes().size() == 1);
    CHECK(l->changes()[0].kind == Kind::initial);
    CHECK(l->view() == m.memory_table());
    l->clear_changes();

    // A 64 KiB BAR appears above RAM.
    Mappable obj = test::make_object(0x10000);
    auto bar = must(m.device_memory_mapper().new_region("bar0", Length{0x10000}));
    must(bar.map({.offset = Offset{0},
                  .length = Length{0x10000},
                  .object = obj,
                  .object_offset = Offset{0},
                  .protection = Protection::read_write}));
    CHECK(l->changes().empty()); // not visible yet: the table does not change
    must(bar.map_to_guest(Gpa{8 * MiB}, Protection::read_write));
    REQUIRE(l->changes().size() == 1);
    CHECK(l->changes()[0].removed.empty());
    REQUIRE(l->changes()[0].added.size() == 1);
    CHECK(l->changes()[0].added[0].gpa == range(8 * MiB, 8 * MiB + 0x10000));
    CHECK(l->changes()[0].added[0].object == obj);
    l->clear_changes();

    // A permission change: the piece removed and the same range added read-only, in one change.
    must(bar.map_to_guest(Gpa{8 * MiB}, Protection::read_only));
    REQUIRE(l->changes().size() == 1);
    REQUIRE(l->changes()[0].removed.size() == 1);
    REQUIRE(l->changes()[0].added.size() == 1);
    CHECK(l->changes()[0].removed[0].writable);
    CHECK_FALSE(l->changes()[0].added[0].writable);
    CHECK(l->changes()[0].added[0].gpa == l->changes()[0].removed[0].gpa);
    CHECK(l->changes()[0].added[0].object == obj);
    must(bar.map_to_guest(Gpa{8 * MiB}, Protection::read_write));
    l->clear_changes();

    // A mapping replaced in the middle of a piece: the old piece is removed whole, then the
    // remaining parts and the new mapping are added (VFIO unmaps exactly what it mapped).
    Mappable other = test::make_object(0x10000);
    must(bar.map({.offset = Offset{0x4000},
                  .length = Length{0x4000},
                  .object = other,
                  .object_offset = Offset{0x8000},
                  .protection = Protection::read_write}));
    REQUIRE(l->changes().size() == 1);
    const MemoryTableChange& c = l->changes()[0];
    CHECK(c.kind == Kind::update);
    REQUIRE(c.removed.size() == 1);
    CHECK(c.removed[0].gpa == range(8 * MiB, 8 * MiB + 0x10000));
    REQUIRE(c.added.size() == 3);
    CHECK(c.added[0].gpa == range(8 * MiB, 8 * MiB + 0x4000));
    CHECK(c.added[0].offset == Offset{0});
    CHECK(c.added[1].gpa == range(8 * MiB + 0x4000, 8 * MiB + 0x8000));
    CHECK(c.added[1].object == other);
    CHECK(c.added[1].offset == Offset{0x8000});
    CHECK(c.added[2].gpa == range(8 * MiB + 0x8000, 8 * MiB + 0x10000));
    CHECK(c.added[2].offset == Offset{0x8000});
    CHECK(l->view() == m.memory_table());
    l->clear_changes();

    // Putting the original memory back merges the three into one piece again.
    must(bar.map({.offset = Offset{0x4000},
                  .length = Length{0x4000},
                  .object = obj,
                  .object_offset = Offset{0x4000},
                  .protection = Protection::read_write}));
    REQUIRE(l->changes().size() == 1);
    CHECK(l->changes()[0].removed.size() == 3);
    REQUIRE(l->changes()[0].added.size() == 1);
    CHECK(l->changes()[0].added[0].gpa == range(8 * MiB, 8 * MiB + 0x10000));
    l->clear_changes();

    // A region of several mappings changes permission one mapping at a time: one change each,
    // the last leaving one read-only piece.
    must(bar.map_to_guest(Gpa{8 * MiB}, Protection::read_only));
    CHECK(l->changes().size() == 3);
    const auto now = l->view();
    const auto piece =
        std::ranges::find(now, 8 * MiB, [](const MemoryPiece& q) { return q.gpa.start(); });
    REQUIRE(piece != now.end());
    CHECK(piece->gpa == range(8 * MiB, 8 * MiB + 0x10000));
    CHECK_FALSE(piece->writable);
    CHECK(l->view() == m.memory_table());
    l->clear_changes();

    // Unregistered: no more calls, and the manager lets go of it.
    must(m.remove_memory_listener(id));
    must(bar.unmap_from_guest());
    CHECK(l->changes().empty());
    CHECK(l.use_count() == 1);
    CHECK(test::error_of(m.remove_memory_listener(id)) == errc::not_found);
    CHECK(l->violations() == 0);
}

TEST_CASE("a listener's refusal rolls the whole operation back, and the caller gets its error")
{
    Manager m = legacy_guest();
    auto p = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, p));
    auto first = std::make_shared<RecordingListener>("vhost-user-blk");
    auto vfio = std::make_shared<RecordingListener>("vfio-container");
    must(m.add_memory_listener(first));
    must(m.add_memory_listener(vfio));
    auto mem = m.guest_memory();
    REQUIRE(mem.write_plain<std::uint32_t>(Gpa{0xc0000}, 0x12345678).has_value());

    // Unmapping a PAM segment: partitions unmap first, then the VA side (where the listeners are
    // called). The VFIO container refuses: the other listener, the VA mapper and the partition
    // all get their state back.
    const Snapshot before = snapshot(m, *p, *vfio);
    const auto first_view = first->view();
    vfio->refuse = [](const MemoryTableChange& c) { return c.kind == Kind::update; };
    auto r = m.ram_visibility_control().set_ram_visibility(x86_legacy::pam_segments[0],
                                                           RamVisibility::unmapped);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::resource_exhausted); // the listener's own code
    const std::string text = r.error().full_message();
    CHECK(text.find("memory listener 'vfio-container' (#2) refused the change of "
                    "0xc0000-0xc4000: no IOMMU entries left") != std::string::npos);
    CHECK(snapshot(m, *p, *vfio) == before);
    CHECK(first->view() == first_view);
    CHECK(first->rollbacks() == 1); // it accepted, then got the inverse
    CHECK(mem.read_plain<std::uint32_t>(Gpa{0xc0000}).value_or(0) == 0x12345678);

    // Accepted, it goes through.
    vfio->refuse = nullptr;
    must(m.ram_visibility_control().set_ram_visibility(x86_legacy::pam_segments[0],
                                                       RamVisibility::unmapped));
    CHECK(vfio->view() == m.memory_table());
    CHECK(first->view() == m.memory_table());
    CHECK(first->violations() == 0);
    CHECK(vfio->violations() == 0);
}

TEST_CASE("a listener that cuts itself off is dropped and the operation goes on")
{
    Manager m = legacy_guest();
    auto stuck = std::make_shared<RecordingListener>("dead-client");
    auto live = std::make_shared<RecordingListener>("live");
    const ListenerId stuck_id = must(m.add_memory_listener(stuck));
    must(m.add_memory_listener(live));
    struct CutOff {
        std::string name() const { return "timed-out"; }
        Result<void> apply(const MemoryTableChange& c)
        {
            if (c.kind == Kind::initial)
                return {};
            return Error(make_error_code(listener_errc::cut_off), "no answer within 1 s");
        }
    };
    auto timed_out = std::make_shared<CutOff>();
    must(m.add_memory_listener(timed_out));
    CHECK(timed_out.use_count() == 2);
    must(m.ram_visibility_control().set_ram_visibility(x86_legacy::pam_segments[1],
                                                       RamVisibility::unmapped));
    CHECK(timed_out.use_count() == 1); // dropped
    CHECK(live->view() == m.memory_table());
    CHECK(m.core().memory_listeners().size() == 2);

    // A listener that fails a rollback is dropped too, and the rollback completes.
    stuck->refuse = [](const MemoryTableChange& c) { return c.kind == Kind::rollback; };
    live->refuse = [](const MemoryTableChange& c) { return c.kind == Kind::update; };
    const auto table = m.memory_table();
    auto r = m.ram_visibility_control().set_ram_visibility(x86_legacy::pam_segments[2],
                                                           RamVisibility::unmapped);
    REQUIRE_FALSE(r);
    CHECK(m.memory_table() == table);
    CHECK(test::error_of(m.remove_memory_listener(stuck_id)) == errc::not_found);
    CHECK(m.core().memory_listeners().size() == 1);
}

/// A two-phase listener (AwaitsTableChanges) that writes "<name>.apply" / "<name>.await" into a
/// shared log, so a test sees the order in which the manager calls the phases.
class TwoPhaseListener {
public:
    TwoPhaseListener(std::string name, std::vector<std::string>& log)
        : name_(std::move(name)), log_(&log)
    {}
    [[nodiscard]] std::string name() const { return name_; }
    Result<void> apply(const MemoryTableChange& change)
    {
        log_->push_back(name_ + (change.kind == Kind::rollback ? ".rollback" : ".apply"));
        if (refuse_updates && change.kind == Kind::update)
            return make_error(errc::resource_exhausted, "no IOMMU entries left");
        ++pending_;
        return {};
    }
    Result<void> await_applied()
    {
        log_->push_back(name_ + ".await");
        if (pending_ != 1)
            ++violations; // awaited without exactly one apply since the last await
        pending_ = 0;
        if (fail_await)
            return Error(make_error_code(listener_errc::cut_off), "no acknowledgement");
        return {};
    }
    bool refuse_updates = false;
    bool fail_await = false;
    int violations = 0;

private:
    std::string name_;
    std::vector<std::string>* log_;
    int pending_ = 0;
};
static_assert(AwaitsTableChanges<TwoPhaseListener>);
static_assert(!AwaitsTableChanges<RecordingListener>);

TEST_CASE("two-phase listeners: every one is sent a step before any is awaited")
{
    Manager m = legacy_guest();
    std::vector<std::string> log;
    auto a = std::make_shared<TwoPhaseListener>("a", log);
    auto b = std::make_shared<TwoPhaseListener>("b", log);
    must(m.add_memory_listener(a));
    must(m.add_memory_listener(b));
    CHECK(log == std::vector<std::string>{"a.apply", "a.await", "b.apply", "b.await"});

    // One step (a PAM segment unmapped): both sent, then both awaited.
    log.clear();
    auto control = m.ram_visibility_control();
    must(control.set_ram_visibility(x86_legacy::pam_segments[0], RamVisibility::unmapped));
    CHECK(log == std::vector<std::string>{"a.apply", "b.apply", "a.await", "b.await"});

    // b refuses: a (which was sent the step) is awaited first, then sent the inverse and awaited
    // again; the operation fails with b's error and changes nothing.
    log.clear();
    b->refuse_updates = true;
    const auto table = m.memory_table();
    auto r = control.set_ram_visibility(x86_legacy::pam_segments[1], RamVisibility::unmapped);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::resource_exhausted);
    CHECK(m.memory_table() == table);
    CHECK(log ==
          std::vector<std::string>{"a.apply", "b.apply", "a.await", "a.rollback", "a.await"});
    b->refuse_updates = false;

    // An await that fails drops that listener (it cannot refuse); the operation goes on.
    log.clear();
    a->fail_await = true;
    must(control.set_ram_visibility(x86_legacy::pam_segments[1], RamVisibility::unmapped));
    CHECK(log == std::vector<std::string>{"a.apply", "b.apply", "a.await", "b.await"});
    CHECK(m.core().memory_listeners().size() == 1);
    CHECK(a.use_count() == 1);
    CHECK(a->violations == 0);
    CHECK(b->violations == 0);
}

// ---- a random sequence of 1,000 operations ----

TEST_CASE("after each of 1,000 random operations a listener sees exactly what the map shows")
{
    Manager m = legacy_guest();
    auto p = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, p));
    auto l = std::make_shared<RecordingListener>();
    must(m.add_memory_listener(l));
    Workload work(m, 12);
    int failed = 0;
    for (int i = 0; i < 1000; ++i) {
        const Snapshot before = snapshot(m, *p, *l);
        const auto r = work.step();
        if (!r) {
            ++failed;
            const Snapshot after = snapshot(m, *p, *l);
            CHECK(after == before); // a failed operation changes nothing
            if (!(after == before))
                MESSAGE(r.error().full_message());
        }
        const auto table = flatten(m.memory_table());
        REQUIRE(flatten(l->view()) == table);
        REQUIRE(shown_by(m.memory_map()) == table);
    }
    MESSAGE("calls " << l->calls() << ", failed " << failed);
    CHECK(l->violations() == 0);
    CHECK(l->calls() > 300); // the workload does change the table
    CHECK(failed < 700);     // and most operations succeed
}

TEST_CASE("a refusing listener at every step of 1,000 rolls each one back")
{
    Manager m = legacy_guest();
    auto p = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, p));
    auto l = std::make_shared<RecordingListener>("accepting");
    auto refusing = std::make_shared<RecordingListener>("refusing");
    must(m.add_memory_listener(l));
    must(m.add_memory_listener(refusing));
    auto mem = m.guest_memory();
    Workload work(m, 34);
    int refused = 0;
    int accepted_again = 0;
    for (int i = 0; i < 1000; ++i) {
        const Snapshot before = snapshot(m, *p, *l);
        // Guest-visible contents too: one word at the start of every piece.
        std::vector<std::optional<std::uint64_t>> words;
        for (const MemoryPiece& piece : m.memory_table())
            words.push_back(test::value_of(mem.read_plain<std::uint64_t>(Gpa{piece.gpa.start()})));
        const auto op = work.next();
        refusing->refuse = [](const MemoryTableChange& c) { return c.kind == Kind::update; };
        const auto r = op();
        refusing->refuse = nullptr;
        if (r) {
            // Nothing for a listener to refuse: the table did not change.
            REQUIRE(without_ids(flatten(m.memory_table())) == before.table);
            continue;
        }
        REQUIRE(snapshot(m, *p, *l) == before);
        std::size_t k = 0;
        for (const MemoryPiece& piece : m.memory_table())
            CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{piece.gpa.start()})) ==
                  words.at(k++));
        if (r.error().full_message().find("memory listener 'refusing' (#2) refused") ==
            std::string::npos)
            continue; // the operation was bad input anyway
        CHECK(r.error().code() == errc::resource_exhausted);
        ++refused;
        // Accepted this time, the same operation goes through, or fails for a reason of its own
        // (a device move refused while leaving its old place may then find its new place
        // taken), and then changes nothing either.
        if (auto again = op(); !again) {
            CHECK(again.error().full_message().find("refused") == std::string::npos);
            REQUIRE(snapshot(m, *p, *l) == before);
            continue;
        }
        ++accepted_again;
        const auto table = flatten(m.memory_table());
        REQUIRE(flatten(l->view()) == table);
        REQUIRE(flatten(refusing->view()) == table);
        REQUIRE(shown_by(m.memory_map()) == table);
    }
    MESSAGE("refused " << refused << ", accepted again " << accepted_again);
    CHECK(refused > 200);
    CHECK(accepted_again > 150);
    CHECK(l->violations() == 0);
    CHECK(refusing->violations() == 0);
}

// ---- concurrency ----

TEST_CASE("listeners come and go on other threads while control calls run")
{
    Manager m = legacy_guest();
    auto control = m.ram_visibility_control();
    std::latch start(3);
    std::atomic<bool> done = false;
    std::atomic<int> toggles = 0;
    std::atomic<int> violations = 0;
    std::atomic<int> saw_changes = 0;
    auto resident = std::make_shared<RecordingListener>("resident");
    must(m.add_memory_listener(resident));
    std::thread toggler([&] {
        start.arrive_and_wait();
        // 300 toggles, and on until the other threads' listeners have seen 20 changes (a bound
        // keeps a broken fan-out from spinning forever).
        for (int i = 0; i < 300 || (saw_changes < 20 && i < 100000); ++i) {
            must(control.set_ram_visibility(
                x86_legacy::pam_segments.at(static_cast<std::size_t>(i) % 12),
                static_cast<RamVisibility>((i / 12) % 3)));
            ++toggles;
        }
        done = true;
    });
    auto churn = [&](const std::string& name) {
        start.arrive_and_wait();
        int rounds = 0;
        while (!done || rounds < 20) {
            auto l = std::make_shared<RecordingListener>(name);
            const ListenerId id = must(m.add_memory_listener(l));
            // Registered across at least one control call of the other thread (no sleep: it
            // waits for that call to be counted).
            const int seen = toggles;
            while (!done && toggles == seen)
                std::this_thread::yield();
            must(m.remove_memory_listener(id));
            // Removed: the manager holds it no more, so it is never called again.
            if (l.use_count() != 1)
                ++violations;
            violations += l->violations();
            if (l->calls() > 1)
                ++saw_changes;
            ++rounds;
        }
    };
    std::thread a([&] { churn("a"); });
    std::thread b([&] { churn("b"); });
    toggler.join();
    a.join();
    b.join();
    CHECK(violations == 0);
    CHECK(saw_changes >= 20);
    CHECK(resident->violations() == 0);
    CHECK(resident->view() == m.memory_table());
    must(m.remove_memory_listener(ListenerId{1}));
    CHECK(m.core().memory_listeners().empty());
}
