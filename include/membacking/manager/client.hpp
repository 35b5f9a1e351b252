/**
 * @file manager/client.hpp
 * Layer: manager.
 *
 * GuestMemoryClient: a handle that can make further guest-memory mappers after the manager has
 * been handed out (it holds the manager weakly). lazy_guest_memory() makes a separate lazy
 * mapper that faults mappings in on first access (what the reference does for other processes;
 * useful here for isolating a device's view); it fails with errc::not_found once the manager is
 * gone.
 *
 * The primary GuestMemory (the eager mapper partitions map from) has one spelling:
 * GuestMemoryManager::guest_memory(). Give a device that GuestMemory handle (a copy keeps the
 * mapper alive, and accesses after the manager is gone are errors), not the client.
 */
#pragma once

#include <membacking/base/result.hpp>
#include <membacking/guest_memory.hpp>
#include <membacking/mapping/mapping_manager.hpp>

#include <memory>
#include <utility>

namespace membacking {

template <class Core>
class GuestMemoryClient {
public:
    using Memory = GuestMemory<typename Core::Mapper, Gpa, typename Core::TrackingPolicy>;

    explicit GuestMemoryClient(std::weak_ptr<Core> core) : core_(std::move(core)) {}

    [[nodiscard]] Result<Memory> lazy_guest_memory() const
    {
        auto core = core_.lock();
        if (!core)
            return make_error(errc::not_found, "the guest memory manager is gone");
        auto mapper = core->new_mapper(MapperMode::lazy);
        if (!mapper)
            return std::move(mapper).error();
        return Memory(std::move(*mapper));
    }

private:
    std::weak_ptr<Core> core_;
};

} // namespace membacking
