/**
 * @file manager/ram_visibility.hpp
 * Layer: manager.
 *
 * RamVisibilityControl: changes what the guest sees in one controllable RAM range (the x86 legacy
 * PAM segments and VGA window, or any RAM range the builder created). Reference inventory §2.8.
 *
 * The range must be exactly one RAM region's range; anything else is errc::not_found with
 * "{range} is not a controllable RAM range". Unmapped lets lower regions (device memory) show
 * through; ReadOnly makes writes exit to the VMM even over device memory. A change returns only
 * after every VA mapper and partition reflects it, and a failure leaves visibility as it was.
 * Thread-safe; fails with errc::not_found once the manager is gone.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/manager/types.hpp>

#include <memory>
#include <string>
#include <utility>

namespace membacking {

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
        auto core = core_.lock();
        if (!core)
            return make_error(errc::not_found, "the guest memory manager is gone");
        return core->control([&](typename Core::Control& c) -> Result<void> {
            const auto* ram = c.ram.find(range);
            if (ram == nullptr)
                return make_error(errc::not_found,
                                  range.to_string() + " is not a controllable RAM range");
            if (visibility == RamVisibility::unmapped)
                return c.regions.unmap_region(ram->id);
            const MapParams params{visibility == RamVisibility::read_write, true, ram->prefetch};
            MEMBACKING_TRY_CONTEXT(c.regions.map_region(ram->id, params),
                                   "failed to map RAM range " + range.to_string());
            return {};
        });
    }

private:
    std::weak_ptr<Core> core_;
};

} // namespace membacking
