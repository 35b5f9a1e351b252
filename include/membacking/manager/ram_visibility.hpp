/**
 * @file manager/ram_visibility.hpp
 * Layer: manager.
 *
 * RamVisibilityControl: changes what the guest sees in one controllable RAM range (the x86 legacy
 * PAM segments and VGA window, or any RAM range the builder created). Reference inventory §2.8.
 *
 * The range must be exactly one RAM region's range; anything else is errc::not_found with
 * "{range} is not a controllable RAM range". A change returns only after every VA mapper and
 * partition reflects it, and a failure leaves visibility as it was. Thread-safe; fails with
 * errc::not_found once the manager is gone.
 *
 * What each party sees in the range, per visibility (the guest = any attached partition; the
 * VMM = GuestMemory, whose accesses see exactly what the guest sees):
 * - unmapped: whatever lies below (device memory, such as a ROM placed there), with that
 *   region's own permissions; where nothing lies below, no memory (guest: MMIO exits; VMM:
 *   errc::unmapped).
 * - read_only: the RAM; writes exit to the VMM (VMM: errc::read_only), even over device memory.
 * - read_write: the RAM.
 * - write_only (i440FX PAM WE=1, RE=0): reads see whatever lies below, exposed read-only even if
 *   it was placed writable (on KVM a KVM_MEM_READONLY slot, on WHP a read-only mapping, on the
 *   mock a read-only window), so every guest write exits to the VMM; where nothing lies below,
 *   reads and writes exit (answer open bus). The VMM's GuestMemory sees the same: reads return
 *   the lower region's bytes, writes fail with errc::read_only (errc::unmapped where nothing lies
 *   below) naming the GPA, and change nothing. The hidden RAM keeps its contents; the VMM
 *   forwards a guest's write exit into it through shadow_ram_target(gpa, length), which gives
 *   the RAM's object and the offset of gpa in it. We do not let GuestMemory writes land in the
 *   hidden RAM: GuestMemory is the guest's view (a device's DMA sees what the CPU sees), and a
 *   write that succeeded but could not be read back at the same GPA would surprise every caller.
 *
 * write_only is the RAM region unmapped plus its read-only cap (RegionManager::set_read_only_cap):
 * the resolver alone decides what is visible, the cap only how writable it is.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/manager/detail/lock_core.hpp>
#include <membacking/manager/shared_backing.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/va/mappable.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

namespace membacking {

/// Where a guest write to write-only RAM belongs: `object` at `offset` (the GPA's byte), inside
/// the write-only RAM range `ram`. Write it with pwrite(object.native_handle(), ...) on Linux,
/// through a view of the section on Windows.
struct ShadowRamTarget {
    Mappable object;
    Offset offset;
    MemoryRange ram;
};

template <class Core>
class RamVisibilityControl {
public:
    explicit RamVisibilityControl(std::weak_ptr<Core> core) : core_(std::move(core)) {}

    Result<void> set_ram_visibility(const MemoryRange& range, RamVisibility visibility) const
    {
        if (!is_valid(visibility))
            return make_error(errc::invalid_argument,
                              "RAM visibility value " +
                                  std::to_string(static_cast<unsigned>(visibility)) + " for " +
                                  range.to_string() + " is not a RamVisibility");
        auto core = detail::lock_core(core_);
        if (!core)
            return std::move(core).error();
        return (*core)->control([&](typename Core::Control& c) -> Result<void> {
            auto found = c.ram.find_controllable(range);
            if (!found)
                return std::move(found).error();
            const auto* ram = *found;
            const RegionId id = ram->id;
            const bool cap = visibility == RamVisibility::write_only;
            const auto* region = c.regions.find(id);
            const std::optional<MapParams> old_params = region->map_params;
            // The cap goes on before the RAM steps aside and comes off after it returns, so what
            // lies below is never writable for a moment in between.
            detail::UndoLog undo;
            if (cap) {
                MEMBACKING_TRY_CONTEXT(c.regions.set_read_only_cap(id, true),
                                       "failed to make RAM range " + range.to_string() +
                                           " write-only");
                undo.push([&c, id] { return c.regions.set_read_only_cap(id, false); });
            }
            if (visibility == RamVisibility::unmapped || cap) {
                MEMBACKING_TRY(c.regions.unmap_region(id));
            } else {
                const MapParams params{visibility == RamVisibility::read_write, true,
                                       ram->prefetch};
                MEMBACKING_TRY_CONTEXT(c.regions.map_region(id, params),
                                       "failed to map RAM range " + range.to_string());
            }
            undo.push([&c, id, old_params]() -> Result<void> {
                if (old_params)
                    return c.regions.map_region(id, *old_params);
                return c.regions.unmap_region(id);
            });
            if (!cap)
                MEMBACKING_TRY_CONTEXT(c.regions.set_read_only_cap(id, false),
                                       "failed to end write-only RAM range " + range.to_string());
            undo.commit();
            return {};
        });
    }

    /// The visibility of the controllable RAM range `range` (errc::not_found as above).
    [[nodiscard]] Result<RamVisibility> ram_visibility(const MemoryRange& range) const
    {
        auto core = detail::lock_core(core_);
        if (!core)
            return std::move(core).error();
        return (*core)->control([&](typename Core::Control& c) -> Result<RamVisibility> {
            auto found = c.ram.find_controllable(range);
            if (!found)
                return std::move(found).error();
            const auto* ram = *found;
            const auto* region = c.regions.find(ram->id);
            if (region->read_only_cap)
                return RamVisibility::write_only;
            if (!region->map_params)
                return RamVisibility::unmapped;
            return region->map_params->writable ? RamVisibility::read_write
                                                : RamVisibility::read_only;
        });
    }

    /// Where the VMM forwards a guest write of `length` bytes at `gpa` that exited because the
    /// range is write-only: the hidden RAM's object and the offset of `gpa` in it. The bytes
    /// must lie inside one write-only RAM range (errc::not_found naming the bytes otherwise);
    /// private RAM has no object (errc::unsupported).
    [[nodiscard]] Result<ShadowRamTarget> shadow_ram_target(Gpa gpa, Length length) const
    {
        // Guest writes are bytes, not pages: no MemoryRange (page-aligned) here.
        const std::uint64_t start = gpa.value();
        const std::uint64_t end = start + length.value();
        const std::string bytes = MemoryRange::hex(start) + "-" + MemoryRange::hex(end);
        if (length.value() == 0 || end < start)
            return make_error(errc::invalid_range, "no bytes to forward at " + bytes);
        auto core = detail::lock_core(core_);
        if (!core)
            return std::move(core).error();
        return (*core)->control([&](typename Core::Control& c) -> Result<ShadowRamTarget> {
            for (const auto& ram : c.ram.regions) {
                if (start < ram.range.start() || end > ram.range.end())
                    continue;
                if (!c.regions.find(ram.id)->read_only_cap)
                    break;
                for (const auto& backing : c.ram.backings) {
                    const auto shared =
                        SharedMemoryBacking::from_mappable(backing.object, backing.ranges);
                    const auto offset = shared.offset_of(gpa);
                    if (!offset)
                        continue;
                    if (backing.object.empty())
                        return make_error(errc::unsupported,
                                          "write-only RAM at " + bytes +
                                              " is private memory, which has no object");
                    return ShadowRamTarget{backing.object, *offset, ram.range};
                }
            }
            return make_error(errc::not_found, bytes + " is not inside a write-only RAM range");
        });
    }

private:
    std::weak_ptr<Core> core_;
};

} // namespace membacking
