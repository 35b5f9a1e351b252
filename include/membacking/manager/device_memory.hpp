/**
 * @file manager/device_memory.hpp
 * Layer: manager.
 *
 * DeviceMemoryMapper: regions of device memory (a BAR, a virtio shared-memory window, a
 * virtio-fs DAX window, VGA VRAM) that a device fills with mappings and places in the guest at a
 * GPA of its choice, at device priority (0) by default, so RAM hides it where they overlap.
 * Reference inventory §8, with its quirks fixed:
 * - mappings behave like mmap: a new one replaces and splits what it covers (reference: todo!());
 * - offsets are checked against the region's size when mapped (reference: a later panic);
 * - unmap drops the mappings inside the range (the reference's local list kept exactly those and
 *   dropped the others, which only showed at the next placement);
 * - moving the region is all or nothing: a failed move leaves it where it was.
 *
 * DeviceRegion is the handle of one such region. Dropping it removes the region from the guest.
 * Every call is thread-safe and returns after the guest's view reflects it.
 *
 *     auto vram = create_memfd("vram", 64_KiB);                       // Result<Mappable>
 *     auto bar = manager.device_memory_mapper().new_region("bar0", 64_KiB);
 *     bar->map({.offset = Offset{0}, .length = 64_KiB, .object = *vram,
 *               .protection = Protection::read_write});
 *     bar->map_to_guest(0xfe000000_gpa, Protection::read_write);
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/manager/detail/device_regions.hpp>
#include <membacking/manager/detail/lock_core.hpp>
#include <membacking/va/mappable.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace membacking {

/// One mapping of a device region: [offset, offset + length) of the region shows
/// [object_offset, object_offset + length) of object. Fill it with designated initializers, so
/// that the two offsets and the length are named where they are written.
struct DeviceMapping {
    Offset offset;        ///< where the mapping starts in the device region (page aligned)
    Length length;        ///< page aligned, non-zero
    Mappable object;      ///< what is mapped (e.g. create_memfd's)
    Offset object_offset; ///< where in the object (page aligned; default 0)
    Protection protection = Protection::read_only;
};

/// A piece of an object placed in the guest across RAM region boundaries, for
/// DeviceMemoryMapper::place_split: [gpa, gpa + length) of the guest shows [object_offset,
/// object_offset + length) of object. The typical one is an option ROM under several 16 KiB PAM
/// segments.
struct SplitPlacement {
    std::string name;     ///< each piece is named name + "@" + its GPA in hex
    Gpa gpa;              ///< page aligned
    Length length;        ///< page aligned, non-zero
    Mappable object;      ///< what is mapped
    Offset object_offset; ///< page aligned; default 0
    Protection protection = Protection::read_only;
};

template <class Core>
class DeviceRegion {
public:
    DeviceRegion(DeviceRegion&&) noexcept = default;
    DeviceRegion& operator=(DeviceRegion&& other) noexcept
    {
        if (this != &other) {
            remove();
            core_ = std::move(other.core_);
            state_ = std::move(other.state_);
        }
        return *this;
    }
    DeviceRegion(const DeviceRegion&) = delete;
    DeviceRegion& operator=(const DeviceRegion&) = delete;
    ~DeviceRegion() { remove(); }

    /// Maps m.object into the region (see DeviceMapping), replacing and splitting whatever
    /// mappings were there (mmap semantics). Visible to the guest at once if placed.
    Result<void> map(const DeviceMapping& m)
    {
        return control([&](Ops ops) {
            return ops.map(*state_, m.offset.value(), m.object, m.object_offset.value(),
                           m.length.value(), is_writable(m.protection));
        });
    }

    /// Removes whatever is mapped in [offset, offset + length), splitting mappings at the edges.
    Result<void> unmap(Offset offset, Length length)
    {
        return control([&](Ops ops) { return ops.unmap(*state_, offset.value(), length.value()); });
    }

    /// Places the region at gpa (moving it if it is placed elsewhere). A mapping is writable by
    /// the guest only if it and the placement both are.
    Result<void> map_to_guest(Gpa gpa, Protection protection)
    {
        return control([&](Ops ops) {
            return ops.map_to_guest(*state_, gpa.value(), is_writable(protection));
        });
    }

    /// Takes the region out of the guest; its mappings are kept for the next placement.
    Result<void> unmap_from_guest()
    {
        return control([&](Ops ops) { return ops.unmap_from_guest(*state_); });
    }

    [[nodiscard]] Length size() const noexcept { return Length(state_->size); }
    [[nodiscard]] const std::string& name() const noexcept { return state_->name; }
    /// Where the region is in the guest, if it is.
    [[nodiscard]] std::optional<MemoryRange> placement() const
    {
        auto core = core_.lock();
        if (!core)
            return std::nullopt;
        return core->control([&](auto&) { return Ops::placement(*state_); });
    }

private:
    template <class>
    friend class DeviceMemoryMapper;

    DeviceRegion(std::weak_ptr<Core> core, std::shared_ptr<detail::DeviceRegionState> state)
        : core_(std::move(core)), state_(std::move(state))
    {}

    using Ops = detail::DeviceRegionOps<typename Core::Regions, typename Core::VaPolicyType>;

    /// Runs f(Ops) as one control operation of the manager, if it is still there.
    template <class F>
    Result<void> control(F&& f)
    {
        auto core = detail::lock_core(core_);
        if (!core)
            return std::move(core).error();
        return (*core)->control(
            [&](typename Core::Control& c) { return f(Ops(c.regions, c.max_addr)); });
    }

    /// A destructor cannot report an error: if the removal fails (a partition refused to
    /// unmap), the region stays in the guest, consistent in every mapper and partition, until
    /// the manager goes. Call unmap_from_guest() first to see the error.
    void remove() noexcept
    {
        if (!state_)
            return;
        (void)control([&](Ops ops) { return ops.unmap_from_guest(*state_); });
        state_.reset();
    }

    std::weak_ptr<Core> core_;
    std::shared_ptr<detail::DeviceRegionState> state_;
};

template <class Core>
class DeviceMemoryMapper {
public:
    /// Regions created by devices sit below RAM (which has priority 255).
    static constexpr std::uint8_t device_priority = 0;

    explicit DeviceMemoryMapper(std::weak_ptr<Core> core) : core_(std::move(core)) {}

    /// A new, unplaced device region of `size` bytes (page aligned, non-zero).
    Result<DeviceRegion<Core>> new_region(std::string name, Length size,
                                          std::uint8_t priority = device_priority) const
    {
        if (const auto core = core_.lock(); !core || core->closed())
            return make_error(errc::not_found, "cannot create device region '" + name +
                                                   "': the guest memory manager is gone");
        if (size == Length{0} || !is_page_aligned(size.value()))
            return make_error(errc::invalid_range, "device region '" + name + "' size " +
                                                       to_string(size) +
                                                       " is zero or not page aligned");
        auto state = std::make_shared<detail::DeviceRegionState>();
        state->name = std::move(name);
        state->size = size.value();
        state->priority = priority;
        return DeviceRegion<Core>(core_, std::move(state));
    }

    /// Places one object in the guest as one device region per piece between the boundaries of
    /// the RAM regions it overlaps, each mapping its slice of the object: the nested priority rule
    /// refuses a device region that straddles a boundary of a RAM region above it (a 64 KiB option
    /// ROM under four 16 KiB PAM segments: x86_legacy::pam_segments), while each piece nests
    /// under the one RAM region over it, so each shows wherever that region's visibility lets it.
    /// Returns the pieces' handles in GPA order (dropping one takes that piece out). All or
    /// nothing: on failure no piece remains.
    Result<std::vector<DeviceRegion<Core>>>
    place_split(const SplitPlacement& p, std::uint8_t priority = device_priority) const
    {
        auto whole = MemoryRange::from(p.gpa, p.length);
        if (!whole)
            return std::move(whole).error().context("device placement '" + p.name + "'");
        if (whole->empty())
            return make_error(errc::invalid_range,
                              "device placement '" + p.name + "' has no length");
        auto core = detail::lock_core(core_);
        if (!core)
            return std::move(core).error();
        return (*core)->control(
            [&](typename Core::Control& c) -> Result<std::vector<DeviceRegion<Core>>> {
                using Ops =
                    detail::DeviceRegionOps<typename Core::Regions, typename Core::VaPolicyType>;
                Ops ops(c.regions, c.max_addr);
                // The whole object range first: no piece is placed if it lies beyond the object.
                if (!p.object.empty())
                    MEMBACKING_TRY_CONTEXT(detail::check_object_covers<typename Core::VaPolicyType>(
                                               p.object, p.object_offset.value(), whole->size()),
                                           "device placement '" + p.name + "' at " +
                                               whole->to_string());
                // States first, handles only on success: a handle dropped here would take the
                // control lock again from its destructor.
                std::vector<std::shared_ptr<detail::DeviceRegionState>> states;
                detail::UndoLog undo;
                for (const MemoryRange& piece : c.ram.split_at_boundaries(*whole)) {
                    auto state = std::make_shared<detail::DeviceRegionState>();
                    state->name = p.name + "@" + MemoryRange::hex(piece.start());
                    state->size = piece.size();
                    state->priority = priority;
                    const std::uint64_t delta = piece.start() - whole->start();
                    const bool writable = is_writable(p.protection);
                    MEMBACKING_TRY_CONTEXT(ops.map(*state, 0, p.object,
                                                   p.object_offset.value() + delta, piece.size(),
                                                   writable),
                                           "device placement '" + p.name + "'");
                    MEMBACKING_TRY_CONTEXT(ops.map_to_guest(*state, piece.start(), writable),
                                           "device placement '" + p.name + "'");
                    undo.push([ops, state]() mutable { return ops.unmap_from_guest(*state); });
                    states.push_back(std::move(state));
                }
                undo.commit();
                std::vector<DeviceRegion<Core>> pieces;
                for (auto& state : states)
                    pieces.push_back(DeviceRegion<Core>(core_, std::move(state)));
                return pieces;
            });
    }

private:
    std::weak_ptr<Core> core_;
};

} // namespace membacking
