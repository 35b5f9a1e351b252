/**
 * @file manager/detail/manager_core.hpp
 * Internal (namespace membacking::detail); layer: manager.
 *
 * ManagerCore<Resolver, Va, Partitions...>: the control lock and the wiring. It owns the parts of
 * a GuestMemoryManager and connects them; each part's logic lives in its own file:
 * - RegionManager (region/region_manager.hpp): regions, mappings, what is visible;
 * - MappingManager (mapping/mapping_manager.hpp): the VA mappers; the primary one is what
 *   partitions map from and what guest_memory() accesses;
 * - PartitionSet (manager/detail/partition_set.hpp): the attached partitions and the fan-out;
 * - ListenerSet (mapping/detail/listener_set.hpp): the memory table and the run-time listeners;
 * - RamBooks (manager/detail/ram_books.hpp): what the builder created.
 * The region manager's sink sends VA events through the listener set to the mapping manager
 * (listeners first, see listener_set.hpp) and window events to the partition set. The façades
 * (GuestMemoryManager, RamVisibilityControl, DeviceMemoryMapper, GuestMemoryClient) hold the core
 * by shared or weak pointer and run their operations through control(): one control operation,
 * under the one control mutex, which returns only after every VA mapper and every partition
 * reflects it. No virtual call anywhere; the access path (GuestMemory) never comes here.
 */
#pragma once

#include <membacking/access/dirty_bitmap.hpp>
#include <membacking/access/dirty_tracking.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/manager/detail/memory_map_builder.hpp>
#include <membacking/manager/detail/partition_set.hpp>
#include <membacking/manager/detail/ram_books.hpp>
#include <membacking/manager/detail/shared_objects.hpp>
#include <membacking/manager/errors.hpp>
#include <membacking/manager/memory_map.hpp>
#include <membacking/manager/quiesce_hook.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/mapping/detail/listener_set.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/mapping/memory_listener.hpp>
#include <membacking/mapping/memory_piece.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/region/region_manager.hpp>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace membacking::detail {

// Plain `class` parameters: GuestMemoryManager checks the policies with readable messages first.
template <class Tracking, class Resolver, class Va, class... Partitions>
class ManagerCore {
    /// The region manager's sink: VA events to the mapping manager, window events to the
    /// partitions. With dirty tracking, what becomes visible is dirty whole (a new mapping's
    /// bytes, a window that appears): see dirty_since_change().
    struct Sink {
        ManagerCore* core;
        Result<void> add_mapping(const ActiveMapping& m)
        {
            MEMBACKING_TRY(
                core->listeners_.add_mapping(m, [&] { return core->va_.add_mapping(m); }));
            core->dirty_since_change(m.gpa);
            return {};
        }
        Result<void> remove_mappings(const MemoryRange& r)
        {
            return core->listeners_.remove_mappings(r,
                                                    [&] { return core->va_.remove_mappings(r); });
        }
        Result<void> map_region(const RegionActivation& a)
        {
            MEMBACKING_TRY(core->partitions_.map(a));
            core->dirty_since_change(a.gpa);
            return {};
        }
        Result<void> unmap_region(const RegionActivation& a) { return core->partitions_.unmap(a); }
    };

public:
    using TrackingPolicy = Tracking;
    using Mapper = VaMapper<Va>;
    using Regions = RegionManager<Resolver, Sink>;
    using VaPolicyType = Va;

    struct Config {
        std::uint64_t max_addr = 0;
        std::uint64_t min_va_alignment = page_size;
        std::optional<std::uint64_t> vtl0_alias_map;
        bool pin_mappings = false;
    };

    /// What one control operation works on (handed out by control(), under the lock).
    struct Control {
        Regions& regions;
        RamBooks& ram;
        std::uint64_t max_addr;
    };

    /// Reserves the primary (eager) VA mapper. Errors keep their root code, with "failed to create
    /// VA mapper" (or "... the dirty bitmap") as context.
    static Result<std::shared_ptr<ManagerCore>> create(const Config& config)
    {
        std::shared_ptr<DirtyBitmap> dirty;
        if constexpr (Tracking::enabled) {
            auto bitmap = DirtyBitmap::create<typename BitmapSyscalls<Va>::type>(config.max_addr,
                                                                                 Tracking::layout);
            if (!bitmap)
                return std::move(bitmap).error().context("failed to create the dirty bitmap");
            dirty = std::move(*bitmap);
        }
        auto va = MappingManager<Va>::create(config.max_addr, config.min_va_alignment, dirty);
        if (!va)
            return std::move(va).error().context("failed to create VA mapper");
        auto primary = va->new_mapper(MapperMode::eager);
        if (!primary)
            return std::move(primary).error().context("failed to create VA mapper");
        return std::shared_ptr<ManagerCore>(
            new ManagerCore(config, std::move(*va), std::move(*primary)));
    }

    ManagerCore(const ManagerCore&) = delete;
    ManagerCore& operator=(const ManagerCore&) = delete;

    /// The last reference is gone (shut_down() may have run already): partitions stop
    /// referencing guest memory first, then every VA mapper is invalidated by the
    /// MappingManager's destructor, after the primary mapper has released its reservation (the
    /// order that needs the fewest system calls, for a build that fails on a failing host).
    /// Partition failures here cannot be reported and are ignored.
    ~ManagerCore()
    {
        std::lock_guard lock(control_);
        if (!closed_)
            partitions_.unmap_all(regions_.active_regions());
    }

    /// Tears down now, even while a façade (RamVisibilityControl, DeviceMemoryMapper, DeviceRegion,
    /// GuestMemoryClient) keeps this core alive for a call: waits for the control operation in
    /// flight (and for the advice it gives after it), then takes guest memory out of every
    /// partition and invalidates every VA mapper, so that surviving GuestMemory handles see
    /// errors, not stale memory. Every control operation that starts afterwards fails with
    /// errc::not_found ("the guest memory manager is gone"). ~GuestMemoryManager calls it, so the
    /// teardown is done when the manager's destructor returns (issue 10, defect 2). Idempotent.
    void shut_down() noexcept
    {
        std::unique_lock lock(control_);
        if (closed_)
            return;
        closed_ = true;
        advice_given_.wait(lock, [&] { return advising_ == 0; });
        partitions_.unmap_all(regions_.active_regions());
        va_.shut_down();
    }

    /// Whether shut_down() began: control operations fail from then on.
    [[nodiscard]] bool closed() const
    {
        std::lock_guard lock(control_);
        return closed_;
    }

    /// Runs f(Control&) as one control operation and returns what it returns: under the control
    /// lock, inside one partition operation (so each partition's quiesce bracket opens at most
    /// once and ends after f, rollback included); then, with the lock released, the advice the
    /// partitions were given (prefetch), so that a partition waiting for a vCPU there holds up
    /// no other control call. After shut_down() began, f is not called: the result is the
    /// "manager is gone" error (errc::not_found), an empty optional, or nothing, by f's type.
    template <class F>
    std::invoke_result_t<F, Control&> control(F&& f)
    {
        using R = std::invoke_result_t<F, Control&>;
        std::unique_lock lock(control_);
        if (closed_)
            return gone<R>();
        if constexpr (std::is_void_v<R>) {
            {
                const auto op = partitions_.operation(); // ends (quiesce brackets close) first
                Control c{regions_, ram_, config_.max_addr};
                std::forward<F>(f)(c);
            }
            give_advice(lock);
        } else {
            std::optional<R> result;
            {
                const auto op = partitions_.operation();
                Control c{regions_, ram_, config_.max_addr};
                result.emplace(std::forward<F>(f)(c));
            }
            give_advice(lock);
            return std::move(*result);
        }
    }

    // ---- the region API ----

    Result<RegionId> add_region(std::string name, MemoryRange range, std::uint8_t priority,
                                MappingType type)
    {
        return control([&](Control& c) -> Result<RegionId> {
            if (range.end() > c.max_addr)
                return outside_address_space(range, c.max_addr);
            return c.regions.add_region(std::move(name), range, priority, type);
        });
    }
    Result<void> map_region(RegionId id, const MapParams& params)
    {
        return control([&](Control& c) { return c.regions.map_region(id, params); });
    }
    Result<void> unmap_region(RegionId id)
    {
        return control([&](Control& c) { return c.regions.unmap_region(id); });
    }
    Result<void> remove_region(RegionId id)
    {
        return control([&](Control& c) { return c.regions.remove_region(id); });
    }
    /// Adds a mapping to region `id`; a file mapping's object must cover its file range now
    /// (VaPolicy_object_size), so a range beyond the object is refused here, not when the region
    /// is mapped.
    Result<void> add_mapping(RegionId id, const RegionMapping& m)
    {
        if (!m.backing.is_private())
            MEMBACKING_TRY_CONTEXT(
                check_object_covers<Va>(m.backing.object, m.backing.file_offset, m.range.size()),
                "mapping " + m.range.to_string() + " of region " + std::to_string(id.value));
        return control([&](Control& c) { return c.regions.add_mapping(id, m); });
    }
    Result<void> remove_mappings(RegionId id, const MemoryRange& range_in_region)
    {
        return control([&](Control& c) { return c.regions.remove_mappings(id, range_in_region); });
    }

    // ---- partitions: the region manager's visible windows, fanned out ----

    template <class P>
    Result<PartitionId> attach(Vtl vtl, std::shared_ptr<P> partition, QuiesceHook hook)
    {
        // A partition attached during a migration logs from the start; all or nothing.
        using Logging = typename decltype(partitions_)::DirtyLogging;
        return control([&](Control& c) -> Result<PartitionId> {
            return partitions_.attach(vtl, std::move(partition), c.regions.active_regions(),
                                      std::move(hook), tracking_ ? Logging::on : Logging::off);
        });
    }

    Result<void> detach(PartitionId id)
    {
        return control([&](Control& c) {
            const std::vector<RegionActivation> visible = c.regions.active_regions();
            // One partition operation for both: vCPUs held to read the log stay held until the
            // windows are gone.
            const auto op = partitions_.operation();
            keep_dirty_log_of(id, visible);
            return partitions_.detach(id, visible);
        });
    }

    // ---- dirty tracking: called by tracked managers only (see GuestMemoryManager) ----

    /// Clears the bitmap and turns logging on in every partition (all or nothing).
    Result<void> start_dirty_tracking()
    {
        return control([&](Control&) -> Result<void> {
            if (tracking_)
                return make_error(errc::conflict, "dirty tracking is already on");
            MEMBACKING_TRY(partitions_.set_dirty_logging_all(true));
            dirty_->clear(0, config_.max_addr);
            tracking_ = true;
            return {};
        });
    }

    /// Turns logging off in every partition; the marks left are discarded by the next start.
    Result<void> stop_dirty_tracking()
    {
        return control([&](Control&) -> Result<void> {
            if (!tracking_)
                return make_error(errc::conflict, "dirty tracking is off");
            MEMBACKING_TRY(partitions_.set_dirty_logging_all(false));
            tracking_ = false;
            return {};
        });
    }

    /// The dirty pages of `range`, taken and reset: out(bitmap) gets them after the
    /// partitions' logs of the windows in range have been merged into the bitmap.
    template <class Out>
    Result<void> take_dirty(const MemoryRange& range, Out&& out)
    {
        return control([&](Control& c) -> Result<void> {
            if (!tracking_)
                return make_error(errc::conflict, "dirty tracking is off");
            if (range.end() > c.max_addr)
                return outside_address_space(range, c.max_addr);
            MEMBACKING_TRY(partitions_.take_dirty_logs(
                c.regions.active_regions(), range,
                [&](std::uint64_t gpa, std::span<const std::uint64_t> bits) {
                    dirty_->merge(gpa, bits);
                }));
            if (!out(*dirty_))
                return Error(std::error_code(errno, std::system_category()),
                             "the process-wide memory barrier (membarrier) of a dirty harvest "
                             "failed: the pages taken may miss writes");
            return {};
        });
    }

    /// Whether tracking is on (for tests).
    [[nodiscard]] bool dirty_tracking() const
    {
        std::lock_guard lock(control_);
        return tracking_;
    }

    // ---- the memory table and its run-time listeners ----

    /// Registers a listener and gives it the whole table, in one control operation.
    template <MemoryListener L>
    Result<ListenerId> add_listener(std::shared_ptr<L> listener)
    {
        return control([&](Control&) { return listeners_.add(std::move(listener)); });
    }

    /// Waits for a running control operation; afterwards the listener is never called again.
    Result<void> remove_listener(ListenerId id)
    {
        return control([&](Control&) { return listeners_.remove(id); });
    }

    [[nodiscard]] std::vector<MemoryPiece> memory_table() const
    {
        std::lock_guard lock(control_);
        return listeners_.pieces();
    }

    [[nodiscard]] std::vector<ListenerSet::Info> memory_listeners() const
    {
        std::lock_guard lock(control_);
        return listeners_.describe();
    }

    // ---- access and inspection ----

    [[nodiscard]] const std::shared_ptr<Mapper>& primary() const noexcept { return primary_; }

    Result<std::shared_ptr<Mapper>> new_mapper(MapperMode mode)
    {
        std::lock_guard lock(control_);
        if (closed_)
            return make_error(errc::not_found, "the guest memory manager is gone");
        return va_.new_mapper(mode);
    }

    Result<void> restore_mapper(std::uint64_t id)
    {
        std::lock_guard lock(control_);
        if (closed_)
            return make_error(errc::not_found, "the guest memory manager is gone");
        return va_.restore_mapper(id);
    }

    [[nodiscard]] std::uint64_t max_address() const noexcept { return config_.max_addr; }

#if MEMBACKING_OS_LINUX
    /// Whether every object `change` adds a piece of may be handed to another process
    /// (manager/detail/shared_objects.hpp). Takes no lock: only a listener's apply() calls it,
    /// inside a control call, under the control lock.
    template <class Sys>
    [[nodiscard]] Result<void> check_shared_objects(const MemoryTableChange& change) const
    {
        return detail::check_shared_objects<Sys>(regions_, change);
    }

    /// Lease windows mapped and not retired (for tests).
    [[nodiscard]] std::size_t lease_window_count() const
    {
        return va_.lease_window_count();
    }
#endif

    [[nodiscard]] std::optional<RamBooks::Backing> sole_shared_backing() const
    {
        std::lock_guard lock(control_);
        return ram_.sole_shared_backing();
    }

    /// Every RAM backing, in the builder's order.
    [[nodiscard]] std::vector<RamBooks::Backing> ram_backings() const
    {
        std::lock_guard lock(control_);
        return ram_.backings;
    }

    [[nodiscard]] MemoryMap memory_map() const
    {
        std::lock_guard lock(control_);
        MemoryMap map = build_memory_map(regions_, partitions_.describe(), va_.mapper_count(),
                                         Gpa{config_.max_addr});
        map.health = health_locked();
        return map;
    }

    /// What host failures took out of service (see Health).
    [[nodiscard]] Health health() const
    {
        std::lock_guard lock(control_);
        return health_locked();
    }

private:
    [[nodiscard]] Health health_locked() const
    {
        Health h;
        for (auto& q : va_.quarantined_mappers())
            h.quarantined_mappers.push_back({q.id, std::move(q.cause), q.invalidated});
        h.failed_partitions = partitions_.failed();
        return h;
    }

    /// The end of a control operation: takes the advice the partitions were given and gives it
    /// with the lock released; shut_down() waits for it, since it may touch partitions.
    void give_advice(std::unique_lock<std::mutex>& lock)
    {
        auto advice = partitions_.take_deferred();
        if (advice.empty())
            return;
        ++advising_;
        lock.unlock();
        for (const auto& give : advice)
            give();
        lock.lock();
        if (--advising_ == 0)
            advice_given_.notify_all();
    }

    /// What control() returns after shut_down() began, for an operation returning R.
    template <class R>
    static R gone()
    {
        if constexpr (std::is_void_v<R>)
            return;
        else if constexpr (std::is_constructible_v<R, Error>)
            return R(make_error(errc::not_found, "the guest memory manager is gone"));
        else
            return R{}; // an optional: nothing
    }

    /// During a migration, a partition about to be detached would take its guest's writes with
    /// it: its log of each visible window moves into the bitmap first (read-only ones too: a
    /// window made read-only during the pass keeps, in the partition, what the guest wrote
    /// before). Exact only with the vCPUs held from that read until the windows are gone: with
    /// a quiesce hook they are (hold_vcpus, in the detach's own operation); without one, a
    /// write between the read and a window's removal would go with the partition, so every
    /// visible window is reported dirty whole instead. So is a window whose log cannot be read
    /// (the partition failed, or the read fails). A page reported but not written costs a copy,
    /// a page lost costs the migration. If the detach then fails, the pages stay reported.
    void keep_dirty_log_of(PartitionId id, const std::vector<RegionActivation>& visible)
    {
        if constexpr (Tracking::enabled) {
            if (!tracking_ || !partitions_.attached(id))
                return;
            const bool held = partitions_.hold_vcpus(id);
            for (const RegionActivation& w : visible) {
                if (held)
                    if (auto bits = partitions_.take_dirty_log(id, w.gpa)) {
                        dirty_->merge(w.gpa.start(), *bits);
                        continue;
                    }
                dirty_since_change(w.gpa);
            }
        }
    }

    /// A change of what is visible at `range` (a mapping added, a window mapped): its bytes
    /// differ from what a copy made before may hold, so it is dirty whole. This is what makes a
    /// region that is toggled, moved or removed during a pass lose no dirty page (README, "Dirty
    /// tracking"): its pages are reported at the GPA where its bytes now are.
    void dirty_since_change(const MemoryRange& range) noexcept
    {
        if constexpr (Tracking::enabled)
            if (!range.empty())
                dirty_->mark(range.start(), range.size());
    }

    ManagerCore(const Config& config, MappingManager<Va> va, std::shared_ptr<Mapper> primary)
        : config_(config), va_(std::move(va)), primary_(std::move(primary)),
          dirty_(primary_->dirty_bitmap_owner()), sink_{this}, regions_(sink_),
          partitions_({primary_->base(), config.vtl0_alias_map, config.pin_mappings})
    {}

    mutable std::mutex control_;
    bool closed_ = false;                  ///< shut_down() began (under control_)
    std::size_t advising_ = 0;             ///< control calls giving advice (under control_)
    std::condition_variable advice_given_; ///< advising_ went to 0
    Config config_;
    MappingManager<Va> va_;
    std::shared_ptr<Mapper> primary_;
    std::shared_ptr<DirtyBitmap> dirty_; ///< null unless Tracking::enabled
    bool tracking_ = false;              ///< between start and stop (under control_)
    ListenerSet listeners_;              // before the region manager, whose sink uses it
    Sink sink_;
    Regions regions_;
    PartitionSet<Partitions...> partitions_;
    RamBooks ram_;
};

} // namespace membacking::detail
