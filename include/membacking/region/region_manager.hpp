/**
 * @file region/region_manager.hpp
 * Layer: region (includes base/, detail/, va/mappable.hpp and region/).
 *
 * RegionManager: the registry of regions and their mappings, and the one place that turns a
 * topology change into sink events. It knows nothing of how a sink maps anything.
 *
 * Semantics are OpenVMM's (reference inventory §3) with its quirks fixed (§12):
 * - A failed map leaves the region unmapped, so a retry really retries.
 * - A sink failure anywhere (VA or partition) is rolled back and returned, never a panic.
 * - Mapping offsets are validated against the region when the mapping is added.
 * - Overlapping mappings in a region are an atomic replacement (the new mapping replaces the
 *   covered parts of old ones, splitting them), not an assertion. remove_mappings splits too.
 * - Partitions map a region writable only if the region and every mapping in it are writable.
 * - Private memory is never discarded as a side effect: disabling a region that holds it for any
 *   reason but its removal, or replacing it inside a visible region, is an error.
 *
 * Read-only caps (write-only RAM, i440FX PAM WE=1 RE=0): a region may *cap* what shows through
 * its range at read-only (set_read_only_cap). The resolver still decides alone which region is
 * visible where; the cap decides only how writable the visible ones are exposed: a region of
 * lower priority than a capping region it overlaps is exposed (VA mappers and partitions)
 * read-only, whatever its own params say (exposed_params). Under the nested rule such a region
 * lies inside the capping one. Write-only RAM is an unmapped RAM region with its cap set, so
 * what lies below shows through read-only and guest writes exit to the VMM. A cap is an overlay
 * of the region manager, not a resolver question: resolvers stay geometry only, and the change
 * is applied with the same in-place permission change (change_view) and the same undo log as a
 * remap with other params.
 *
 * Ordering: enabling goes to the VA side (every mapping) first, then partitions; disabling goes
 * to partitions first, then the VA side. Making partition permissions stricter happens before the
 * VA change that needs it; relaxing them happens after.
 *
 * Not thread-safe by itself: the GuestMemoryManager serialises calls under its control lock.
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/region/event_sink.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/region/mapping_list.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/region/resolver.hpp>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace membacking {

template <RegionResolver Resolver, RegionEventSink Sink>
class RegionManager {
public:
    struct Region {
        RegionId id;
        std::string name;
        MemoryRange range;
        std::uint8_t priority = 0;
        MappingType type = MappingType::Ram;
        std::optional<MapParams> map_params; ///< set while mapped (visible or shadowed)
        /// Lower-priority regions showing through this one's range are exposed read-only.
        bool read_only_cap = false;
        std::vector<MemoryRange> visible; ///< segments currently active; empty if inactive
        MappingList mappings;

        [[nodiscard]] bool active() const noexcept { return !visible.empty(); }
        [[nodiscard]] bool mapped() const noexcept { return map_params.has_value(); }
        /// "'vga' (0xa0000-0xc0000)", the form every message uses.
        [[nodiscard]] std::string describe() const
        {
            return "'" + name + "' (" + range.to_string() + ")";
        }
    };

    explicit RegionManager(Sink& sink) : sink_(sink) {}
    RegionManager(const RegionManager&) = delete;
    RegionManager& operator=(const RegionManager&) = delete;

    /// Registers an unmapped region. errc::invalid_range for an empty range, errc::overlap if it
    /// breaks the resolver's overlap rules (the message names both regions).
    Result<RegionId> add_region(std::string_view name, MemoryRange range, std::uint8_t priority,
                                MappingType type)
    {
        MEMBACKING_TRY(register_region(RegionId{next_id_}, name, range, priority, type));
        return RegionId{next_id_++};
    }

    /// Registers, unmapped, a region removed earlier under its old id, so that it takes back its
    /// place among regions of equal priority on an identical range (the earliest registered,
    /// the lowest id, wins there): the undo of a removal, which must leave the topology exactly
    /// as before. `id` must be one this manager handed out and is not using.
    Result<void> restore_region(RegionId id, std::string_view name, MemoryRange range,
                                std::uint8_t priority, MappingType type)
    {
        MEMBACKING_CHECK(id.value < next_id_ && !regions_.contains(id),
                         "RegionManager::restore_region of an id in use or never handed out");
        return register_region(id, name, range, priority, type);
    }

    /// Maps a region. Same params again: no-op. Different params on a visible region: an
    /// unmap/map cycle. Under a visible higher-priority region: records the params only.
    Result<void> map_region(RegionId id, const MapParams& params)
    {
        Region* r = find_mutable(id);
        if (r == nullptr)
            return no_such_region(id);
        if (r->map_params == params)
            return {};
        if (r->active()) {
            detail::UndoLog undo;
            MEMBACKING_TRY_CONTEXT(change_view(*r, exposed_params(*r, *r->map_params),
                                               exposed_params(*r, params), undo),
                                   "failed to remap region " + r->describe());
            undo.commit();
            r->map_params = params;
            return {};
        }
        if (r->mapped()) {
            r->map_params = params; // shadowed: becomes visible with these params later
            return {};
        }
        Transition t;
        resolver_.plan_map(id, t);
        MEMBACKING_TRY_CONTEXT(apply(t, Override{id, params}, std::nullopt),
                               "failed to map region " + r->describe());
        resolver_.set_mapped(id, true);
        r->map_params = params;
        return {};
    }

    /// Unmaps a region; the best mapped regions under it reappear. Unmapped already: no-op.
    Result<void> unmap_region(RegionId id)
    {
        Region* r = find_mutable(id);
        if (r == nullptr)
            return no_such_region(id);
        if (!r->mapped())
            return {};
        if (r->active()) {
            Transition t;
            resolver_.plan_unmap(id, t);
            MEMBACKING_TRY_CONTEXT(apply(t, std::nullopt, std::nullopt),
                                   "failed to unmap region " + r->describe());
        }
        resolver_.set_mapped(id, false);
        r->map_params.reset();
        return {};
    }

    /// Unmaps (if needed) and forgets a region. Its private memory, if any, is discarded.
    Result<void> remove_region(RegionId id)
    {
        Region* r = find_mutable(id);
        if (r == nullptr)
            return no_such_region(id);
        detail::UndoLog undo;
        if (r->read_only_cap) { // what showed through it read-only is writable again
            MEMBACKING_TRY(set_read_only_cap(id, false));
            undo.push([this, id] { return set_read_only_cap(id, true); });
        }
        if (r->active()) {
            Transition t;
            resolver_.plan_unmap(id, t);
            // Discarding private memory cannot be undone, so it must be the last step. If other
            // regions have to reappear after it, their failure would leave the region removable
            // only with its memory already gone: refuse instead.
            if (!t.activate.empty() && holds_private(*r, r->range))
                return make_error(errc::conflict,
                                  "removing region " + r->describe() +
                                      " discards its private memory, and the regions under it "
                                      "would have to reappear after that; unmap them first");
            MEMBACKING_TRY_CONTEXT(apply(t, std::nullopt, id),
                                   "failed to remove region " + r->describe());
        }
        undo.commit();
        if (r->mapped())
            resolver_.set_mapped(id, false);
        resolver_.erase(id);
        regions_.erase(id);
        return {};
    }

    /// Sets or clears region id's read-only cap (see the file comment). The visible regions of
    /// lower priority that overlap it change permissions in place (no unmapped window), all or
    /// nothing; their params and the region's own mapping state are unchanged. Same value: no-op.
    Result<void> set_read_only_cap(RegionId id, bool cap)
    {
        Region* r = find_mutable(id);
        if (r == nullptr)
            return no_such_region(id);
        if (r->read_only_cap == cap)
            return {};
        struct Affected {
            const Region* region;
            MapParams before;
        };
        std::vector<Affected> affected;
        for (const auto& [other_id, o] : regions_)
            if (o.active() && o.priority < r->priority && o.range.overlaps(r->range))
                affected.push_back({&o, exposed_params(o, *o.map_params)});
        detail::UndoLog undo;
        record_cap(*r, cap); // exposed_params now answers with the new cap
        undo.push([this, r, cap]() -> Result<void> {
            record_cap(*r, !cap);
            return {};
        });
        for (const Affected& a : affected)
            MEMBACKING_TRY_CONTEXT(
                change_view(*a.region, a.before, exposed_params(*a.region, *a.region->map_params),
                            undo),
                std::string(cap ? "failed to cap region " : "failed to uncap region ") +
                    a.region->describe() + " under " + r->describe());
        undo.commit();
        return {};
    }

    /// Places a mapping at m.range (relative to the region). It replaces the covered parts of any
    /// mappings already there. If the region is visible, VA mappers see it before this returns.
    Result<void> add_mapping(RegionId id, const RegionMapping& m)
    {
        Region* r = find_mutable(id);
        if (r == nullptr)
            return no_such_region(id);
        MEMBACKING_TRY(validate_mapping_range(*r, m.range));
        if (m.backing.is_private() && !m.writable)
            return make_error(errc::invalid_argument, "private memory mapping " +
                                                          m.range.to_string() + " in region " +
                                                          r->describe() + " must be writable");

        const MappingEdit edit = r->mappings.replace_edit(m);
        if (r->active() && edit.removes_private)
            return make_error(errc::conflict, "replacing private memory at " + m.range.to_string() +
                                                  " in visible region " + r->describe() +
                                                  " would discard it");
        const Counts after = r->mappings.counts_after(edit);
        if (after.private_memory > 0 && after.readonly > 0)
            return make_error(errc::conflict,
                              "region " + r->describe() +
                                  " cannot hold private memory and read-only mappings together");

        if (r->active()) {
            detail::UndoLog undo;
            const MapParams params = exposed_params(*r, *r->map_params);
            const bool was_writable = partition_writable(*r, params, counts_of(*r));
            const bool now_writable = partition_writable(*r, params, after);
            if (was_writable && !now_writable)
                MEMBACKING_TRY(repartition(*r, {params, counts_of(*r)}, {params, after}, undo));
            const MemoryRange abs = absolute(*r, m.range);
            for (const MemoryRange& seg : r->visible) {
                const MemoryRange clip = abs.intersection(seg);
                if (clip.empty())
                    continue;
                std::vector<ActiveMapping> before = active_in(*r, clip, params);
                MEMBACKING_TRY_CONTEXT(sink_.add_mapping(to_active(*r, m, params).slice(clip)),
                                       "failed to add mapping " + clip.to_string() + " to region " +
                                           r->describe());
                // Undoing a private mapping drops it first: the VA side refuses to replace private
                // memory implicitly, and here discarding it is the point.
                undo.push([this, clip, before = std::move(before),
                           drop = m.backing.is_private()]() -> Result<void> {
                    if (drop)
                        MEMBACKING_TRY(sink_.remove_mappings(clip));
                    return restore(clip, before);
                });
            }
            if (!was_writable && now_writable)
                MEMBACKING_TRY(repartition(*r, {params, counts_of(*r)}, {params, after}, undo));
            undo.commit();
        }
        r->mappings.apply(edit);
        return {};
    }

    /// Removes whatever is mapped in range_in_region, splitting mappings at its edges (munmap
    /// semantics). If the region is visible, VA mappers drop it before this returns.
    Result<void> remove_mappings(RegionId id, const MemoryRange& range_in_region)
    {
        Region* r = find_mutable(id);
        if (r == nullptr)
            return no_such_region(id);
        if (range_in_region.empty())
            return {};
        MEMBACKING_TRY(validate_mapping_range(*r, range_in_region));
        const MappingEdit edit = r->mappings.remove_edit(range_in_region);
        if (edit.erase.empty())
            return {};

        if (r->active()) {
            detail::UndoLog undo;
            const MapParams params = exposed_params(*r, *r->map_params);
            const Counts after = r->mappings.counts_after(edit);
            const MemoryRange abs = absolute(*r, range_in_region);
            for (const MemoryRange& seg : r->visible) {
                std::vector<ActiveMapping> before = active_in(*r, abs.intersection(seg), params);
                if (before.empty())
                    continue;
                // Only the extent that holds mappings: the VA side has nothing to do elsewhere.
                const MemoryRange clip = MemoryRange::valid_or_abort(before.front().gpa.start(),
                                                                     before.back().gpa.end());
                MEMBACKING_TRY_CONTEXT(sink_.remove_mappings(clip),
                                       "failed to remove mappings " + clip.to_string() +
                                           " from region " + r->describe());
                undo.push([this, clip, before = std::move(before)]() -> Result<void> {
                    return restore(clip, before);
                });
            }
            // Removing can only make partitions more permissive, so that happens last.
            if (!partition_writable(*r, params, counts_of(*r)) &&
                partition_writable(*r, params, after))
                MEMBACKING_TRY(repartition(*r, {params, counts_of(*r)}, {params, after}, undo));
            undo.commit();
        }
        r->mappings.apply(edit);
        return {};
    }

    // ---- queries ----

    [[nodiscard]] const Region* find(RegionId id) const
    {
        auto it = regions_.find(id);
        return it == regions_.end() ? nullptr : &it->second;
    }

    /// All regions in registration order.
    [[nodiscard]] const std::map<RegionId, Region>& regions() const noexcept { return regions_; }

    /// Every mapping the VA side should hold right now, in region registration order.
    [[nodiscard]] std::vector<ActiveMapping> active_mappings() const
    {
        std::vector<ActiveMapping> out;
        for (const auto& [id, r] : regions_)
            for (const MemoryRange& seg : r.visible) {
                auto part = active_in(r, seg, exposed_params(r, *r.map_params));
                out.insert(out.end(), part.begin(), part.end());
            }
        return out;
    }

    /// Every window partitions should map right now.
    [[nodiscard]] std::vector<RegionActivation> active_regions() const
    {
        std::vector<RegionActivation> out;
        for (const auto& [id, r] : regions_)
            for (const MemoryRange& seg : r.visible)
                out.push_back(activation(r, seg, exposed_params(r, *r.map_params), counts_of(r)));
        return out;
    }

    /// What VA mappers and partitions get of region r mapped with `params`: the same, read-only
    /// if a capping region of higher priority overlaps r.
    [[nodiscard]] MapParams exposed_params(const Region& r, MapParams params) const
    {
        if (!params.writable)
            return params;
        for (const RegionId id : capping_) { // usually none; a PC has at most 13 PAM ranges
            const Region& c = regions_.at(id);
            if (c.priority > r.priority && c.range.overlaps(r.range)) {
                params.writable = false;
                break;
            }
        }
        return params;
    }

    [[nodiscard]] const Resolver& resolver() const noexcept { return resolver_; }

private:
    struct Override {
        RegionId id;
        MapParams params;
    };

    using Counts = MappingList::Counts;
    using MappingEdit = MappingList::Edit;

    Result<void> register_region(RegionId id, std::string_view name, MemoryRange range,
                                 std::uint8_t priority, MappingType type)
    {
        if (range.empty())
            return make_error(errc::invalid_range, "memory region '" + std::string(name) + "' (" +
                                                       range.to_string() + ") is empty");
        const ResolverEntry entry{id, range, priority};
        if (auto clash = resolver_.find_conflict(entry))
            return make_error(errc::overlap, "memory region '" + std::string(name) + "' (" +
                                                 range.to_string() +
                                                 ") overlaps with existing region " +
                                                 regions_.at(*clash).describe());
        resolver_.insert(entry);
        regions_.emplace(id, Region{.id = id,
                                    .name = std::string(name),
                                    .range = range,
                                    .priority = priority,
                                    .type = type,
                                    .map_params = std::nullopt,
                                    .read_only_cap = false,
                                    .visible = {},
                                    .mappings = {}});
        return {};
    }

    static Error no_such_region(RegionId id)
    {
        return make_error(errc::not_found, "no memory region with id " + std::to_string(id.value));
    }

    /// The cap flag and the list of capping regions, which exposed_params scans instead of
    /// every region (it runs for each region a change touches).
    void record_cap(Region& r, bool cap)
    {
        r.read_only_cap = cap;
        if (cap)
            capping_.push_back(r.id);
        else
            capping_.erase(std::find(capping_.begin(), capping_.end(), r.id));
    }

    Region* find_mutable(RegionId id)
    {
        auto it = regions_.find(id);
        return it == regions_.end() ? nullptr : &it->second;
    }

    static Result<void> validate_mapping_range(const Region& r, const MemoryRange& rel)
    {
        if (rel.empty())
            return make_error(errc::invalid_range, "empty mapping range " + rel.to_string() +
                                                       " in region " + r.describe());
        if (rel.end() > r.range.size())
            return make_error(errc::out_of_range,
                              "mapping range " + rel.to_string() + " does not fit in region " +
                                  r.describe() + " of size " + MemoryRange::hex(r.range.size()));
        return {};
    }

    static MemoryRange absolute(const Region& r, const MemoryRange& rel)
    {
        return MemoryRange::valid_or_abort(r.range.start() + rel.start(),
                                           r.range.start() + rel.end());
    }

    static bool partition_writable(const Region&, const MapParams& params, const Counts& c)
    {
        return params.writable && c.readonly == 0;
    }

    static Counts counts_of(const Region& r) { return r.mappings.counts(); }

    static RegionActivation activation(const Region& r, const MemoryRange& seg,
                                       const MapParams& params, const Counts& c)
    {
        MapParams p = params;
        p.writable = partition_writable(r, params, c);
        return {seg, p, r.id, r.type};
    }

    static ActiveMapping to_active(const Region& r, const RegionMapping& m, const MapParams& p)
    {
        return {absolute(r, m.range), m.backing, m.writable && p.writable, r.type, m.policy, r.id};
    }

    /// r's mappings clipped to the absolute range `clip`, as the VA side sees them.
    static std::vector<ActiveMapping> active_in(const Region& r, const MemoryRange& clip,
                                                const MapParams& params)
    {
        std::vector<ActiveMapping> out;
        if (clip.empty())
            return out;
        const MemoryRange rel = clip.shifted_down(r.range.start());
        r.mappings.for_each_overlapping(rel, [&](const RegionMapping& m) {
            out.push_back(to_active(r, m, params).slice(absolute(r, m.range).intersection(clip)));
        });
        return out;
    }

    static bool holds_private(const Region& r, const MemoryRange& clip)
    {
        if (r.mappings.counts().private_memory == 0)
            return false;
        bool found = false;
        r.mappings.for_each_overlapping(
            clip.shifted_down(r.range.start()),
            [&](const RegionMapping& m) { found = found || m.backing.is_private(); });
        return found;
    }

    /// Puts the VA side of `clip` back to exactly `before` (used by undo steps). The old pieces
    /// go back first (add_mapping replaces in place, so they are never absent), then the parts of
    /// `clip` that held nothing before are cleared.
    Result<void> restore(const MemoryRange& clip, const std::vector<ActiveMapping>& before)
    {
        std::uint64_t cursor = clip.start();
        for (const ActiveMapping& m : before) {
            MEMBACKING_TRY(sink_.add_mapping(m));
            if (m.gpa.start() > cursor)
                MEMBACKING_TRY(
                    sink_.remove_mappings(MemoryRange::valid_or_abort(cursor, m.gpa.start())));
            cursor = m.gpa.end();
        }
        if (cursor < clip.end())
            MEMBACKING_TRY(sink_.remove_mappings(MemoryRange::valid_or_abort(cursor, clip.end())));
        return {};
    }

    /// The parts of `pieces` (sorted by GPA, disjoint) that lie inside `clip`.
    static std::vector<ActiveMapping> clipped(const std::vector<ActiveMapping>& pieces,
                                              const MemoryRange& clip)
    {
        std::vector<ActiveMapping> out;
        for (const ActiveMapping& p : pieces)
            if (p.gpa.overlaps(clip))
                out.push_back(p.slice(p.gpa.intersection(clip)));
        return out;
    }

    /// Calls f(gap) for each maximal part of `seg` that no range of `covered` (sorted, disjoint)
    /// covers, in address order.
    template <class F>
    static void for_each_gap(const MemoryRange& seg, const std::vector<MemoryRange>& covered, F&& f)
    {
        std::uint64_t cursor = seg.start();
        for (const MemoryRange& c : covered) {
            if (c.end() <= cursor || !c.overlaps(seg))
                continue;
            if (c.start() > cursor)
                f(MemoryRange::valid_or_abort(cursor, c.start()));
            cursor = c.end();
            if (cursor >= seg.end())
                return;
        }
        if (cursor < seg.end())
            f(MemoryRange::valid_or_abort(cursor, seg.end()));
    }

    /// A segment that a transition makes visible, with what it brings.
    struct Incoming {
        const Region* region;
        RegionActivation window;             ///< what partitions get
        std::vector<ActiveMapping> mappings; ///< what VA mappers get, by GPA
    };

    /// What a visible region exposes changes in place, from `old_params` to `params` (both as
    /// exposed_params gives them): its mappings' permissions change where they are (the VA side
    /// replaces or re-protects them with no unmapped window, and private memory keeps its
    /// contents), and partitions are re-mapped only if what they see changes. Stricter
    /// partitions come before the VA change, more permissive ones after it. The steps join
    /// `undo`; the caller commits.
    Result<void> change_view(const Region& r, const MapParams& old_params, const MapParams& params,
                             detail::UndoLog& undo)
    {
        const Counts c = counts_of(r);
        const PartitionView before{old_params, c};
        const PartitionView after{params, c};
        const bool was_writable = partition_writable(r, old_params, c);
        const bool now_writable = partition_writable(r, params, c);
        const bool partitions_change =
            was_writable != now_writable || old_params.executable != params.executable;
        if (partitions_change && !now_writable)
            MEMBACKING_TRY(repartition(r, before, after, undo));
        if (old_params.writable != params.writable) {
            for (const MemoryRange& seg : r.visible) {
                const std::vector<ActiveMapping> old_view = active_in(r, seg, old_params);
                const std::vector<ActiveMapping> new_view = active_in(r, seg, params);
                for (std::size_t i = 0; i < new_view.size(); ++i) {
                    if (new_view[i].writable == old_view[i].writable)
                        continue; // read-only either way
                    MEMBACKING_TRY(sink_.add_mapping(new_view[i]));
                    undo.push([this, old = old_view[i]] { return sink_.add_mapping(old); });
                }
            }
        }
        if (partitions_change && now_writable)
            MEMBACKING_TRY(repartition(r, before, after, undo));
        return {};
    }

    /// What partitions see of a region in one state.
    struct PartitionView {
        MapParams params;
        Counts counts;
    };

    /// Re-maps every visible segment of r in the partitions, from what `before` gives them to
    /// what `after` gives them (KVM cannot change a memslot's permissions in place).
    Result<void> repartition(const Region& r, const PartitionView& before,
                             const PartitionView& after, detail::UndoLog& undo)
    {
        for (const MemoryRange& seg : r.visible) {
            const RegionActivation old_act = activation(r, seg, before.params, before.counts);
            const RegionActivation new_act = activation(r, seg, after.params, after.counts);
            MEMBACKING_TRY(sink_.unmap_region(old_act));
            undo.push([this, old_act] { return sink_.map_region(old_act); });
            MEMBACKING_TRY(sink_.map_region(new_act));
            undo.push([this, new_act] { return sink_.unmap_region(new_act); });
        }
        return {};
    }

    /// Applies a transition through the sinks, all or nothing, then updates visibility.
    /// `override_params` gives the params for the region being (re)mapped; `removing` names the
    /// region whose deactivation is permanent.
    ///
    /// Make-before-break (issue 10, defect 3): the old windows leave the partitions first; then
    /// the VA side gets the new mappings, each replacing in place (add_mapping) whatever the old
    /// state held there; only then are the GPAs that the new state leaves unmapped removed; the
    /// new windows go to the partitions last. So a GPA that both states map is never absent
    /// from a VA mapper: an access sees the old memory or the new one, never errc::unmapped.
    /// (Partitions cannot replace a window in place: between their unmap and map, a vCPU that
    /// touches the range exits, which the quiesce hook is for.) The undo of a replacement puts
    /// the old pieces back in place, the same way round.
    Result<void> apply(const Transition& t, const std::optional<Override>& override_params,
                       const std::optional<RegionId>& removing)
    {
        for (const Segment& s : t.deactivate) // checked before anything changes
            if (removing != s.region && holds_private(regions_.at(s.region), s.gpa))
                return make_error(errc::conflict, "disabling region " +
                                                      regions_.at(s.region).describe() +
                                                      " would discard its private memory");
        // What the VA side holds where the old state goes, by GPA (visible segments are
        // disjoint), and what the new state brings.
        std::vector<ActiveMapping> old_view;
        for (const Segment& s : t.deactivate) {
            const Region& r = regions_.at(s.region);
            auto part = active_in(r, s.gpa, exposed_params(r, *r.map_params));
            old_view.insert(old_view.end(), part.begin(), part.end());
        }
        std::sort(old_view.begin(), old_view.end(),
                  [](const ActiveMapping& a, const ActiveMapping& b) {
                      return a.gpa.start() < b.gpa.start();
                  });
        std::vector<Incoming> incoming;
        std::vector<MemoryRange> covered; // every GPA the new state maps
        for (const Segment& s : t.activate) {
            const Region& r = regions_.at(s.region);
            const MapParams params = exposed_params(
                r, (override_params && override_params->id == s.region) ? override_params->params
                                                                        : *r.map_params);
            Incoming in{&r, activation(r, s.gpa, params, counts_of(r)),
                        active_in(r, s.gpa, params)};
            for (const ActiveMapping& m : in.mappings)
                covered.push_back(m.gpa);
            incoming.push_back(std::move(in));
        }
        std::sort(covered.begin(), covered.end(),
                  [](const MemoryRange& a, const MemoryRange& b) { return a.start() < b.start(); });

        detail::UndoLog undo;
        // 1. Partitions drop the old windows.
        for (const Segment& s : t.deactivate) {
            const Region& r = regions_.at(s.region);
            const RegionActivation act =
                activation(r, s.gpa, exposed_params(r, *r.map_params), counts_of(r));
            MEMBACKING_TRY_CONTEXT(sink_.unmap_region(act),
                                   "failed to unmap region " + r.describe() + " from a partition");
            undo.push([this, act] { return sink_.map_region(act); });
        }
        // 2. The new mappings replace the old ones in place.
        for (const Incoming& in : incoming)
            for (const ActiveMapping& m : in.mappings) {
                MEMBACKING_TRY_CONTEXT(sink_.add_mapping(m), "failed to map " + m.gpa.to_string() +
                                                                 " of region " +
                                                                 in.region->describe());
                undo.push([this, gpa = m.gpa, before = clipped(old_view, m.gpa)] {
                    return restore(gpa, before);
                });
            }
        // 3. What the new state leaves unmapped goes.
        for (const Segment& s : t.deactivate) {
            Result<void> removed;
            for_each_gap(s.gpa, covered, [&](const MemoryRange& gap) {
                std::vector<ActiveMapping> before = clipped(old_view, gap);
                if (!removed || before.empty())
                    return;
                removed = sink_.remove_mappings(gap);
                if (removed)
                    undo.push(
                        [this, gap, before = std::move(before)] { return restore(gap, before); });
            });
            MEMBACKING_TRY_CONTEXT(std::move(removed), "failed to invalidate region " +
                                                           regions_.at(s.region).describe());
        }
        // 4. Partitions get the new windows.
        for (const Incoming& in : incoming) {
            MEMBACKING_TRY_CONTEXT(sink_.map_region(in.window), "failed to map region " +
                                                                    in.region->describe() +
                                                                    " into a partition");
            undo.push([this, act = in.window] { return sink_.unmap_region(act); });
        }
        undo.commit();
        for (const Segment& s : t.deactivate) {
            auto& vis = regions_.at(s.region).visible;
            auto it = std::find(vis.begin(), vis.end(), s.gpa);
            MEMBACKING_CHECK(it != vis.end(),
                             "resolver deactivated a segment that was not visible");
            vis.erase(it);
        }
        for (const Segment& s : t.activate)
            regions_.at(s.region).visible.push_back(s.gpa);
        return {};
    }

    Sink& sink_;
    Resolver resolver_;
    std::map<RegionId, Region> regions_;
    std::vector<RegionId> capping_; ///< regions whose read_only_cap is set
    std::uint64_t next_id_ = 1;
};

} // namespace membacking
