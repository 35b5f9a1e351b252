/**
 * @file manager/detail/manager_core.hpp
 * Internal (namespace membacking::detail); layer: manager.
 *
 * ManagerCore<Resolver, Va, Partitions...>: everything a GuestMemoryManager is, behind one
 * control mutex. The public facades (GuestMemoryManager, RamVisibilityControl,
 * DeviceMemoryMapper, GuestMemoryClient) hold it by shared or weak pointer and forward here.
 *
 * Composition (all static): the region manager's sink sends VA events to the MappingManager<Va>
 * and partition events to every attached partition, through a fold over a
 * std::tuple<std::vector<Attached<P>>...>, one list per partition policy. No virtual call anywhere;
 * the access path (GuestMemory) never comes here.
 *
 * Every control operation takes the mutex for its whole duration and returns only after every VA
 * mapper and every partition reflects it; any failure is rolled back (detail::UndoLog).
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/guest_memory.hpp>
#include <membacking/manager/errors.hpp>
#include <membacking/manager/memory_map.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/mapping_list.hpp>
#include <membacking/region/region_manager.hpp>
#include <membacking/region/resolver.hpp>
#include <membacking/va/va_policy.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace membacking::detail {

/// True if T appears in Ts exactly once.
template <class T, class... Ts>
inline constexpr bool occurs_once = (std::is_same_v<T, Ts> + ... + 0) == 1;

/// The state of one device region (a DeviceMemoryMapper region), shared between its handle and
/// the manager. Guarded by the manager's control mutex.
struct DeviceRegionState {
    std::string name;
    std::uint64_t size = 0;
    std::uint8_t priority = 0;
    MappingList local;              ///< the mappings, replayed each time the region is placed
    std::optional<RegionId> placed; ///< the region while it is in the guest
    std::uint64_t gpa = 0;
    bool writable = false;
};

// Plain `class` parameters: GuestMemoryManager checks the policies with readable messages first.
template <class Resolver, class Va, class... Partitions>
class ManagerCore {
    static_assert((occurs_once<Partitions, Partitions...> && ...),
                  "each partition policy may be listed once in a GuestMemoryManager");

public:
    using Mapper = VaMapper<Va>;

    struct Config {
        std::uint64_t max_addr = 0;
        std::uint64_t min_va_alignment = page_size;
        std::optional<std::uint64_t> vtl0_alias_map;
        bool pin_mappings = false;
    };

    /// One RAM region created by the builder.
    struct RamRegion {
        MemoryRange range;
        RegionId id;
        bool prefetch = false;
    };

    /// One RAM backing created by the builder (for shared_memory_backing and dumps).
    struct RamBacking {
        Mappable object; ///< empty for private memory
        std::vector<MemoryRange> ranges;
    };

    template <class P>
    struct Attached {
        PartitionId id;
        std::shared_ptr<P> partition;
        Vtl vtl = Vtl::vtl0;
        std::uint64_t offset = 0;
        bool pin = false;
    };

    /// Reserves the primary (eager) VA mapper. Errors are build_errc::va_mapper.
    static Result<std::shared_ptr<ManagerCore>> create(const Config& config)
    {
        auto va = MappingManager<Va>::create(config.max_addr, config.min_va_alignment);
        if (!va)
            return build_error(build_errc::va_mapper, "failed to create VA mapper",
                               std::move(va).error());
        std::shared_ptr<ManagerCore> core(new ManagerCore(config, std::move(*va)));
        auto primary = core->va_.new_mapper(MapperMode::eager);
        if (!primary)
            return build_error(build_errc::va_mapper, "failed to create VA mapper",
                               std::move(primary).error());
        core->primary_ = std::move(*primary);
        return core;
    }

    ManagerCore(const ManagerCore&) = delete;
    ManagerCore& operator=(const ManagerCore&) = delete;

    /// Tears down: partitions stop referencing guest memory first, then every VA mapper is
    /// invalidated (by the MappingManager's destructor), so surviving GuestMemory handles see
    /// errors, not stale memory. Partition failures here cannot be reported and are ignored.
    ~ManagerCore()
    {
        std::lock_guard lock(control_);
        const auto active = regions_.active_regions();
        for_each_attached([&](auto& a) {
            for (const RegionActivation& act : active)
                (void)unmap_one(a, act.gpa);
            return true;
        });
    }

    // ---- regions (the low-level API) ----

    Result<RegionId> add_region(std::string name, MemoryRange range, std::uint8_t priority,
                                MappingType type)
    {
        std::lock_guard lock(control_);
        if (range.end() > config_.max_addr)
            return out_of_space(range);
        return regions_.add_region(std::move(name), range, priority, type);
    }
    Result<void> map_region(RegionId id, const MapParams& params)
    {
        std::lock_guard lock(control_);
        return regions_.map_region(id, params);
    }
    Result<void> unmap_region(RegionId id)
    {
        std::lock_guard lock(control_);
        return regions_.unmap_region(id);
    }
    Result<void> remove_region(RegionId id)
    {
        std::lock_guard lock(control_);
        return regions_.remove_region(id);
    }
    Result<void> add_mapping(RegionId id, const RegionMapping& m)
    {
        std::lock_guard lock(control_);
        return regions_.add_mapping(id, m);
    }
    Result<void> remove_mappings(RegionId id, const MemoryRange& range_in_region)
    {
        std::lock_guard lock(control_);
        return regions_.remove_mappings(id, range_in_region);
    }

    // ---- RAM (builder and visibility) ----

    void record_backing(RamBacking backing)
    {
        std::lock_guard lock(control_);
        backings_.push_back(std::move(backing));
    }
    void record_ram(RamRegion r)
    {
        std::lock_guard lock(control_);
        ram_.push_back(r);
    }

    Result<void> set_ram_visibility(const MemoryRange& range, RamVisibility visibility)
    {
        std::lock_guard lock(control_);
        auto it = std::find_if(ram_.begin(), ram_.end(),
                               [&](const RamRegion& r) { return r.range == range; });
        if (it == ram_.end())
            return make_error(errc::not_found,
                              range.to_string() + " is not a controllable RAM range");
        if (visibility == RamVisibility::unmapped)
            return regions_.unmap_region(it->id);
        const MapParams params{visibility == RamVisibility::read_write, true, it->prefetch};
        MEMBACKING_TRY_CONTEXT(regions_.map_region(it->id, params),
                               "failed to map RAM range " + range.to_string());
        return {};
    }

    /// The single file-backed backing, if there is exactly one.
    [[nodiscard]] std::optional<Mappable> sole_shared_backing() const
    {
        std::lock_guard lock(control_);
        if (backings_.size() != 1 || backings_.front().object.empty())
            return std::nullopt;
        return backings_.front().object;
    }

    // ---- partitions ----

    template <class P>
    Result<PartitionId> attach(Vtl vtl, std::shared_ptr<P> partition)
    {
        static_assert(occurs_once<P, Partitions...>,
                      "this partition policy is not one of the manager's partition policies");
        std::lock_guard lock(control_);
        if (!partition)
            return attach_error(make_error(errc::invalid_argument, "no partition given"));
        if constexpr (!partition_supports<PartitionFeatures::pin, P>) {
            if (config_.pin_mappings)
                return attach_error(
                    make_error(errc::unsupported, std::string(P::name) +
                                                      " partitions cannot pin mappings, and the "
                                                      "manager was built with pin_mappings"));
        }
        const PartitionId id{next_partition_id_++};
        std::vector<Attached<P>> entries;
        // VTL2 also sees all of memory at the alias offset; that mapping goes first.
        if (vtl == Vtl::vtl2 && config_.vtl0_alias_map)
            entries.push_back({id, partition, vtl, *config_.vtl0_alias_map, config_.pin_mappings});
        entries.push_back({id, partition, vtl, 0, config_.pin_mappings});

        // Replay what is visible now; any failure takes everything of this attach back out
        // (the reference keeps the alias mapping when the second registration fails).
        UndoLog undo;
        for (const Attached<P>& e : entries)
            for (const RegionActivation& act : regions_.active_regions()) {
                if (auto r = map_one(e, act); !r)
                    return attach_error(std::move(r).error());
                undo.push([this, e, range = act.gpa] { return unmap_one(e, range); });
            }
        undo.commit();
        auto& list = std::get<std::vector<Attached<P>>>(partitions_);
        list.insert(list.end(), entries.begin(), entries.end());
        return id;
    }

    /// Unmaps everything from a partition and forgets it. All or nothing.
    Result<void> detach(PartitionId id)
    {
        std::lock_guard lock(control_);
        bool found = false;
        UndoLog undo;
        Result<void> result;
        const auto active = regions_.active_regions();
        for_each_attached([&](auto& a) {
            if (a.id != id)
                return true;
            found = true;
            for (const RegionActivation& act : active) {
                if (auto r = unmap_one(a, act.gpa); !r) {
                    result = std::move(r).error();
                    return false;
                }
                undo.push([this, a, act] { return map_one(a, act); });
            }
            return true;
        });
        if (!found)
            return make_error(errc::not_found,
                              "no partition with id " + std::to_string(id.value) + " is attached");
        if (!result)
            return result;
        undo.commit();
        std::apply(
            [&](auto&... lists) {
                (std::erase_if(lists, [&](const auto& a) { return a.id == id; }), ...);
            },
            partitions_);
        return {};
    }

    /// Partition-wide dirty-page logging, for partitions whose policy can do it.
    Result<void> set_dirty_logging(PartitionId id, bool enabled)
    {
        std::lock_guard lock(control_);
        bool found = false;
        Result<void> result;
        for_each_attached([&](auto& a) {
            if (a.id != id)
                return true;
            found = true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>)
                result = a.partition->set_dirty_logging(enabled);
            else
                result = make_error(errc::unsupported,
                                    std::string(P::name) + " partitions cannot log dirty pages");
            return false; // one call per partition, even with an alias mapping
        });
        if (!found)
            return make_error(errc::not_found,
                              "no partition with id " + std::to_string(id.value) + " is attached");
        return result;
    }

    /// Reads and clears the dirty bitmap of one visible region in one partition (bit i is page
    /// i of the region).
    Result<std::vector<std::uint64_t>> take_dirty_log(PartitionId id, RegionId region)
    {
        std::lock_guard lock(control_);
        const auto* r = regions_.find(region);
        if (r == nullptr)
            return make_error(errc::not_found,
                              "no memory region with id " + std::to_string(region.value));
        if (r->visible.size() != 1)
            return make_error(errc::conflict,
                              "region " + r->describe() + " is not visible as one window");
        const MemoryRange window = r->visible.front();
        bool found = false;
        Result<std::vector<std::uint64_t>> result =
            make_error(errc::not_found, "partition " + std::to_string(id.value) + " not attached");
        for_each_attached([&](auto& a) {
            if (a.id != id || a.offset != 0)
                return true;
            found = true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>)
                result = a.partition->take_dirty_log(window.start(), window.size());
            else
                result = make_error(errc::unsupported,
                                    std::string(P::name) + " partitions cannot log dirty pages");
            return false;
        });
        if (!found)
            return make_error(errc::not_found,
                              "no partition with id " + std::to_string(id.value) + " is attached");
        return result;
    }

    // ---- device regions ----

    Result<void> device_map(DeviceRegionState& d, std::uint64_t offset, const Mappable& object,
                            std::uint64_t file_offset, std::uint64_t len, bool writable)
    {
        std::lock_guard lock(control_);
        auto rel = device_range(d, offset, len);
        if (!rel)
            return std::move(rel).error();
        if (object.empty())
            return make_error(errc::invalid_argument, "device region '" + d.name +
                                                          "': no object to map at " +
                                                          rel->to_string());
        if (!is_page_aligned(file_offset))
            return make_error(errc::invalid_range, "device region '" + d.name + "': file offset " +
                                                       MemoryRange::hex(file_offset) +
                                                       " is not page aligned");
        const RegionMapping m{
            *rel, MappingBacking::file(object, Offset{file_offset}), writable, {}};
        if (d.placed)
            MEMBACKING_TRY(regions_.add_mapping(*d.placed, m));
        d.local.apply(d.local.replace_edit(m));
        return {};
    }

    Result<void> device_unmap(DeviceRegionState& d, std::uint64_t offset, std::uint64_t len)
    {
        std::lock_guard lock(control_);
        auto rel = device_range(d, offset, len);
        if (!rel)
            return std::move(rel).error();
        if (d.placed)
            MEMBACKING_TRY(regions_.remove_mappings(*d.placed, *rel));
        // The reference keeps the mappings *inside* the range here and drops the others, so a
        // later placement replays the wrong set; we remove what is inside.
        d.local.apply(d.local.remove_edit(*rel));
        return {};
    }

    /// Places the device region at gpa, moving it if it is placed elsewhere. All or nothing: a
    /// failed move leaves it where it was.
    Result<void> device_map_to_guest(DeviceRegionState& d, std::uint64_t gpa, bool writable)
    {
        std::lock_guard lock(control_);
        auto range = MemoryRange::from(Gpa{gpa}, Length{d.size});
        if (!range)
            return std::move(range).error();
        if (range->end() > config_.max_addr)
            return out_of_space(*range);
        UndoLog undo;
        if (d.placed) {
            MEMBACKING_TRY(regions_.remove_region(*d.placed));
            d.placed.reset();
            undo.push([this, &d, old_gpa = d.gpa, old_writable = d.writable]() -> Result<void> {
                auto id =
                    place(d, MemoryRange::valid_or_abort(old_gpa, old_gpa + d.size), old_writable);
                if (!id)
                    return std::move(id).error();
                d.placed = *id;
                return {};
            });
        }
        auto id = place(d, *range, writable);
        if (!id)
            return std::move(id).error().context("failed to place device region '" + d.name +
                                                 "' at " + range->to_string());
        undo.commit();
        d.placed = *id;
        d.gpa = gpa;
        d.writable = writable;
        return {};
    }

    [[nodiscard]] std::optional<MemoryRange> device_placement(const DeviceRegionState& d) const
    {
        std::lock_guard lock(control_);
        if (!d.placed)
            return std::nullopt;
        return MemoryRange::valid_or_abort(d.gpa, d.gpa + d.size);
    }

    Result<void> device_unmap_from_guest(DeviceRegionState& d)
    {
        std::lock_guard lock(control_);
        if (!d.placed)
            return {};
        MEMBACKING_TRY(regions_.remove_region(*d.placed));
        d.placed.reset();
        return {};
    }

    // ---- access and inspection ----

    [[nodiscard]] const std::shared_ptr<Mapper>& primary() const noexcept { return primary_; }

    Result<std::shared_ptr<Mapper>> new_mapper(MapperMode mode)
    {
        std::lock_guard lock(control_);
        return va_.new_mapper(mode);
    }

    [[nodiscard]] std::uint64_t max_address() const noexcept { return config_.max_addr; }

    [[nodiscard]] MemoryMap memory_map() const
    {
        std::lock_guard lock(control_);
        MemoryMap map;
        map.max_address = Gpa{config_.max_addr};
        map.va_mappers = va_.mapper_count();
        for (const auto& [id, r] : regions_.regions()) {
            MemoryMap::Region out{id,     r.name,       r.range,    r.priority,
                                  r.type, r.map_params, r.active(), {}};
            for (const auto& [off, m] : r.mappings)
                out.mappings.push_back(
                    {MemoryRange::valid_or_abort(r.range.start() + m.range.start(),
                                                 r.range.start() + m.range.end()),
                     m.writable && (!r.map_params || r.map_params->writable),
                     m.backing.is_private(), m.backing.object.identity(), m.backing.file_offset});
            map.regions.push_back(std::move(out));
        }
        std::apply(
            [&](const auto&... lists) {
                (..., [&](const auto& list) {
                    for (const auto& a : list)
                        map.partitions.push_back(
                            {a.id, std::string(std::remove_cvref_t<decltype(*a.partition)>::name),
                             a.vtl, a.offset, a.pin});
                }(lists));
            },
            partitions_);
        map.sort();
        return map;
    }

    /// Read access to the regions, under the lock, for tests and tools.
    template <class F>
    decltype(auto) inspect_regions(F&& f) const
    {
        std::lock_guard lock(control_);
        return f(regions_);
    }

    [[nodiscard]] std::size_t attached_count() const
    {
        std::lock_guard lock(control_);
        std::size_t n = 0;
        std::apply([&](const auto&... lists) { ((n += lists.size()), ...); }, partitions_);
        return n;
    }

private:
    /// The region manager's sink: VA events to the mapping manager, partition events fanned out.
    struct Sink {
        ManagerCore* core;
        Result<void> add_mapping(const ActiveMapping& m) { return core->va_.add_mapping(m); }
        Result<void> remove_mappings(const MemoryRange& r) { return core->va_.remove_mappings(r); }
        Result<void> map_region(const RegionActivation& a) { return core->map_partitions(a); }
        Result<void> unmap_region(const RegionActivation& a) { return core->unmap_partitions(a); }
    };

    ManagerCore(const Config& config, MappingManager<Va> va)
        : config_(config), va_(std::move(va)), sink_{this}, regions_(sink_)
    {}

    Error out_of_space(const MemoryRange& range) const
    {
        return make_error(errc::out_of_range, "range " + range.to_string() +
                                                  " lies outside the guest address space of " +
                                                  MemoryRange::hex(config_.max_addr) + " bytes");
    }

    static Error attach_error(Error cause)
    {
        const std::error_code code = make_error_code(attach_errc::partition_mapper);
        return {code, code.message(), std::move(cause)};
    }

    /// Calls f(attached) for every attached partition of every policy, in policy order, until f
    /// returns false. Returns whether it ran to the end.
    template <class F>
    bool for_each_attached(F&& f)
    {
        return std::apply(
            [&](auto&... lists) {
                return (... && [&](auto& list) {
                    for (auto& a : list)
                        if (!f(a))
                            return false;
                    return true;
                }(lists));
            },
            partitions_);
    }

    template <class P>
    Result<void> map_one(const Attached<P>& a, const RegionActivation& act)
    {
        const auto gpa = checked_add(act.gpa.start(), a.offset);
        if (!gpa)
            return make_error(errc::out_of_range, "alias offset " + MemoryRange::hex(a.offset) +
                                                      " pushes " + act.gpa.to_string() +
                                                      " past the end of the address space");
        std::byte* host = primary_->base() + act.gpa.start();
        MEMBACKING_TRY(a.partition->map_range(host, *gpa, act.gpa.size(), act.params.writable,
                                              act.params.executable));
        if constexpr (partition_supports<PartitionFeatures::prefetch, P>) {
            // Prefetch is advice: a partition that cannot populate now will fault in later.
            if (act.params.prefetch)
                (void)a.partition->prefetch_range(*gpa, act.gpa.size());
        }
        if constexpr (partition_supports<PartitionFeatures::pin, P>) {
            if (a.pin) {
                if (auto r = a.partition->pin_range(*gpa, act.gpa.size()); !r) {
                    if (auto u = a.partition->unmap_range(*gpa, act.gpa.size()); !u)
                        fatal("a partition refused to unmap a range it just mapped: " +
                              u.error().full_message());
                    return std::move(r).error().context("failed to pin range to partition");
                }
            }
        }
        return {};
    }

    template <class P>
    Result<void> unmap_one(const Attached<P>& a, const MemoryRange& range)
    {
        const std::uint64_t gpa = range.start() + a.offset; // checked when it was mapped
        if constexpr (partition_supports<PartitionFeatures::pin, P>) {
            if (a.pin)
                MEMBACKING_TRY(a.partition->unpin_range(gpa, range.size()));
        }
        auto r = a.partition->unmap_range(gpa, range.size());
        if (!r) {
            if constexpr (partition_supports<PartitionFeatures::pin, P>) {
                if (a.pin && !a.partition->pin_range(gpa, range.size()))
                    fatal("could not re-pin a range after a failed unmap");
            }
            return r;
        }
        return {};
    }

    Result<void> map_partitions(const RegionActivation& act)
    {
        UndoLog undo;
        Result<void> result;
        for_each_attached([&](auto& a) {
            if (auto r = map_one(a, act); !r) {
                result = std::move(r).error();
                return false;
            }
            undo.push([this, &a, range = act.gpa] { return unmap_one(a, range); });
            return true;
        });
        if (!result)
            return result;
        undo.commit();
        return {};
    }

    Result<void> unmap_partitions(const RegionActivation& act)
    {
        UndoLog undo;
        Result<void> result;
        for_each_attached([&](auto& a) {
            if (auto r = unmap_one(a, act.gpa); !r) {
                result = std::move(r).error();
                return false;
            }
            undo.push([this, &a, act] { return map_one(a, act); });
            return true;
        });
        if (!result)
            return result;
        undo.commit();
        return {};
    }

    Result<MemoryRange> device_range(const DeviceRegionState& d, std::uint64_t offset,
                                     std::uint64_t len) const
    {
        auto rel = MemoryRange::from(Offset{offset}, Length{len});
        if (!rel)
            return std::move(rel).error().context("device region '" + d.name + "'");
        if (rel->empty() || rel->end() > d.size)
            return make_error(errc::out_of_range,
                              "range " + rel->to_string() + " does not fit in device region '" +
                                  d.name + "' of " + MemoryRange::hex(d.size) + " bytes");
        return *rel;
    }

    /// Registers the device region at `range` with its mappings and maps it. On failure nothing
    /// of it remains.
    Result<RegionId> place(const DeviceRegionState& d, const MemoryRange& range, bool writable)
    {
        auto id = regions_.add_region(d.name, range, d.priority, MappingType::Device);
        if (!id)
            return std::move(id).error();
        auto fail = [&](Error e) -> Result<RegionId> {
            if (auto r = regions_.remove_region(*id); !r)
                fatal("could not remove a half-placed device region: " + r.error().full_message());
            return e;
        };
        for (const auto& [off, m] : d.local)
            if (auto r = regions_.add_mapping(*id, m); !r)
                return fail(std::move(r).error());
        if (auto r = regions_.map_region(*id, {writable, true, false}); !r)
            return fail(std::move(r).error());
        return *id;
    }

    mutable std::mutex control_;
    Config config_;
    MappingManager<Va> va_;
    std::shared_ptr<Mapper> primary_;
    Sink sink_;
    RegionManager<Resolver, Sink> regions_;
    std::tuple<std::vector<Attached<Partitions>>...> partitions_;
    std::vector<RamRegion> ram_;
    std::vector<RamBacking> backings_;
    std::uint64_t next_partition_id_ = 1;
};

} // namespace membacking::detail
