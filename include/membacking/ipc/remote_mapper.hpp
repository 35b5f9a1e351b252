/**
 * @file ipc/remote_mapper.hpp
 * Layer: ipc (includes base/, os/, access/, va/linux_mmap.hpp, ipc/). The whole body is
 * Linux-only.
 *
 * RemoteMapper<Sys>: the lazy VA mapper of a process that is not the manager's. It is handed one
 * end of a SOCK_SEQPACKET socket whose other end the manager serves (ipc/remote_listener.hpp);
 * connect_guest_memory() wraps it in the ordinary GuestMemory handle, so the access path is the
 * local one, instruction for instruction (same template, same primitives, a mapped page costs
 * no system call and no lock).
 *
 * The slow path (resolve_fault, after an access faulted on a page this process has not mapped):
 * send a fault_request, wait for the fault_reply (at most Options::fault_timeout), which the
 * reader thread maps (MAP_SHARED|MAP_FIXED of the fd it carries, the whole piece), then the access
 * is retried. An error reply (no memory there, a write to read-only memory) is the access's error.
 *
 * The reader thread handles every message in socket order: the manager sends replies and
 * invalidations under one lock, so a reply the reader maps can never resurrect memory that an
 * invalidate sent before it removed. An invalidate is applied (the range replaced by the
 * reservation's PROT_NONE pages) before it is acknowledged; the manager's control call waits for
 * that acknowledgement.
 *
 * Losing the manager: EOF on the socket (the manager died, or cut this client off with shutdown),
 * a malformed or unexpected message (logged; never trusted), or a fault request unanswered within
 * fault_timeout all disconnect the mapper: the whole guest range is replaced by PROT_NONE pages at
 * once, waiting fault requests return, and every later access that faults returns
 * errc::unmapped. No access ever hangs: a fault waits at most fault_timeout (1 s by default).
 *
 * Dirty tracking: a tracked manager's hello carries its dirty map (a sealed memfd) and the map's
 * layout (protocol version 3: one bit per page, DirtyTracking, or one byte per page,
 * ByteMapDirtyTracking); connect() maps it in that layout (DirtyBitmap::map_shared, which for the
 * bit layout registers this process for the harvest's global membarrier; the byte layout needs
 * none) and dirty_bitmap() gives it to GuestMemory's marker. connect_guest_memory must be told
 * which it expects (its Tracking argument) and refuses any other (errc::unsupported): an
 * untracked client of a tracked manager would write pages that no harvest reports, a tracked
 * client of an untracked one would mark nothing anyone reads, and a client of the other layout
 * would mark bits where the manager reads bytes, or the reverse. Marks need no message:
 * they land in the manager's words directly, whether tracking is on or off (as local handles'
 * do), so start and stop reach a client without any protocol.
 *
 * Leases are not offered (a remote mapper has no lease domain; GuestMemory::lease does not
 * compile for it).
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX && MEMBACKING_HAS_GUARDED_ACCESS

#    include <membacking/access/dirty_bitmap.hpp>
#    include <membacking/access/dirty_tracking.hpp>
#    include <membacking/access/fault_handler.hpp>
#    include <membacking/base/fatal.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/guest_memory.hpp>
#    include <membacking/ipc/channel.hpp>
#    include <membacking/ipc/protocol.hpp>
#    include <membacking/os/linux.hpp>
#    include <membacking/va/linux_mmap.hpp>
#    include <membacking/va/mappable.hpp>

#    include <atomic>
#    include <chrono>
#    include <condition_variable>
#    include <cstdint>
#    include <memory>
#    include <mutex>
#    include <optional>
#    include <string>
#    include <thread>
#    include <utility>

namespace membacking::ipc {

struct RemoteMapperOptions {
    /// How long a fault waits for the manager's answer before the mapper disconnects.
    std::chrono::milliseconds fault_timeout{1000};
    /// How long connecting waits for the manager's hello.
    std::chrono::milliseconds hello_timeout{5000};
    LogFunction log = &log_to_stderr;
};

template <class Sys = os::LinuxSyscalls>
class RemoteMapper {
public:
    using Options = RemoteMapperOptions;

    RemoteMapper(const RemoteMapper&) = delete;
    RemoteMapper& operator=(const RemoteMapper&) = delete;
    ~RemoteMapper()
    {
        closing_.store(true); // our own EOF: nothing to log
        channel_.shutdown();  // the reader sees EOF, drops every mapping and exits
        if (reader_.joinable())
            reader_.join();
    }

    /// Takes ownership of `socket` (the client end the manager handed over), waits for the
    /// manager's hello, reserves the guest's address space and starts the reader thread.
    [[nodiscard]] static Result<std::shared_ptr<RemoteMapper>> connect(int socket,
                                                                       Options options = {})
    {
        access::install_fault_handler();
        Channel<Sys> channel(socket);
        const auto timeout = static_cast<int>(options.hello_timeout.count());
        auto hello = channel.receive(timeout, DecodeContext{Receiver::client, 0});
        if (!hello)
            return std::move(hello).error().context("connecting to the guest memory manager");
        if (hello->status != Incoming<Sys>::Status::message)
            return make_error(errc::not_found,
                              hello->status == Incoming<Sys>::Status::closed
                                  ? "the guest memory manager closed the socket before hello"
                                  : "no hello from the guest memory manager in time");
        const Hello& h = std::get<Hello>(hello->message.body);
        const std::uint64_t size = h.guest_size;
        std::shared_ptr<membacking::detail::DirtyBitmap> dirty;
        if (h.dirty_bitmap_bytes != 0) {
            auto bitmap = membacking::detail::DirtyBitmap::map_shared<Sys>(
                hello->fd.release(), size, from_wire(h.dirty_layout));
            if (!bitmap)
                return std::move(bitmap).error().context("connecting to the guest memory manager");
            dirty = std::move(*bitmap);
        }
        auto va = LinuxMmap<Sys>::reserve(size, page_size);
        if (!va)
            return std::move(va).error().context("reserving the remote guest's address space");
        std::shared_ptr<RemoteMapper> mapper(
            new RemoteMapper(std::move(*va), size, std::move(channel), options, std::move(dirty)));
        mapper->reader_ = std::thread([m = mapper.get()] { m->read_loop(); });
        return mapper;
    }

    [[nodiscard]] std::byte* base() const noexcept { return va_.base(); }
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    /// False once the manager is gone or cut this process off (then nothing is mapped).
    [[nodiscard]] bool connected() const noexcept { return connected_.load(); }
    /// Fault requests the manager answered with memory (for tests and benchmarks).
    [[nodiscard]] std::uint64_t faults_served() const noexcept { return served_.load(); }
    /// The manager's dirty map, mapped here in the manager's layout (null if the manager does
    /// not track dirty pages): what GuestMemory<RemoteMapper, Gpa, DirtyTracking> (bits) or
    /// GuestMemory<RemoteMapper, Gpa, ByteMapDirtyTracking> (bytes) marks into.
    [[nodiscard]] membacking::detail::DirtyBitmap* dirty_bitmap() const noexcept
    {
        return dirty_.get();
    }

    /// The slow path of an access that faulted at gpa: asks the manager (see the file comment).
    /// std::nullopt: retry; otherwise the access's error.
    [[nodiscard]] std::optional<errc> resolve_fault(std::uint64_t gpa, bool write) noexcept
    {
        // The cold path may allocate (error text); an allocation failure here ends the process
        // through the one fatal path rather than escaping a noexcept function.
        try {
            return ask(gpa, write);
        } catch (...) {
            membacking::detail::fatal("out of memory in a remote mapper's fault path");
        }
    }

private:
    std::optional<errc> ask(std::uint64_t gpa, bool write)
    {
        if (gpa >= size_)
            return errc::out_of_range;
        const std::lock_guard one_at_a_time(fault_mutex_);
        std::unique_lock lock(mutex_);
        if (!connected_)
            return errc::unmapped;
        awaited_ = ++seq_;
        reply_.reset();
        if (auto r = channel_.send({awaited_, FaultRequest{gpa & ~(wire_page_size - 1), write}});
            !r) {
            disconnect_locked("sending a fault request failed: " + r.error().full_message());
            return errc::unmapped;
        }
        const bool answered = cv_.wait_for(lock, options_.fault_timeout,
                                           [&] { return reply_.has_value() || !connected_; });
        if (!answered) {
            disconnect_locked("the manager did not answer a fault at " + MemoryRange::hex(gpa) +
                              " within " + std::to_string(options_.fault_timeout.count()) + " ms");
            return errc::unmapped;
        }
        if (!reply_)
            return errc::unmapped;
        if (*reply_ != 0)
            return static_cast<errc>(*reply_);
        return std::nullopt;
    }

    RemoteMapper(LinuxMmap<Sys> va, std::uint64_t size, Channel<Sys> channel, Options options,
                 std::shared_ptr<membacking::detail::DirtyBitmap> dirty)
        : va_(std::move(va)), size_(size), channel_(std::move(channel)), options_(options),
          dirty_(std::move(dirty))
    {}

    void read_loop() noexcept
    {
        try {
            read_messages();
        } catch (...) {
            membacking::detail::fatal("out of memory in a remote mapper's reader thread");
        }
    }

    void read_messages()
    {
        const DecodeContext ctx{Receiver::client, size_};
        for (;;) {
            auto in = channel_.receive(-1, ctx);
            const std::lock_guard lock(mutex_);
            if (!in) {
                disconnect_locked(in.error().full_message());
                return;
            }
            if (in->status == Incoming<Sys>::Status::closed) {
                disconnect_locked("the guest memory manager closed the socket");
                return;
            }
            if (in->status != Incoming<Sys>::Status::message)
                continue;
            const Message& m = in->message;
            if (const auto* v = std::get_if<Invalidate>(&m.body)) {
                if (auto r = va_.unmap(v->gpa, v->length); !r) {
                    disconnect_locked("invalidating " + MemoryRange::hex(v->gpa) +
                                      " failed: " + r.error().full_message());
                    return;
                }
                if (auto r = channel_.send({m.seq, InvalidateAck{}}); !r) {
                    disconnect_locked("acknowledging an invalidation failed: " +
                                      r.error().full_message());
                    return;
                }
            } else if (const auto* p = std::get_if<FaultReply>(&m.body)) {
                if (m.seq != awaited_ || reply_) {
                    disconnect_locked("a fault reply nobody asked for (seq " +
                                      std::to_string(m.seq) + ")");
                    return;
                }
                if (p->status == 0) {
                    const Mappable object = Mappable::adopt(in->fd.release());
                    if (auto r =
                            va_.map_file(p->gpa, p->length, object, p->object_offset, p->writable);
                        !r) {
                        disconnect_locked("mapping " + MemoryRange::hex(p->gpa) +
                                          " failed: " + r.error().full_message());
                        return;
                    }
                    served_.fetch_add(1, std::memory_order_relaxed);
                }
                reply_ = p->status;
                cv_.notify_all();
            }
        }
    }

    /// Drops every mapping and wakes the waiting fault. Under mutex_.
    void disconnect_locked(const std::string& why)
    {
        if (!connected_.load())
            return;
        if (options_.log != nullptr && !closing_.load())
            options_.log("disconnected from the guest memory manager: " + why);
        if (auto r = va_.unmap(0, size_); !r)
            membacking::detail::fatal("a disconnected remote mapper could not drop its mappings: " +
                                      r.error().full_message());
        // Only now: connected() == false promises that nothing is mapped any more.
        connected_.store(false);
        channel_.shutdown();
        cv_.notify_all();
    }

    LinuxMmap<Sys> va_;
    const std::uint64_t size_;
    Channel<Sys> channel_;
    const Options options_;
    const std::shared_ptr<membacking::detail::DirtyBitmap> dirty_; ///< the manager's, or null
    std::thread reader_;

    std::mutex fault_mutex_; ///< one fault request in flight
    std::mutex mutex_;       ///< the VA, the awaited reply, the connection state
    std::condition_variable cv_;
    std::uint32_t seq_ = 0;
    std::uint32_t awaited_ = 0;
    std::optional<std::uint32_t> reply_;
    std::atomic<bool> connected_ = true;
    std::atomic<bool> closing_ = false;
    std::atomic<std::uint64_t> served_ = 0;
};

namespace detail {

/// The tracking policy whose map has `layout` (for error messages).
[[nodiscard]] constexpr const char* tracking_policy_name(DirtyMapLayout layout) noexcept
{
    return layout == DirtyMapLayout::bytes ? "ByteMapDirtyTracking" : "DirtyTracking";
}

} // namespace detail

/// The client process's GuestMemory over `socket`: the same handle type as a local one.
/// Tracking: DirtyTracking for a manager that tracks dirty pages in a bit map
/// (TrackedGuestMemoryManager), ByteMapDirtyTracking for one with a byte map
/// (ByteMapTrackedGuestMemoryManager), NoDirtyTracking otherwise; a mismatch is
/// errc::unsupported, naming the policy to connect with (file comment).
template <DirtyTrackingPolicy Tracking = NoDirtyTracking, class Sys = os::LinuxSyscalls>
[[nodiscard]] Result<GuestMemory<RemoteMapper<Sys>, Gpa, Tracking>>
connect_guest_memory(int socket, RemoteMapperOptions options = {})
{
    auto mapper = RemoteMapper<Sys>::connect(socket, options);
    if (!mapper)
        return std::move(mapper).error();
    const membacking::detail::DirtyBitmap* dirty = (*mapper)->dirty_bitmap();
    if (dirty != nullptr && !Tracking::enabled) {
        std::string why = "the guest memory manager tracks dirty pages: connect with "
                          "connect_guest_memory<";
        why += detail::tracking_policy_name(dirty->layout());
        why += ">, not connect_guest_memory<NoDirtyTracking>, or a migration would lose this "
               "process's writes";
        return make_error(errc::unsupported, why);
    }
    if (dirty == nullptr && Tracking::enabled) {
        std::string why = "the guest memory manager does not track dirty pages: connect with "
                          "connect_guest_memory<NoDirtyTracking>, not connect_guest_memory<";
        why += detail::tracking_policy_name(Tracking::layout);
        why += ">";
        return make_error(errc::unsupported, why);
    }
    if (dirty != nullptr && Tracking::enabled && dirty->layout() != Tracking::layout) {
        std::string why = "the guest memory manager's dirty map has one ";
        why += dirty->layout() == DirtyMapLayout::bytes ? "byte" : "bit";
        why += " per page: connect with connect_guest_memory<";
        why += detail::tracking_policy_name(dirty->layout());
        why += ">, not connect_guest_memory<";
        why += detail::tracking_policy_name(Tracking::layout);
        why += ">, or this process's marks would be misread";
        return make_error(errc::unsupported, why);
    }
    return GuestMemory<RemoteMapper<Sys>, Gpa, Tracking>(std::move(*mapper));
}

} // namespace membacking::ipc

#endif // MEMBACKING_OS_LINUX && MEMBACKING_HAS_GUARDED_ACCESS
