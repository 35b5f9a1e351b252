/**
 * @file manager/detail/device_regions.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/, detail/, region/,
 * va/mappable.hpp, va/va_policy.hpp, manager/errors.hpp).
 *
 * What the DeviceMemoryMapper façade (manager/device_memory.hpp) does, on the region manager:
 * the state of one device region (DeviceRegionState, shared between its handle and the manager)
 * and the operations on it (DeviceRegionOps). The façade runs each one under the manager's
 * control lock, as one control operation; nothing here locks.
 *
 * Fixed from the reference (inventory §8): mappings replace and split what they cover, offsets are
 * checked when mapped, unmap drops what is inside the range, and a move is all or nothing. Not in
 * the reference: a mapping's file range must lie inside its object when it is added
 * (VaPolicy_object_size of the VA policy `Va`), whether the region is placed or not.
 */
#pragma once

#include <membacking/base/align.hpp>
#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/manager/errors.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/region/mapping_list.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/va/mappable.hpp>
#include <membacking/va/va_policy.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace membacking::detail {

/// The state of one device region, shared between its handle and the manager. Guarded by the
/// manager's control lock.
struct DeviceRegionState {
    std::string name;
    std::uint64_t size = 0;
    std::uint8_t priority = 0;
    MappingList local;              ///< the mappings, replayed each time the region is placed
    std::optional<RegionId> placed; ///< the region while it is in the guest
    std::uint64_t gpa = 0;
    bool writable = false;
};

/// The operations of DeviceRegion, on a RegionManager (`Regions`) whose guest address space ends
/// at max_addr; `Va` is the manager's VA policy (it tells objects' sizes).
template <class Regions, class Va>
class DeviceRegionOps {
public:
    DeviceRegionOps(Regions& regions, std::uint64_t max_addr)
        : regions_(regions), max_addr_(max_addr)
    {}

    Result<void> map(DeviceRegionState& d, std::uint64_t offset, const Mappable& object,
                     std::uint64_t file_offset, std::uint64_t len, bool writable)
    {
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
        MEMBACKING_TRY_CONTEXT(check_object_covers<Va>(object, file_offset, len),
                               "device region '" + d.name + "': mapping at " + rel->to_string());
        const RegionMapping m{
            *rel, MappingBacking::file(object, Offset{file_offset}), writable, {}};
        if (d.placed)
            MEMBACKING_TRY(regions_.add_mapping(*d.placed, m));
        d.local.apply(d.local.replace_edit(m));
        return {};
    }

    Result<void> unmap(DeviceRegionState& d, std::uint64_t offset, std::uint64_t len)
    {
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
    Result<void> map_to_guest(DeviceRegionState& d, std::uint64_t gpa, bool writable)
    {
        auto range = MemoryRange::from(Gpa{gpa}, Length{d.size});
        if (!range)
            return std::move(range).error();
        if (range->end() > max_addr_)
            return outside_address_space(*range, max_addr_);
        if (d.placed && d.gpa == gpa) {
            // Already there: a "move" to the same place is a no-op (the reference removes and
            // re-adds it, so device reads fail meanwhile); a new permission is changed in place.
            if (d.writable != writable) {
                MEMBACKING_TRY(regions_.map_region(*d.placed, {writable, true, false}));
                d.writable = writable;
            }
            return {};
        }
        UndoLog undo;
        if (d.placed) {
            const RegionId old_id = *d.placed;
            MEMBACKING_TRY(regions_.remove_region(old_id));
            d.placed.reset();
            // Back under its old id: among device regions of equal priority on an identical
            // range, the earliest registered is the one visible, so a new id would hand the
            // range to another region after a failed, supposedly all-or-nothing move.
            undo.push(
                [this, &d, old_id, old_gpa = d.gpa, old_writable = d.writable]() -> Result<void> {
                    auto id = place(d, MemoryRange::valid_or_abort(old_gpa, old_gpa + d.size),
                                    old_writable, old_id);
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

    Result<void> unmap_from_guest(DeviceRegionState& d)
    {
        if (!d.placed)
            return {};
        MEMBACKING_TRY(regions_.remove_region(*d.placed));
        d.placed.reset();
        return {};
    }

    [[nodiscard]] static std::optional<MemoryRange> placement(const DeviceRegionState& d)
    {
        if (!d.placed)
            return std::nullopt;
        return MemoryRange::valid_or_abort(d.gpa, d.gpa + d.size);
    }

private:
    static Result<MemoryRange> device_range(const DeviceRegionState& d, std::uint64_t offset,
                                            std::uint64_t len)
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

    Result<RegionId> register_at(const DeviceRegionState& d, const MemoryRange& range,
                                 std::optional<RegionId> restore_id)
    {
        if (!restore_id)
            return regions_.add_region(d.name, range, d.priority, MappingType::Device);
        MEMBACKING_TRY(
            regions_.restore_region(*restore_id, d.name, range, d.priority, MappingType::Device));
        return *restore_id;
    }

    /// Registers the device region at `range` with its mappings and maps it: under a new id, or
    /// under `restore_id` (one it had before). On failure nothing of it remains.
    Result<RegionId> place(const DeviceRegionState& d, const MemoryRange& range, bool writable,
                           std::optional<RegionId> restore_id = std::nullopt)
    {
        auto id = register_at(d, range, restore_id);
        if (!id)
            return std::move(id).error();
        // A half-placed region is registered but not mapped: add_mapping on an unmapped region
        // and a failed map_region (which leaves it unmapped, rolled back) reach no sink. So
        // removing it is book-keeping only: no host call, nothing a host failure can refuse
        // (issue 10, defect 7). Its failure would be a broken invariant, hence the check.
        auto fail = [&](Error e) -> Result<RegionId> {
            MEMBACKING_CHECK(!regions_.find(*id)->mapped(),
                             "a half-placed device region is mapped after a failed placement");
            const bool removed = regions_.remove_region(*id).has_value();
            MEMBACKING_CHECK(removed, "an unmapped device region could not be removed");
            return e;
        };
        for (const auto& [off, m] : d.local)
            if (auto r = regions_.add_mapping(*id, m); !r)
                return fail(std::move(r).error());
        if (auto r = regions_.map_region(*id, {writable, true, false}); !r)
            return fail(std::move(r).error());
        return *id;
    }

    Regions& regions_;
    std::uint64_t max_addr_;
};

} // namespace membacking::detail
