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
 *
 * serve_process() (Linux) shares guest memory with another process: the manager serves one end
 * of a SOCK_SEQPACKET socket (ipc::Channel<>::pair() makes one), the other process connects its
 * own lazy mapper to the other end (ipc::connect_guest_memory). The manager's side is a memory
 * listener (ipc/remote_listener.hpp), registered like any other: its invalidations happen inside
 * the control call, bounded by a deadline after which the process is cut off. A tracked manager
 * (TrackedGuestMemoryManager) hands the process its dirty bitmap too: the process must connect
 * with ipc::connect_guest_memory<DirtyTracking>, and its writes are marked like local ones; a
 * byte-map manager (ByteMapTrackedGuestMemoryManager) hands it its byte map, and the process
 * connects with ipc::connect_guest_memory<ByteMapDirtyTracking>.
 */
#pragma once

#include <membacking/access/dirty_bitmap.hpp>
#include <membacking/base/config.hpp>
#include <membacking/base/result.hpp>
#include <membacking/guest_memory.hpp>
#include <membacking/manager/detail/lock_core.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/mapping/memory_listener.hpp>

#if MEMBACKING_OS_LINUX
#    include <membacking/ipc/channel.hpp>
#    include <membacking/ipc/remote_listener.hpp>
#endif

#include <memory>
#include <string>
#include <utility>

namespace membacking {

#if MEMBACKING_OS_LINUX
/// A process served by serve_process(): its listener (cut_off(), faults_served()) and the id to
/// disconnect it with (remove_memory_listener).
template <class Sys = os::LinuxSyscalls>
struct ServedProcess {
    ListenerId id;
    std::shared_ptr<ipc::RemoteListener<Sys>> listener;
};
#endif

template <class Core>
class GuestMemoryClient {
public:
    using Memory = GuestMemory<typename Core::Mapper, Gpa, typename Core::TrackingPolicy>;

    explicit GuestMemoryClient(std::weak_ptr<Core> core) : core_(std::move(core)) {}

    [[nodiscard]] Result<Memory> lazy_guest_memory() const
    {
        auto locked = detail::lock_core(core_);
        if (!locked)
            return std::move(locked).error();
        const std::shared_ptr<Core>& core = *locked;
        auto mapper = core->new_mapper(MapperMode::lazy);
        if (!mapper)
            return std::move(mapper).error();
        return Memory(std::move(*mapper));
    }

#if MEMBACKING_OS_LINUX
    /// Serves guest memory to another process over `socket` (the manager's end; give the other
    /// end to the process, which calls ipc::connect_guest_memory on it). errc::unsupported if
    /// the guest has private memory (it has no fd to pass); errc::conflict if an object behind
    /// guest memory is not all guest memory, or is placed part read-only and part writable
    /// (the process could map all of it: manager/detail/shared_objects.hpp); errc::not_found once
    /// the manager is gone. While the process is connected, a control call that would hand it a
    /// piece of such an object is refused and rolled back the same way.
    template <class Sys = os::LinuxSyscalls>
    [[nodiscard]] Result<ServedProcess<Sys>>
    serve_process(ipc::Channel<Sys> socket, std::string name,
                  ipc::RemoteListenerOptions options = {}) const
    {
        auto locked = detail::lock_core(core_);
        if (!locked)
            return std::move(locked).error();
        const std::shared_ptr<Core>& core = *locked;
        options.share_check = [weak = core_](const MemoryTableChange& change) -> Result<void> {
            auto c = weak.lock(); // alive: only its own control calls apply a change
            if (!c)
                return make_error(errc::not_found, "the guest memory manager is gone");
            return c->template check_shared_objects<Sys>(change);
        };
        // A tracked manager shares its dirty map, in its layout: the process marks what it writes.
        int dirty_bitmap_fd = -1;
        auto dirty_layout = ipc::WireDirtyLayout::bits;
        if constexpr (Core::TrackingPolicy::enabled) {
            const auto* dirty = core->primary()->dirty_bitmap();
            dirty_bitmap_fd = dirty->share_fd();
            dirty_layout = ipc::to_wire(dirty->layout());
        }
        auto listener = ipc::RemoteListener<Sys>::create(std::move(socket), core->primary()->size(),
                                                         std::move(name), std::move(options),
                                                         dirty_bitmap_fd, dirty_layout);
        if (!listener)
            return std::move(listener).error();
        auto id = core->add_listener(*listener);
        if (!id)
            return std::move(id).error().context("sharing guest memory with another process");
        return ServedProcess<Sys>{*id, std::move(*listener)};
    }
#endif

private:
    std::weak_ptr<Core> core_;
};

} // namespace membacking
