/**
 * @file manager/shared_backing.hpp
 * Layer: manager.
 *
 * SharedMemoryBacking: the guest RAM object of a manager with exactly one file-backed backing,
 * for restarting a VMM (servicing) with the same memory: pass mappable() to
 * RamBackingRequest::existing_mappable of the new manager's first backing. Only one manager
 * should use a backing at a time. Reference inventory §2.7.
 */
#pragma once

#include <membacking/va/mappable.hpp>

#include <utility>

namespace membacking {

class SharedMemoryBacking {
public:
    [[nodiscard]] static SharedMemoryBacking from_mappable(Mappable object)
    {
        return SharedMemoryBacking(std::move(object));
    }
    [[nodiscard]] const Mappable& mappable() const noexcept { return object_; }

private:
    explicit SharedMemoryBacking(Mappable object) : object_(std::move(object)) {}
    Mappable object_;
};

} // namespace membacking
