/**
 * @file ipc/channel.hpp
 * Layer: ipc (includes base/, os/linux.hpp, ipc/protocol.hpp). The whole body is Linux-only.
 *
 * Channel<Sys>: one end of a SOCK_SEQPACKET Unix socket that carries protocol messages, with
 * their fds as SCM_RIGHTS. Every system call goes through Sys (os/linux.hpp), so tests inject
 * EAGAIN, EOF, forged control data and failing fstat.
 *
 * - send() never blocks (MSG_DONTWAIT | MSG_NOSIGNAL): a peer that stopped reading fills its
 *   socket buffer and the next send fails with EAGAIN instead of stalling the sender. A short
 *   send is impossible on a SEQPACKET socket (a datagram goes whole or not at all).
 * - receive() waits up to a timeout (poll), then takes one datagram with MSG_CMSG_CLOEXEC (no
 *   received fd leaks into a child exec'd meanwhile). Every fd that arrived is owned by a UniqueFd
 *   from that moment, so a message rejected for any reason (truncated, wrong fd count, an offset
 *   outside its object, bad kind...) closes all of its fds; only an accepted fault_reply hands
 *   its one fd to the caller (and an accepted hello, its dirty bitmap's). The seals of every fd
 *   that came are read too (F_GET_SEALS), for the hello's check that the bitmap cannot shrink.
 * - shutdown() makes both ends see EOF at once: the manager cuts a client off with it.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/result.hpp>
#    include <membacking/ipc/protocol.hpp>
#    include <membacking/os/linux.hpp>

#    include <array>
#    include <cerrno>
#    include <cstddef>
#    include <cstdio>
#    include <cstring>
#    include <fcntl.h>
#    include <poll.h>
#    include <string>
#    include <sys/socket.h>
#    include <sys/stat.h>
#    include <utility>
#    include <vector>

namespace membacking::ipc {

/// Where rejected messages and disconnections are reported (stderr by default): both ends log
/// what they reject, then cut the connection.
using LogFunction = void (*)(const std::string& line);

inline void log_to_stderr(const std::string& line)
{
    (void)std::fprintf(stderr, "membacking ipc: %s\n", line.c_str());
}

/// An owned file descriptor, closed through Sys.
template <class Sys = os::LinuxSyscalls>
class UniqueFd {
public:
    UniqueFd() noexcept = default;
    explicit UniqueFd(int fd) noexcept : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept
    {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    ~UniqueFd() { reset(); }

    [[nodiscard]] int get() const noexcept { return fd_; }
    [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
    [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
    void reset() noexcept
    {
        if (fd_ >= 0)
            (void)Sys::close(std::exchange(fd_, -1));
    }

private:
    int fd_ = -1;
};

/// What receive() got: a validated message and its fd (if it carries one), a timeout, or EOF.
template <class Sys = os::LinuxSyscalls>
struct Incoming {
    enum class Status : std::uint8_t { message, timeout, closed };
    Status status = Status::timeout;
    Message message;
    UniqueFd<Sys> fd;
};

template <class Sys = os::LinuxSyscalls>
class Channel {
public:
    /// The most fds one datagram may carry before the message is rejected (the protocol uses
    /// at most one; room for a few more so that a hostile sender's extras are received, and
    /// closed, rather than silently truncated by the kernel).
    static constexpr std::size_t max_fds = 8;

    Channel() noexcept = default;
    /// Takes ownership of a connected SOCK_SEQPACKET Unix socket.
    explicit Channel(int fd) noexcept : fd_(fd) {}

    /// A connected pair of SOCK_SEQPACKET sockets (close-on-exec): one end per process.
    [[nodiscard]] static Result<std::pair<Channel, Channel>> pair()
    {
        int fds[2] = {-1, -1};
        if (Sys::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0)
            return os::last_error([] { return std::string("socketpair(AF_UNIX, SEQPACKET)"); });
        return std::pair<Channel, Channel>(Channel(fds[0]), Channel(fds[1]));
    }

    [[nodiscard]] int native_handle() const noexcept { return fd_.get(); }
    [[nodiscard]] bool valid() const noexcept { return fd_.valid(); }
    /// Gives up ownership (to hand the socket to a child process).
    [[nodiscard]] int release() noexcept { return fd_.release(); }

    /// Sends m with `fd` attached if m carries one. Never blocks.
    [[nodiscard]] Result<void> send(const Message& m, int fd = -1) const
    {
        const Encoded e = encode(m);
        const bool with_fd = fd_count(m.body) == 1;
        if (with_fd && fd < 0)
            return make_error(errc::invalid_argument, std::string("a ") +
                                                          detail::name_of(detail::kind_of(m.body)) +
                                                          " message without its fd");
        iovec iov{const_cast<std::byte*>(e.bytes().data()), e.size};
        msghdr h{};
        h.msg_iov = &iov;
        h.msg_iovlen = 1;
        alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int))> control{};
        if (with_fd) {
            h.msg_control = control.data();
            h.msg_controllen = control.size();
            cmsghdr* c = CMSG_FIRSTHDR(&h);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
        }
        const ssize_t n = Sys::sendmsg(fd_.get(), &h, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0)
            return os::last_error([&] {
                return std::string("sending a ") + detail::name_of(detail::kind_of(m.body)) +
                       " message";
            });
        if (static_cast<std::size_t>(n) != e.size)
            return make_error(errc::invalid_argument, "short send on a SEQPACKET socket");
        return {};
    }

    /// Waits up to timeout_ms (-1: forever) for one message and validates it. An invalid
    /// message is an error (its fds are closed); EOF and the timeout are statuses.
    [[nodiscard]] Result<Incoming<Sys>> receive(int timeout_ms, const DecodeContext& ctx) const
    {
        Incoming<Sys> in;
        pollfd p{fd_.get(), POLLIN, 0};
        int ready = 0;
        do
            ready = Sys::poll(&p, 1, timeout_ms);
        while (ready < 0 && errno == EINTR);
        if (ready < 0)
            return os::last_error([] { return std::string("poll on the client socket"); });
        if (ready == 0)
            return in; // timeout
        std::array<std::byte, max_message_size + 1> buffer{};
        iovec iov{buffer.data(), buffer.size()};
        alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * max_fds)> control{};
        msghdr h{};
        h.msg_iov = &iov;
        h.msg_iovlen = 1;
        h.msg_control = control.data();
        h.msg_controllen = control.size();
        ssize_t n = 0;
        do
            n = Sys::recvmsg(fd_.get(), &h, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EAGAIN)
            return in; // spurious wake-up: report a timeout, the caller loops
        if (n < 0 && errno != ECONNRESET)
            return os::last_error([] { return std::string("recvmsg on the client socket"); });
        // Own every fd that came, before anything can reject the message.
        std::vector<UniqueFd<Sys>> fds;
        bool foreign_control = false;
        if (n > 0)
            for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
                    foreign_control = true;
                    continue;
                }
                const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (std::size_t i = 0; i < count; ++i) {
                    int fd = -1;
                    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    fds.emplace_back(fd);
                }
            }
        if (n <= 0) {
            in.status = Incoming<Sys>::Status::closed;
            return in;
        }
        if ((h.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0)
            return make_error(errc::invalid_argument,
                              "rejected message: truncated (too long, or too many fds)");
        if (foreign_control)
            return make_error(errc::invalid_argument,
                              "rejected message: control data other than SCM_RIGHTS");
        std::vector<ObjectInfo> objects;
        objects.reserve(fds.size());
        for (const auto& fd : fds) {
            struct stat st {};
            if (Sys::fstat(fd.get(), &st) != 0)
                return os::last_error([] { return std::string("fstat of a received fd"); });
            const int seals = Sys::get_seals(fd.get());
            constexpr int size_seals = F_SEAL_SHRINK | F_SEAL_GROW;
            objects.push_back({S_ISREG(st.st_mode), static_cast<std::uint64_t>(st.st_size),
                               seals >= 0 && (seals & size_seals) == size_seals});
        }
        auto m = decode(std::span(buffer.data(), static_cast<std::size_t>(n)), objects, ctx);
        if (!m)
            return std::move(m).error();
        in.status = Incoming<Sys>::Status::message;
        in.message = *m;
        if (!fds.empty())
            in.fd = std::move(fds.front());
        return in;
    }

    /// Both directions shut down: the peer (and our own receive) see EOF at once.
    void shutdown() const noexcept
    {
        if (fd_.valid())
            (void)Sys::shutdown(fd_.get(), SHUT_RDWR);
    }

private:
    UniqueFd<Sys> fd_;
};

} // namespace membacking::ipc

#endif // MEMBACKING_OS_LINUX
