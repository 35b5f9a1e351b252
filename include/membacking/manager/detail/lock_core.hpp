/**
 * @file manager/detail/lock_core.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/).
 *
 * lock_core: how every façade (GuestMemoryClient, DeviceMemoryMapper, DeviceRegion,
 * RamVisibilityControl) reaches the manager's core through its weak pointer, with the one error
 * they all report once the manager is gone.
 */
#pragma once

#include <membacking/base/result.hpp>

#include <memory>

namespace membacking::detail {

/// The core behind `weak`, or errc::not_found "the guest memory manager is gone".
template <class Core>
[[nodiscard]] Result<std::shared_ptr<Core>> lock_core(const std::weak_ptr<Core>& weak)
{
    if (auto core = weak.lock())
        return core;
    return make_error(errc::not_found, "the guest memory manager is gone");
}

} // namespace membacking::detail
