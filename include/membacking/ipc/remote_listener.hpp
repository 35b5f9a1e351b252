/**
 * @file ipc/remote_listener.hpp
 * Layer: ipc (includes base/, os/, mapping/memory_piece.hpp, mapping/memory_listener.hpp, ipc/).
 * The whole body is Linux-only.
 *
 * RemoteListener<Sys>: the manager's side of one client process. It is an ordinary memory
 * listener (mapping/memory_listener.hpp), registered with the manager like a vhost-user backend
 * would be, so the manager has one fan-out for everything outside its own VA mappers; and it
 * serves that process's fault requests from the table the listener calls gave it.
 *
 * - Fault requests are answered by a server thread from the listener's own copy of the table
 *   (never the manager's lock, which a control call holds while it waits for this client): the
 *   whole piece that holds the GPA, with its object's fd (SCM_RIGHTS). A read-only piece goes out
 *   as a read-only fd (the object reopened O_RDONLY through /proc/self/fd), so the client's kernel
 *   refuses a writable mapping of it. No piece there, or a write to a read-only one: an error
 *   reply. The pieces handed out are remembered.
 * - apply() (inside the control call, under the manager's control lock): the table copy is
 *   updated first; then every removed piece that was handed out is invalidated: one invalidate
 *   message each. await_applied() (the second phase, AwaitsTableChanges: the manager sends a step
 *   to every client before it awaits any) waits for the last acknowledgement, at most
 *   Options::deadline (default 500 ms) after the invalidations were sent. A client that does not
 *   acknowledge in time, whose socket is full, or that has gone away is cut off: its socket is
 *   shut down and the call returns listener_errc::cut_off, so the manager drops this listener and
 *   completes the operation. The clients' deadlines of one step run at the same time, so a step
 *   waits about one deadline however many clients stop answering during it (an operation of k
 *   steps at most k); a client cut off is never waited for again.
 * - Replies and invalidates are sent under one lock, in the order the table changed, and the
 *   client applies them in socket order: a reply can never re-map memory that an invalidate sent
 *   before it removed.
 * - Private memory has no fd: a table with private pieces is refused (errc::unsupported, naming
 *   the range), at registration (connect fails) and later (the control call that would add it
 *   is rolled back while a remote client is connected).
 * - An fd names its whole object, and the client may keep every fd it was sent: so a change that
 *   adds a piece of an object the manager may not share whole is refused the same way, by
 *   Options::share_check (serve_process: every byte of the object is guest memory, and no
 *   mapping places part of it read-only and part writable; manager/detail/shared_objects.hpp).
 * - A malformed or hostile message from the client is logged and the client is cut off.
 * - Dirty tracking: a tracked manager's hello carries its dirty map's memfd and layout (one bit
 *   or one byte per page); the client marks into it (ipc/remote_mapper.hpp; access/dirty_bitmap.hpp
 *   and access/dirty_byte_map.hpp for why that is sound across processes).
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/fatal.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/ipc/channel.hpp>
#    include <membacking/ipc/protocol.hpp>
#    include <membacking/mapping/memory_listener.hpp>
#    include <membacking/mapping/memory_piece.hpp>
#    include <membacking/os/linux.hpp>

#    include <atomic>
#    include <chrono>
#    include <condition_variable>
#    include <cstdint>
#    include <fcntl.h>
#    include <functional>
#    include <iterator>
#    include <map>
#    include <memory>
#    include <mutex>
#    include <set>
#    include <string>
#    include <thread>
#    include <utility>
#    include <vector>

namespace membacking::ipc {

struct RemoteListenerOptions {
    /// How long a control call waits for this client to acknowledge an invalidation before it
    /// cuts the client off and goes on.
    std::chrono::milliseconds deadline{500};
    LogFunction log = &log_to_stderr;
    /// Decides whether the objects a change adds pieces of may be handed to this process (every
    /// fd sent names its whole object, and the process may keep it): serve_process sets it to
    /// the manager's check (manager/detail/shared_objects.hpp). An error refuses the change.
    /// Empty: only private memory is refused.
    std::function<Result<void>(const MemoryTableChange&)> share_check;
};

template <class Sys = os::LinuxSyscalls>
class RemoteListener {
public:
    using Options = RemoteListenerOptions;

    RemoteListener(const RemoteListener&) = delete;
    RemoteListener& operator=(const RemoteListener&) = delete;
    ~RemoteListener()
    {
        cut_.store(true); // going away: nothing to log
        channel_.shutdown();
        if (server_.joinable())
            server_.join();
    }

    /// Serves `channel` (the manager's end) for a guest of guest_size bytes: sends the hello and
    /// starts the server thread. Register the result with add_memory_listener. A manager that
    /// tracks dirty pages passes its map's memfd (DirtyBitmap::share_fd; the hello carries a
    /// copy, the caller keeps its own) and its layout (DirtyBitmap::layout), so that the client
    /// marks what it writes, the way the manager's map records it.
    [[nodiscard]] static Result<std::shared_ptr<RemoteListener>>
    create(Channel<Sys> channel, std::uint64_t guest_size, std::string name, Options options = {},
           int dirty_bitmap_fd = -1, WireDirtyLayout dirty_layout = WireDirtyLayout::bits)
    {
        const bool tracked = dirty_bitmap_fd >= 0;
        const Hello hello{guest_size, tracked ? wire_dirty_map_bytes(guest_size, dirty_layout) : 0,
                          tracked ? dirty_layout : WireDirtyLayout::bits};
        MEMBACKING_TRY_CONTEXT(channel.send({0, hello}, dirty_bitmap_fd), "greeting the client");
        std::shared_ptr<RemoteListener> l(new RemoteListener(std::move(channel), guest_size,
                                                             std::move(name), std::move(options)));
        l->server_ = std::thread([p = l.get()] { p->serve(); });
        return l;
    }

    [[nodiscard]] std::string name() const { return name_; }
    [[nodiscard]] bool cut_off() const noexcept { return cut_.load(); }
    /// Pieces handed out so far (for tests and benchmarks).
    [[nodiscard]] std::uint64_t faults_served() const noexcept { return served_.load(); }

    /// The listener call (mapping/memory_listener.hpp): updates the table copy and sends the
    /// invalidations; await_applied() waits for their acknowledgement. See the file comment.
    Result<void> apply(const MemoryTableChange& change)
    {
        const std::lock_guard lock(mutex_);
        if (cut_)
            return Error(make_error_code(listener_errc::cut_off), "client already cut off");
        if (change.kind != MemoryTableChange::Kind::rollback) {
            MEMBACKING_TRY(require_shareable(change.added));
            if (options_.share_check)
                MEMBACKING_TRY(options_.share_check(change));
        }
        std::vector<MemoryRange> invalidate;
        for (const MemoryPiece& p : change.removed) {
            table_.erase(p.gpa.start());
            if (held_.erase(p.gpa.start()) != 0)
                invalidate.push_back(p.gpa);
        }
        for (const MemoryPiece& p : change.added)
            if (p.shareable())
                table_.insert_or_assign(p.gpa.start(), p);
        if (invalidate.empty())
            return {};
        for (const MemoryRange& r : invalidate) {
            const std::uint32_t seq = ++seq_;
            if (auto s = channel_.send({seq, Invalidate{r.start(), r.size()}}); !s) {
                cut_off_locked("sending an invalidation of " + r.to_string() +
                               " failed: " + s.error().full_message());
                return Error(make_error_code(listener_errc::cut_off), name_ + " cut off");
            }
            awaited_ack_ = seq;
        }
        await_until_ = std::chrono::steady_clock::now() + options_.deadline;
        return {};
    }

    /// The second phase (AwaitsTableChanges): waits until the client has acknowledged every
    /// invalidation sent so far, at most until Options::deadline after the last apply() sent
    /// them; otherwise cuts the client off.
    Result<void> await_applied()
    {
        std::unique_lock lock(mutex_);
        if (cut_)
            return Error(make_error_code(listener_errc::cut_off), "client already cut off");
        const bool acked = cv_.wait_until(lock, await_until_,
                                          [&] { return acked_ == awaited_ack_ || cut_.load(); });
        if (!acked || cut_) {
            cut_off_locked(acked ? "the client went away during an invalidation"
                                 : "no acknowledgement of an invalidation within " +
                                       std::to_string(options_.deadline.count()) + " ms");
            return Error(make_error_code(listener_errc::cut_off), name_ + " cut off");
        }
        return {};
    }

private:
    RemoteListener(Channel<Sys> channel, std::uint64_t guest_size, std::string name,
                   Options options)
        : channel_(std::move(channel)), guest_size_(guest_size), name_(std::move(name)),
          options_(std::move(options))
    {}

    void serve() noexcept
    {
        try {
            serve_messages();
        } catch (...) {
            membacking::detail::fatal("out of memory in a remote client's server thread");
        }
    }

    void serve_messages()
    {
        const DecodeContext ctx{Receiver::manager, guest_size_};
        for (;;) {
            auto in = channel_.receive(-1, ctx);
            const std::lock_guard lock(mutex_);
            if (!in) {
                cut_off_locked(in.error().full_message());
                return;
            }
            if (in->status == Incoming<Sys>::Status::closed) {
                cut_off_locked("the client closed its socket");
                return;
            }
            if (in->status != Incoming<Sys>::Status::message)
                continue;
            const Message& m = in->message;
            if (std::holds_alternative<InvalidateAck>(m.body)) {
                if (m.seq > seq_ || m.seq <= acked_) {
                    cut_off_locked("an acknowledgement of no pending invalidation");
                    return;
                }
                acked_ = m.seq;
                cv_.notify_all();
            } else if (const auto* q = std::get_if<FaultRequest>(&m.body)) {
                if (auto r = answer(m.seq, *q); !r) {
                    cut_off_locked("answering a fault failed: " + r.error().full_message());
                    return;
                }
            }
        }
    }

    /// Answers one fault request from the table copy. Under mutex_.
    Result<void> answer(std::uint32_t seq, const FaultRequest& q)
    {
        auto it = table_.upper_bound(q.gpa);
        const MemoryPiece* p = nullptr;
        if (it != table_.begin() && std::prev(it)->second.gpa.contains(q.gpa))
            p = &std::prev(it)->second;
        if (p == nullptr)
            return channel_.send({seq, FaultReply{static_cast<std::uint32_t>(errc::unmapped)}});
        if (q.write && !p->writable)
            return channel_.send({seq, FaultReply{static_cast<std::uint32_t>(errc::read_only)}});
        UniqueFd<Sys> read_only;
        int fd = p->object.native_handle();
        if (!p->writable) {
            // A read-only open file description: the client cannot map it writable.
            const std::string path = "/proc/self/fd/" + std::to_string(fd);
            read_only = UniqueFd<Sys>(Sys::open(path.c_str(), O_RDONLY | O_CLOEXEC));
            if (!read_only.valid())
                return os::last_error([&] { return "reopening " + path + " read-only"; });
            fd = read_only.get();
        }
        MEMBACKING_TRY(channel_.send(
            {seq, FaultReply{0, p->writable, p->gpa.start(), p->gpa.size(), p->offset.value()}},
            fd));
        held_.insert(p->gpa.start());
        served_.fetch_add(1, std::memory_order_relaxed);
        return {};
    }

    void cut_off_locked(const std::string& why)
    {
        if (cut_.exchange(true))
            return;
        if (options_.log != nullptr)
            options_.log("cut off client '" + name_ + "': " + why);
        channel_.shutdown();
        held_.clear();
        cv_.notify_all();
    }

    Channel<Sys> channel_;
    const std::uint64_t guest_size_;
    const std::string name_;
    const Options options_;
    std::thread server_;

    std::mutex mutex_; ///< the table copy, what was handed out, the send order
    std::condition_variable cv_;
    std::map<std::uint64_t, MemoryPiece> table_; ///< shareable pieces by GPA start
    std::set<std::uint64_t> held_;               ///< starts of the pieces handed out
    std::uint32_t seq_ = 0;
    std::uint32_t awaited_ack_ = 0;
    std::chrono::steady_clock::time_point await_until_{}; ///< deadline of the last invalidations
    std::uint32_t acked_ = 0;
    std::atomic<bool> cut_ = false;
    std::atomic<std::uint64_t> served_ = 0;
};

static_assert(AwaitsTableChanges<RemoteListener<>>);

} // namespace membacking::ipc

#endif // MEMBACKING_OS_LINUX
