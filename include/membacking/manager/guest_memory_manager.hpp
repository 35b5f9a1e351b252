/**
 * @file manager/guest_memory_manager.hpp
 * Layer: manager.
 *
 * GuestMemoryManager<Resolver, Va, Partitions...>: the one type a VMM uses. It is composed at
 * compile time from a region resolver (NestedPriority), a VA policy (LinuxMmap) and any number of
 * partition policies (KvmPartition, MockPartition, ...). TrackedGuestMemoryManager<...> is the
 * same with dirty tracking on the access path (manager/manager_fwd.hpp): both are
 * BasicGuestMemoryManager<Tracking, Resolver, Va, Partitions...>. Each policy is checked, one
 * sub-concept at a time, by static_asserts whose messages name the missing member and its
 * declaration (detail::check_partition_mapper and friends): the template parameters are plain
 * `class` parameters on purpose, because a constrained parameter makes GCC 12 report only that the
 * whole concept "evaluated to false".
 *
 * Built by GuestMemoryBuilder (manager/builder.hpp). Move-only (a moved-from manager's control
 * calls fail with errc::not_found, its guest_memory() is an empty handle); destroying it takes
 * guest memory out of every partition and invalidates every VA mapper, so GuestMemory handles that
 * outlive it get errors, never stale memory. Every method is thread-safe, and every control
 * operation returns only after every VA mapper and partition reflects it.
 *
 * Example (README.md has the whole of it, compiled as a test):
 *     using Manager = GuestMemoryManager<NestedPriority, LinuxMmap<>, KvmPartition<>>;
 *     auto manager = Manager::builder()
 *                        .x86_legacy_support(true)
 *                        .add_backing(RamBackingRequest({MemoryRange::constant(0, 256 << 20)}))
 *                        .build(4_GiB);
 *     MEMBACKING_TRY(manager->attach_partition(Vtl::vtl0, kvm));
 *     auto memory = manager->guest_memory();
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/guest_memory.hpp>
#include <membacking/manager/client.hpp>
#include <membacking/manager/detail/manager_core.hpp>
#include <membacking/manager/device_memory.hpp>
#include <membacking/manager/manager_fwd.hpp>
#include <membacking/manager/memory_map.hpp>
#include <membacking/manager/quiesce_hook.hpp>
#include <membacking/manager/ram_visibility.hpp>
#include <membacking/manager/shared_backing.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/mapping/memory_listener.hpp>
#include <membacking/mapping/memory_piece.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/resolver.hpp>
#include <membacking/va/va_policy.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace membacking {

template <class Manager>
class GuestMemoryBuilder;

template <class Tracking, class Resolver, class Va, class... Partitions>
class BasicGuestMemoryManager {
    // First in the class, so that a bad policy's message is the first error the compiler prints.
    static_assert(detail::check_region_resolver<Resolver>());
    static_assert(detail::check_va_policy<Va>());
    static_assert((detail::check_partition_mapper<Partitions>() && ...));

public:
    using Core = detail::ManagerCore<Tracking, Resolver, Va, Partitions...>;
    using TrackingPolicy = Tracking;
    using VaPolicyType = Va;
    using ResolverType = Resolver;
    using Mapper = VaMapper<Va>;
    using Memory = GuestMemory<Mapper, Gpa, Tracking>;
    using MemoryView = GuestMemoryView<Mapper, Gpa, Tracking>;
    using Builder = GuestMemoryBuilder<BasicGuestMemoryManager>;
    using Client = GuestMemoryClient<Core>;
    using VisibilityControl = RamVisibilityControl<Core>;
    using DeviceMapper = DeviceMemoryMapper<Core>;
    using Device = DeviceRegion<Core>;

    static_assert(!std::is_polymorphic_v<Memory>, "the access path has no virtual calls");

    [[nodiscard]] static Builder builder() { return Builder(); }

    BasicGuestMemoryManager(BasicGuestMemoryManager&&) noexcept = default;
    BasicGuestMemoryManager& operator=(BasicGuestMemoryManager&& other) noexcept
    {
        if (this != &other) {
            shut_down();
            core_ = std::move(other.core_);
        }
        return *this;
    }
    BasicGuestMemoryManager(const BasicGuestMemoryManager&) = delete;
    BasicGuestMemoryManager& operator=(const BasicGuestMemoryManager&) = delete;
    /// Tears down before it returns, even while another thread is inside a control call through
    /// a façade that keeps the core alive: it waits for that call, then unmaps every partition
    /// and invalidates every VA mapper; later façade calls fail with errc::not_found.
    ~BasicGuestMemoryManager() { shut_down(); }

    /// The access API over the primary VA mapper (the one partitions map from): the one
    /// spelling of the primary GuestMemory. Copies share the mapper; hand one to each device.
    [[nodiscard]] Memory guest_memory() const
    {
        return core_ ? Memory(core_->primary()) : Memory();
    }
    /// Makes further (lazy) mappers: client().lazy_guest_memory().
    [[nodiscard]] Client client() const { return Client(core_); }

    /// Maps every visible region into `partition` and keeps it in sync from now on. A VTL2
    /// partition also gets all of memory at the VTL0 alias offset, if one is configured. All or
    /// nothing: on failure the partition is left with nothing mapped; the error keeps its cause's
    /// code, under the message "failed to attach partition to memory manager".
    /// `quiesce` is the partition's quiesce bracket (manager/quiesce_hook.hpp): give one whenever
    /// the partition's vCPUs may run during control calls.
    template <class P>
    Result<PartitionId> attach_partition(Vtl vtl, std::shared_ptr<P> partition,
                                         QuiesceHook quiesce = {})
    {
        static_assert(detail::occurs_once<P, Partitions...>,
                      "attach_partition: this partition policy is not one of the manager's");
        MEMBACKING_TRY(live());
        return core_->attach(vtl, std::move(partition), std::move(quiesce));
    }

    /// Unmaps everything from a partition and forgets it.
    Result<void> detach_partition(PartitionId id)
    {
        MEMBACKING_TRY(live());
        return core_->detach(id);
    }

    // ---- dirty tracking: the one API of a migration loop (TrackedGuestMemoryManager only) ----
    // The pages written since the last take: the union of every partition's log (guest writes)
    // and the marks of every GuestMemory of this manager (VMM writes, write leases on release).
    // A change of what is visible (a window mapped, moved, toggled back, a mapping replaced)
    // makes its whole range dirty, so pages are always reported where their bytes now are
    // (README, "Dirty tracking").

    /// Starts a migration: clears the VMM's marks and turns logging on in every attached
    /// partition (and in partitions attached later). All or nothing; errc::unsupported if a
    /// partition's policy cannot log, errc::conflict if tracking is on already.
    Result<void> start_dirty_tracking() requires(Tracking::enabled)
    {
        MEMBACKING_TRY(live());
        return core_->start_dirty_tracking();
    }

    /// Takes the dirty pages of `range` (page-aligned, inside the address space) and resets
    /// them: appended to `out` as maximal runs in ascending GPA order. `out` is not cleared, so
    /// a loop can reuse its capacity. Pages outside `range` keep their state.
    Result<void> take_dirty_runs(const MemoryRange& range,
                                 std::vector<DirtyRun>& out) requires(Tracking::enabled)
    {
        MEMBACKING_TRY(live());
        return core_->take_dirty(range, [&](const detail::DirtyBitmap& bits) {
            return bits.take_runs(range.start(), range.size(), out);
        });
    }

    /// The same as a bitmap: bit i of out[i / 64] is the page at range.start() + i * 4 KiB
    /// (OR-ed in; `out` must hold one bit per page of range, errc::invalid_argument otherwise).
    Result<void> take_dirty_bitmap(const MemoryRange& range,
                                   std::span<std::uint64_t> out) requires(Tracking::enabled)
    {
        MEMBACKING_TRY(live());
        if (out.size() * 64 < range.size() / page_size)
            return make_error(errc::invalid_argument,
                              "a dirty bitmap of " + std::to_string(out.size()) +
                                  " words cannot hold the pages of " + range.to_string());
        return core_->take_dirty(range, [&](const detail::DirtyBitmap& bits) {
            return bits.take_bitmap(range.start(), range.size(), out);
        });
    }

    /// Ends a migration: logging off in every partition. errc::conflict if tracking is off.
    Result<void> stop_dirty_tracking() requires(Tracking::enabled)
    {
        MEMBACKING_TRY(live());
        return core_->stop_dirty_tracking();
    }

    [[nodiscard]] VisibilityControl ram_visibility_control() const
    {
        return VisibilityControl(core_);
    }
    [[nodiscard]] DeviceMapper device_memory_mapper() const { return DeviceMapper(core_); }

    /// The RAM object and its ranges, if there is exactly one backing and it is file-backed.
    [[nodiscard]] std::optional<SharedMemoryBacking> shared_memory_backing() const
    {
        if (!core_)
            return std::nullopt;
        auto backing = core_->sole_shared_backing();
        if (!backing)
            return std::nullopt;
        return SharedMemoryBacking::from_mappable(std::move(backing->object),
                                                  std::move(backing->ranges));
    }

    /// Every RAM backing (for example one per host NUMA node), in the order they were added to
    /// the builder, each with the GPA ranges it holds: restore each with
    /// RamBackingRequest::existing_mappable(backing). errc::unsupported if a backing is private
    /// memory (it lives in this process's VA only and cannot be handed on).
    [[nodiscard]] Result<std::vector<SharedMemoryBacking>> shared_memory_backings() const
    {
        MEMBACKING_TRY(live());
        std::vector<SharedMemoryBacking> out;
        for (auto& backing : core_->ram_backings()) {
            if (backing.object.empty())
                return make_error(errc::unsupported,
                                  "RAM backing " + std::to_string(out.size()) +
                                      " is private memory, which cannot be shared");
            out.push_back(SharedMemoryBacking::from_mappable(std::move(backing.object),
                                                             std::move(backing.ranges)));
        }
        return out;
    }

    // ---- the memory table (vhost-user SET_MEM_TABLE, VFIO MAP_DMA) and its listeners ----

    /// The active guest memory as pieces (GPA range, object and its fd/handle, offset,
    /// writable), by GPA. Private memory appears with an empty object (shareable() false);
    /// require_shareable(table) turns it into an error naming the range.
    [[nodiscard]] std::vector<MemoryPiece> memory_table() const
    {
        return core_ ? core_->memory_table() : std::vector<MemoryPiece>{};
    }

    /// Registers a run-time listener (mapping/memory_listener.hpp has the whole contract): it
    /// gets the whole table now, then every change inside the control call that makes it, all or
    /// nothing (its refusal rolls the call back). Fails, with the listener's error, if it refuses
    /// the initial table.
    template <MemoryListener L>
    Result<ListenerId> add_memory_listener(std::shared_ptr<L> listener)
    {
        MEMBACKING_TRY(live());
        return core_->add_listener(std::move(listener));
    }

    /// Unregisters a listener; safe from any thread while control calls run. Once it returns the
    /// listener is not called again. errc::not_found if it is not registered (or was cut off).
    Result<void> remove_memory_listener(ListenerId id)
    {
        MEMBACKING_TRY(live());
        return core_->remove_listener(id);
    }

    /// A snapshot of the live state, printable as text (to_text) or JSON (to_json).
    [[nodiscard]] MemoryMap memory_map() const { return core_ ? core_->memory_map() : MemoryMap{}; }

    /// What host failures took out of service (also in the memory map): VA mappers quarantined
    /// (their accesses fail with errc::quarantined) and partitions marked failed (the manager
    /// no longer updates them; detach them). ok() on a healthy manager. A control operation that
    /// quarantines something still returns its own error; the others go on working.
    [[nodiscard]] Health health() const { return core_ ? core_->health() : Health{}; }

    /// Puts a quarantined VA mapper (health().quarantined_mappers, by id) back in service once
    /// the host accepts calls again (MappingManager::restore_mapper: all or nothing; refused
    /// while the host still refuses to invalidate its range, or while private memory is
    /// mapped). Its GuestMemory handles read and write the current guest memory again.
    Result<void> restore_mapper(std::uint64_t id)
    {
        MEMBACKING_TRY(live());
        return core_->restore_mapper(id);
    }

    /// VA mappers that the host refused to invalidate when a manager of this VA policy was torn
    /// down (a whole-range mmap and mprotect both refused), over the whole process: each is left
    /// mapped, quarantined, and a GuestMemory handle that survived its manager reads the guest
    /// memory as it was until it is dropped (README, "A host whose resources keep failing").
    [[nodiscard]] static std::uint64_t teardown_leaks() noexcept
    {
        return MappingManager<Va>::teardown_leaks();
    }

    /// The end of the guest address space: every GPA is below it (build's address_space).
    [[nodiscard]] Gpa max_address() const noexcept
    {
        return core_ ? Gpa(core_->max_address()) : Gpa{0};
    }

    // ---- the region API underneath (for VMMs that manage regions themselves) ----
    // Ranges are MemoryRanges (MemoryRange::from(Gpa, Length), or ::constant); mappings are
    // RegionMappings at region-relative ranges; the name comes first, as in new_region.

    Result<RegionId> add_region(std::string name, MemoryRange range, std::uint8_t priority,
                                MappingType type)
    {
        MEMBACKING_TRY(live());
        return core_->add_region(std::move(name), range, priority, type);
    }
    Result<void> map_region(RegionId id, const MapParams& params)
    {
        MEMBACKING_TRY(live());
        return core_->map_region(id, params);
    }
    Result<void> unmap_region(RegionId id)
    {
        MEMBACKING_TRY(live());
        return core_->unmap_region(id);
    }
    Result<void> remove_region(RegionId id)
    {
        MEMBACKING_TRY(live());
        return core_->remove_region(id);
    }
    Result<void> add_mapping(RegionId id, const RegionMapping& m)
    {
        MEMBACKING_TRY(live());
        return core_->add_mapping(id, m);
    }
    Result<void> remove_mappings(RegionId id, const MemoryRange& range_in_region)
    {
        MEMBACKING_TRY(live());
        return core_->remove_mappings(id, range_in_region);
    }

    /// The shared core, for tests and tools that need to look inside.
    [[nodiscard]] const Core& core() const noexcept
    {
        if (!core_)
            detail::fatal("GuestMemoryManager::core() on a moved-from manager");
        return *core_;
    }

private:
    friend Builder;
    explicit BasicGuestMemoryManager(std::shared_ptr<Core> core) : core_(std::move(core)) {}

    void shut_down() noexcept
    {
        if (core_)
            core_->shut_down();
    }

    /// A moved-from manager has no core: its control calls fail with errc::not_found, its
    /// GuestMemory is empty (every access fails) and its facades act as after destruction.
    [[nodiscard]] Result<void> live() const
    {
        if (!core_)
            return make_error(errc::not_found, "this guest memory manager was moved from");
        return {};
    }

    std::shared_ptr<Core> core_;
};

} // namespace membacking

#include <membacking/manager/builder.hpp>
