// The wire protocol (ipc/protocol.hpp) and its transport (ipc/channel.hpp): the encoding, every
// validation rule of the decoder, and the fds of rejected messages being closed.
#include <membacking/access/dirty_bitmap.hpp>
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/protocol.hpp>

#include "test_support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

namespace mb = membacking;
namespace ipc = membacking::ipc;

namespace {

constexpr std::uint64_t guest = 0x100000;
const ipc::DecodeContext client_ctx{ipc::Receiver::client, guest};
const ipc::DecodeContext manager_ctx{ipc::Receiver::manager, guest};

std::vector<std::byte> wire(const ipc::Message& m)
{
    const auto e = ipc::encode(m);
    return {e.bytes().begin(), e.bytes().end()};
}

mb::errc code_of(const mb::Result<ipc::Message>& r)
{
    REQUIRE_FALSE(r.has_value());
    return static_cast<mb::errc>(r.error().code().value());
}

const ipc::ObjectInfo memfd_of_64k{true, 0x10000};

} // namespace

TEST_CASE("every message kind round-trips, little-endian, at its fixed size")
{
    const ipc::Message m{7, ipc::FaultReply{0, true, 0x2000, 0x1000, 0x3000}};
    const auto bytes = wire(m);
    REQUIRE(bytes.size() == 48);
    // magic "MBIP", version 3, kind 3, size 48, seq 7: all little-endian.
    CHECK(bytes[0] == std::byte{'M'});
    CHECK(bytes[3] == std::byte{'P'});
    CHECK(bytes[4] == std::byte{3});
    CHECK(bytes[5] == std::byte{0});
    CHECK(bytes[6] == std::byte{3});
    CHECK(bytes[8] == std::byte{48});
    CHECK(bytes[12] == std::byte{7});
    auto d = ipc::decode(bytes, std::span(&memfd_of_64k, 1), client_ctx);
    REQUIRE(d.has_value());
    const auto& r = std::get<ipc::FaultReply>(d->body);
    CHECK(d->seq == 7);
    CHECK(r.writable);
    CHECK(r.gpa == 0x2000);
    CHECK(r.length == 0x1000);
    CHECK(r.object_offset == 0x3000);

    auto q = ipc::decode(wire({9, ipc::FaultRequest{0x5000, true}}), {}, manager_ctx);
    REQUIRE(q.has_value());
    CHECK(std::get<ipc::FaultRequest>(q->body).gpa == 0x5000);
    CHECK(std::get<ipc::FaultRequest>(q->body).write);
    CHECK(ipc::decode(wire({1, ipc::Invalidate{0x1000, 0x2000}}), {}, client_ctx).has_value());
    CHECK(ipc::decode(wire({1, ipc::InvalidateAck{}}), {}, manager_ctx).has_value());
    CHECK(ipc::decode(wire({1, ipc::Hello{guest}}), {}, {ipc::Receiver::client, 0}).has_value());
}

TEST_CASE("the decoder rejects malformed headers")
{
    auto bytes = wire({1, ipc::Invalidate{0x1000, 0x1000}});
    SUBCASE("short")
    {
        CHECK(code_of(ipc::decode(std::span(bytes).first(15), {}, client_ctx)) ==
              mb::errc::invalid_argument);
    }
    SUBCASE("magic")
    {
        bytes[0] = std::byte{'X'};
        CHECK(code_of(ipc::decode(bytes, {}, client_ctx)) == mb::errc::invalid_argument);
    }
    SUBCASE("version")
    {
        bytes[4] = std::byte{1}; // version 1 had no dirty bitmap in its hello
        CHECK(code_of(ipc::decode(bytes, {}, client_ctx)) == mb::errc::unsupported);
        bytes[4] = std::byte{2}; // version 2's hello had no dirty map layout
        CHECK(code_of(ipc::decode(bytes, {}, client_ctx)) == mb::errc::unsupported);
    }
    SUBCASE("unknown kind")
    {
        bytes[6] = std::byte{9};
        CHECK(code_of(ipc::decode(bytes, {}, client_ctx)) == mb::errc::invalid_argument);
    }
    SUBCASE("header size disagrees with the datagram")
    {
        bytes[8] = std::byte{40};
        CHECK(code_of(ipc::decode(bytes, {}, client_ctx)) == mb::errc::invalid_argument);
    }
    SUBCASE("a longer datagram than the kind's size")
    {
        bytes.push_back(std::byte{0});
        bytes[8] = std::byte{33};
        CHECK(code_of(ipc::decode(bytes, {}, client_ctx)) == mb::errc::invalid_argument);
    }
    SUBCASE("a kind the receiving side never accepts")
    {
        // A client cannot send the manager a reply (or an invalidate), nor a manager a request.
        CHECK(code_of(ipc::decode(bytes, {}, manager_ctx)) == mb::errc::invalid_argument);
        CHECK(code_of(ipc::decode(wire({1, ipc::FaultRequest{0, false}}), {}, client_ctx)) ==
              mb::errc::invalid_argument);
    }
    SUBCASE("anything before hello, and a second hello")
    {
        CHECK(code_of(ipc::decode(bytes, {}, {ipc::Receiver::client, 0})) ==
              mb::errc::invalid_argument);
        CHECK(code_of(ipc::decode(wire({1, ipc::Hello{guest}}), {}, client_ctx)) ==
              mb::errc::invalid_argument);
    }
}

TEST_CASE("the decoder rejects ranges that are empty, unaligned, overflowing or outside the guest")
{
    for (const auto& range :
         std::vector<std::pair<std::uint64_t, std::uint64_t>>{{0x1000, 0},
                                                              {0x1800, 0x1000},
                                                              {0x1000, 0x800},
                                                              {guest, 0x1000},
                                                              {guest - 0x1000, 0x2000},
                                                              {0xfffffffffffff000, 0x2000}}) {
        const std::uint64_t gpa = range.first;
        const std::uint64_t len = range.second;
        CAPTURE(gpa);
        CAPTURE(len);
        CHECK(code_of(ipc::decode(wire({1, ipc::Invalidate{gpa, len}}), {}, client_ctx)) ==
              mb::errc::invalid_argument);
        CHECK(code_of(ipc::decode(wire({1, ipc::FaultReply{0, false, gpa, len, 0}}),
                                  std::span(&memfd_of_64k, 1), client_ctx)) ==
              mb::errc::invalid_argument);
    }
    CHECK(code_of(ipc::decode(wire({1, ipc::FaultRequest{guest, false}}), {}, manager_ctx)) ==
          mb::errc::invalid_argument);
    for (std::uint64_t size : {std::uint64_t{0}, std::uint64_t{0x1800}, ipc::max_guest_size * 2})
        CHECK(code_of(ipc::decode(wire({1, ipc::Hello{size}}), {}, {ipc::Receiver::client, 0})) ==
              mb::errc::invalid_argument);
}

TEST_CASE("a hello's dirty bitmap: exactly the guest's bitmap size, one mappable fd of that size, "
          "size-sealed")
{
    constexpr std::uint64_t bitmap = 0x1000; // a 1 MiB guest: 256 pages, 4 words, one page
    REQUIRE(ipc::wire_dirty_bitmap_bytes(guest) == bitmap);
    const ipc::DecodeContext fresh{ipc::Receiver::client, 0};
    const ipc::ObjectInfo sealed{true, bitmap, true};
    const auto hello = wire({0, ipc::Hello{guest, bitmap}});
    REQUIRE(hello.size() == 40);
    auto d = ipc::decode(hello, std::span(&sealed, 1), fresh);
    REQUIRE(d.has_value());
    CHECK(std::get<ipc::Hello>(d->body).dirty_bitmap_bytes == bitmap);
    CHECK(ipc::fd_count(d->body) == 1);
    CHECK(ipc::fd_count(ipc::Hello{guest, 0}) == 0);
    // Without its fd; a wrong size in the message; an fd of another size; not mappable; not
    // sealed (the manager could shrink it under the client's marks: SIGBUS).
    CHECK(code_of(ipc::decode(hello, {}, fresh)) == mb::errc::invalid_argument);
    CHECK(code_of(ipc::decode(wire({0, ipc::Hello{guest, 2 * bitmap}}), std::span(&sealed, 1),
                              fresh)) == mb::errc::invalid_argument);
    for (const ipc::ObjectInfo& bad :
         {ipc::ObjectInfo{true, 2 * bitmap, true}, ipc::ObjectInfo{false, bitmap, true},
          ipc::ObjectInfo{true, bitmap, false}}) {
        CAPTURE(bad.size);
        CHECK(code_of(ipc::decode(hello, std::span(&bad, 1), fresh)) == mb::errc::invalid_argument);
    }
    // An fd with a hello that names no bitmap.
    CHECK(code_of(ipc::decode(wire({0, ipc::Hello{guest, 0}}), std::span(&sealed, 1), fresh)) ==
          mb::errc::invalid_argument);
}

TEST_CASE("the wire's dirty map size is the DirtyBitmap's, for every guest size and both layouts")
{
    for (std::uint64_t size :
         {std::uint64_t{0x1000}, std::uint64_t{0x100000}, std::uint64_t{0x40000000} + 0x1000,
          std::uint64_t{0x1000} * 8 * 512 + 0x1000, std::uint64_t{1} << 39, ipc::max_guest_size}) {
        CAPTURE(size);
        CHECK(ipc::wire_dirty_bitmap_bytes(size) == mb::detail::DirtyBitmap::bytes_for(size));
        CHECK(ipc::wire_dirty_map_bytes(size, ipc::WireDirtyLayout::bits) ==
              mb::detail::DirtyBitmap::bytes_for(size, mb::DirtyMapLayout::bits));
        CHECK(ipc::wire_dirty_map_bytes(size, ipc::WireDirtyLayout::bytes) ==
              mb::detail::DirtyBitmap::bytes_for(size, mb::DirtyMapLayout::bytes));
    }
    // The one conversion between the wire's layout and the map's (the manager sends to_wire,
    // the client maps from_wire): each layout to its own name, and back.
    CHECK(ipc::to_wire(mb::DirtyMapLayout::bits) == ipc::WireDirtyLayout::bits);
    CHECK(ipc::to_wire(mb::DirtyMapLayout::bytes) == ipc::WireDirtyLayout::bytes);
    CHECK(ipc::from_wire(ipc::WireDirtyLayout::bits) == mb::DirtyMapLayout::bits);
    CHECK(ipc::from_wire(ipc::WireDirtyLayout::bytes) == mb::DirtyMapLayout::bytes);
}

TEST_CASE("a hello names its dirty map's layout (version 3): both round-trip; the size must be "
          "the layout's, the value known, and 0 without a map")
{
    const ipc::DecodeContext fresh{ipc::Receiver::client, 0};
    constexpr std::uint64_t bits_size = 0x1000;  // 256 pages: 4 words, one page
    constexpr std::uint64_t bytes_size = 0x1000; // 256 pages: 256 bytes, one page
    REQUIRE(ipc::wire_dirty_map_bytes(guest, ipc::WireDirtyLayout::bits) == bits_size);
    REQUIRE(ipc::wire_dirty_map_bytes(guest, ipc::WireDirtyLayout::bytes) == bytes_size);
    // A guest whose two maps differ in size: 64 MiB, 16384 pages, 2 KiB of bits, 16 KiB of bytes.
    constexpr std::uint64_t big = 0x4000000;
    constexpr std::uint64_t big_bits = 0x1000;
    constexpr std::uint64_t big_bytes = 0x4000;
    REQUIRE(ipc::wire_dirty_map_bytes(big, ipc::WireDirtyLayout::bits) == big_bits);
    REQUIRE(ipc::wire_dirty_map_bytes(big, ipc::WireDirtyLayout::bytes) == big_bytes);

    SUBCASE("both layouts round-trip; the layout is byte 32, followed by 7 zero bytes")
    {
        for (const auto layout : {ipc::WireDirtyLayout::bits, ipc::WireDirtyLayout::bytes}) {
            const std::uint64_t size = ipc::wire_dirty_map_bytes(big, layout);
            CAPTURE(static_cast<unsigned>(layout));
            const auto bytes = wire({0, ipc::Hello{big, size, layout}});
            REQUIRE(bytes.size() == 40);
            CHECK(bytes[8] == std::byte{40});
            CHECK(bytes[32] == std::byte{static_cast<std::uint8_t>(layout)});
            CHECK(std::all_of(bytes.begin() + 33, bytes.end(),
                              [](std::byte b) { return b == std::byte{0}; }));
            const ipc::ObjectInfo sealed{true, size, true};
            auto d = ipc::decode(bytes, std::span(&sealed, 1), fresh);
            REQUIRE(d.has_value());
            const auto& h = std::get<ipc::Hello>(d->body);
            CHECK(h.guest_size == big);
            CHECK(h.dirty_bitmap_bytes == size);
            CHECK(h.dirty_layout == layout);
            CHECK(ipc::fd_count(d->body) == 1);
        }
        auto d = ipc::decode(wire({0, ipc::Hello{big}}), {}, fresh); // untracked: layout 0
        REQUIRE(d.has_value());
        CHECK(std::get<ipc::Hello>(d->body).dirty_layout == ipc::WireDirtyLayout::bits);
    }
    SUBCASE("the size must be the layout's: the other layout's size is refused, both ways")
    {
        const ipc::ObjectInfo of_bits{true, big_bits, true};
        const ipc::ObjectInfo of_bytes{true, big_bytes, true};
        // The byte map's size named as a bit map, and the bit map's named as a byte map (each
        // with an fd of the size the message names, so only the layout rule can refuse it).
        auto a = ipc::decode(wire({0, ipc::Hello{big, big_bytes, ipc::WireDirtyLayout::bits}}),
                             std::span(&of_bytes, 1), fresh);
        REQUIRE_FALSE(a.has_value());
        CHECK(code_of(a) == mb::errc::invalid_argument);
        CHECK(a.error().full_message().find("bit layout") != std::string::npos);
        auto b = ipc::decode(wire({0, ipc::Hello{big, big_bits, ipc::WireDirtyLayout::bytes}}),
                             std::span(&of_bits, 1), fresh);
        REQUIRE_FALSE(b.has_value());
        CHECK(code_of(b) == mb::errc::invalid_argument);
        CHECK(b.error().full_message().find("byte layout") != std::string::npos);
    }
    SUBCASE("an unknown layout value is refused")
    {
        const ipc::ObjectInfo sealed{true, big_bits, true};
        for (const std::uint8_t value : {std::uint8_t{2}, std::uint8_t{0x80}, std::uint8_t{0xff}}) {
            CAPTURE(value);
            auto bytes = wire({0, ipc::Hello{big, big_bits, ipc::WireDirtyLayout::bits}});
            bytes[32] = std::byte{value};
            auto d = ipc::decode(bytes, std::span(&sealed, 1), fresh);
            REQUIRE_FALSE(d.has_value());
            CHECK(code_of(d) == mb::errc::invalid_argument);
            CHECK(d.error().full_message().find("unknown dirty map layout") != std::string::npos);
        }
    }
    SUBCASE("no map: the layout must be 0 (bits), so the encoding stays canonical")
    {
        auto d = ipc::decode(wire({0, ipc::Hello{big, 0, ipc::WireDirtyLayout::bytes}}), {}, fresh);
        REQUIRE_FALSE(d.has_value());
        CHECK(code_of(d) == mb::errc::invalid_argument);
        CHECK(d.error().full_message().find("without a dirty map") != std::string::npos);
    }
    SUBCASE("the reserved bytes after the layout must be zero")
    {
        const ipc::ObjectInfo sealed{true, big_bytes, true};
        for (std::size_t at = 33; at < 40; ++at) {
            CAPTURE(at);
            auto bytes = wire({0, ipc::Hello{big, big_bytes, ipc::WireDirtyLayout::bytes}});
            bytes[at] = std::byte{1};
            CHECK(code_of(ipc::decode(bytes, std::span(&sealed, 1), fresh)) ==
                  mb::errc::invalid_argument);
        }
    }
}

TEST_CASE("a fault reply's piece must lie inside the object its fd names, with exactly one fd")
{
    const ipc::Message inside{1, ipc::FaultReply{0, false, 0, 0x10000, 0}};
    CHECK(ipc::decode(wire(inside), std::span(&memfd_of_64k, 1), client_ctx).has_value());
    // One page past the object's end; an offset past it; an offset that overflows.
    for (const auto& piece : std::vector<std::pair<std::uint64_t, std::uint64_t>>{
             {0x10000, 0x1000}, {0x1000, 0x10000}, {0x1000, 0xfffffffffffff000}}) {
        const std::uint64_t len = piece.first;
        const std::uint64_t off = piece.second;
        CAPTURE(off);
        const ipc::Message m{1, ipc::FaultReply{0, false, 0, len, off}};
        CHECK(code_of(ipc::decode(wire(m), std::span(&memfd_of_64k, 1), client_ctx)) ==
              mb::errc::invalid_argument);
    }
    const ipc::ObjectInfo not_a_file{false, 0x10000};
    CHECK(code_of(ipc::decode(wire(inside), std::span(&not_a_file, 1), client_ctx)) ==
          mb::errc::invalid_argument);
    const ipc::ObjectInfo two[2] = {memfd_of_64k, memfd_of_64k};
    CHECK(code_of(ipc::decode(wire(inside), two, client_ctx)) == mb::errc::invalid_argument);
    CHECK(code_of(ipc::decode(wire(inside), {}, client_ctx)) == mb::errc::invalid_argument);
    // An error reply carries no fd and no piece.
    const ipc::Message error{1, ipc::FaultReply{static_cast<std::uint32_t>(mb::errc::unmapped)}};
    CHECK(ipc::decode(wire(error), {}, client_ctx).has_value());
    CHECK(code_of(ipc::decode(wire(error), std::span(&memfd_of_64k, 1), client_ctx)) ==
          mb::errc::invalid_argument);
    CHECK(code_of(ipc::decode(wire({1, ipc::FaultReply{999}}), {}, client_ctx)) ==
          mb::errc::invalid_argument);
    // Reserved bytes and booleans are canonical.
    auto bytes = wire(inside);
    bytes[21] = std::byte{1};
    CHECK(code_of(ipc::decode(bytes, std::span(&memfd_of_64k, 1), client_ctx)) ==
          mb::errc::invalid_argument);
    bytes = wire(inside);
    bytes[20] = std::byte{2};
    CHECK(code_of(ipc::decode(bytes, std::span(&memfd_of_64k, 1), client_ctx)) ==
          mb::errc::invalid_argument);
}

namespace {

/// Records the fds that recvmsg delivered and the ones closed, so a test can check that every
/// fd of a rejected message was closed.
struct RecordingSys : mb::os::LinuxSyscalls {
    static inline std::vector<int> received;
    static inline std::set<int> closed;
    static inline int fail_fstat = 0;
    static ssize_t recvmsg(int fd, struct msghdr* h, int flags) noexcept
    {
        const ssize_t n = ::recvmsg(fd, h, flags);
        if (n > 0)
            for (cmsghdr* c = CMSG_FIRSTHDR(h); c != nullptr; c = CMSG_NXTHDR(h, c))
                if (c->cmsg_type == SCM_RIGHTS)
                    for (std::size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
                        int f = -1;
                        std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                        received.push_back(f);
                    }
        return n;
    }
    static int close(int fd) noexcept
    {
        closed.insert(fd);
        return ::close(fd);
    }
    static int fstat(int fd, struct stat* st) noexcept
    {
        if (fail_fstat != 0) {
            errno = fail_fstat;
            return -1;
        }
        return ::fstat(fd, st);
    }
    static void reset()
    {
        received.clear();
        closed.clear();
        fail_fstat = 0;
    }
};

/// Sends raw bytes with `fds` attached, as a hostile peer could.
void send_raw(int sock, std::span<const std::byte> bytes, const std::vector<int>& fds)
{
    iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
    msghdr h{};
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
    if (!fds.empty()) {
        h.msg_control = control.data();
        h.msg_controllen = control.size();
        cmsghdr* c = CMSG_FIRSTHDR(&h);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    REQUIRE(::sendmsg(sock, &h, 0) == static_cast<ssize_t>(bytes.size()));
}

bool fd_open(int fd)
{
    return ::fcntl(fd, F_GETFD) >= 0;
}

} // namespace

TEST_CASE("the channel passes a fault reply's fd close-on-exec, and closes every fd it rejects")
{
    RecordingSys::reset();
    auto pair = ipc::Channel<RecordingSys>::pair();
    REQUIRE(pair.has_value());
    auto& [manager, client] = *pair;
    const mb::Mappable object = mb::test::make_memfd(0x10000);
    const int fd = object.native_handle();

    SUBCASE("accepted: the fd arrives, close-on-exec, naming the same object")
    {
        REQUIRE(manager.send({3, ipc::FaultReply{0, true, 0x4000, 0x2000, 0x8000}}, fd));
        auto in = client.receive(1000, client_ctx);
        REQUIRE(in.has_value());
        REQUIRE(in->status == ipc::Incoming<RecordingSys>::Status::message);
        REQUIRE(in->fd.valid());
        CHECK((::fcntl(in->fd.get(), F_GETFD) & FD_CLOEXEC) != 0);
        struct stat a {};
        struct stat b {};
        REQUIRE(::fstat(fd, &a) == 0);
        REQUIRE(::fstat(in->fd.get(), &b) == 0);
        CHECK(a.st_ino == b.st_ino);
    }
    SUBCASE("rejected: an offset outside the object")
    {
        REQUIRE(manager.send({3, ipc::FaultReply{0, true, 0, 0x2000, 0xf000}}, fd));
        auto in = client.receive(1000, client_ctx);
        CHECK_FALSE(in.has_value());
        REQUIRE(RecordingSys::received.size() == 1);
        CHECK(RecordingSys::closed.count(RecordingSys::received[0]) == 1);
        CHECK_FALSE(fd_open(RecordingSys::received[0]));
    }
    SUBCASE("rejected: three fds where one is expected, and fds on an invalidate")
    {
        const auto reply = wire({3, ipc::FaultReply{0, true, 0, 0x1000, 0}});
        send_raw(manager.native_handle(), reply, {fd, fd, fd});
        CHECK_FALSE(client.receive(1000, client_ctx).has_value());
        const auto inval = wire({4, ipc::Invalidate{0, 0x1000}});
        send_raw(manager.native_handle(), inval, {fd});
        CHECK_FALSE(client.receive(1000, client_ctx).has_value());
        REQUIRE(RecordingSys::received.size() == 4);
        for (int r : RecordingSys::received)
            CHECK_FALSE(fd_open(r));
    }
    SUBCASE("rejected: more fds than a datagram may carry (the kernel truncates: MSG_CTRUNC)")
    {
        const auto reply = wire({3, ipc::FaultReply{0, true, 0, 0x1000, 0}});
        send_raw(manager.native_handle(), reply, std::vector<int>(20, fd));
        CHECK_FALSE(client.receive(1000, client_ctx).has_value());
        CHECK(RecordingSys::received.size() <= ipc::Channel<RecordingSys>::max_fds);
        for (int r : RecordingSys::received)
            CHECK_FALSE(fd_open(r));
    }
    SUBCASE("rejected: an fd that cannot be inspected")
    {
        RecordingSys::fail_fstat = EBADF;
        REQUIRE(manager.send({3, ipc::FaultReply{0, true, 0, 0x1000, 0}}, fd));
        CHECK_FALSE(client.receive(1000, client_ctx).has_value());
        REQUIRE(RecordingSys::received.size() == 1);
        CHECK_FALSE(fd_open(RecordingSys::received[0]));
    }
    SUBCASE("a timeout, then EOF when the peer shuts the socket down")
    {
        auto t = client.receive(10, client_ctx);
        REQUIRE(t.has_value());
        CHECK(t->status == ipc::Incoming<RecordingSys>::Status::timeout);
        manager.shutdown();
        auto e = client.receive(1000, client_ctx);
        REQUIRE(e.has_value());
        CHECK(e->status == ipc::Incoming<RecordingSys>::Status::closed);
    }
    SUBCASE("a send to a peer that stopped reading fails at once (EAGAIN), never blocks")
    {
        mb::Result<void> r;
        int sent = 0;
        while ((r = manager.send({1, ipc::Invalidate{0, 0x1000}})) && sent < 1'000'000)
            ++sent;
        REQUIRE_FALSE(r.has_value());
        CHECK(r.error().code() == std::error_code(EAGAIN, std::system_category()));
    }
}

TEST_CASE("a hello's dirty bitmap over a real channel: a DirtyBitmap's sealed memfd passes, an "
          "unsealed one is refused, and the client's marks land in the manager's words")
{
    auto pair = ipc::Channel<>::pair();
    REQUIRE(pair.has_value());
    auto& [manager, client] = *pair;
    const ipc::DecodeContext fresh{ipc::Receiver::client, 0};
    constexpr std::uint64_t bitmap = 0x1000;

    SUBCASE("unsealed: rejected")
    {
        const mb::Mappable loose = mb::test::make_memfd(bitmap);
        REQUIRE(manager.send({0, ipc::Hello{guest, bitmap}}, loose.native_handle()));
        auto in = client.receive(1000, fresh);
        REQUIRE_FALSE(in.has_value());
        CHECK(in.error().full_message().find("not sealed") != std::string::npos);
    }
    SUBCASE("a DirtyBitmap's memfd: accepted, mapped, shared both ways")
    {
        auto dirty = mb::detail::DirtyBitmap::create(guest);
        REQUIRE(dirty.has_value());
        CHECK_FALSE((*dirty)->shared());
        REQUIRE(manager.send({0, ipc::Hello{guest, bitmap}}, (*dirty)->share_fd()));
        CHECK((*dirty)->shared());
        auto in = client.receive(1000, fresh);
        REQUIRE(in.has_value());
        REQUIRE(in->fd.valid());
        auto view = mb::detail::DirtyBitmap::map_shared(in->fd.release(), guest);
        REQUIRE(view.has_value());
        (*view)->mark(0x5000, 0x2000); // the "worker" marks pages 5 and 6
        std::vector<mb::DirtyRun> runs;
        REQUIRE((*dirty)->take_runs(0, guest, runs)); // with the global barrier: shared
        REQUIRE(runs.size() == 1);
        CHECK(runs[0] == mb::DirtyRun{mb::Gpa{0x5000}, mb::Length{0x2000}});
        CHECK((*view)->words()[0].load() == 0); // the same words
    }
    SUBCASE("a byte map's memfd: accepted with its layout, mapped in it, shared both ways")
    {
        auto dirty = mb::detail::DirtyBitmap::create(guest, mb::DirtyMapLayout::bytes);
        REQUIRE(dirty.has_value());
        const std::uint64_t bytes = ipc::wire_dirty_map_bytes(guest, ipc::WireDirtyLayout::bytes);
        REQUIRE(manager.send({0, ipc::Hello{guest, bytes, ipc::WireDirtyLayout::bytes}},
                             (*dirty)->share_fd()));
        auto in = client.receive(1000, fresh);
        REQUIRE(in.has_value());
        REQUIRE(in->fd.valid());
        REQUIRE(std::get<ipc::Hello>(in->message.body).dirty_layout == ipc::WireDirtyLayout::bytes);
        auto view =
            mb::detail::DirtyBitmap::map_shared(in->fd.release(), guest, mb::DirtyMapLayout::bytes);
        REQUIRE(view.has_value());
        CHECK((*view)->layout() == mb::DirtyMapLayout::bytes);
        (*view)->mark(0x5000, 0x2000); // the "worker" marks pages 5 and 6: two bytes
        CHECK((*dirty)->marks()[5] == 1);
        CHECK((*dirty)->marks()[6] == 1);
        std::vector<mb::DirtyRun> runs;
        REQUIRE((*dirty)->take_runs(0, guest, runs));
        REQUIRE(runs.size() == 1);
        CHECK(runs[0] == mb::DirtyRun{mb::Gpa{0x5000}, mb::Length{0x2000}});
        CHECK((*view)->marks()[5] == 0); // the same bytes
    }
    SUBCASE("map_shared checks the size itself")
    {
        auto dirty = mb::detail::DirtyBitmap::create(guest);
        REQUIRE(dirty.has_value());
        const int fd = ::fcntl((*dirty)->share_fd(), F_DUPFD_CLOEXEC, 0);
        REQUIRE(fd >= 0);
        auto view = mb::detail::DirtyBitmap::map_shared(fd, 2 * guest + 0x40000000);
        REQUIRE_FALSE(view.has_value());
        CHECK(view.error().code() == mb::make_error_code(mb::errc::invalid_argument));
        CHECK_FALSE(fd_open(fd)); // closed on failure
    }
    SUBCASE("a bitmap's memfd lives as long as the bitmap")
    {
        auto dirty = mb::detail::DirtyBitmap::create(guest);
        REQUIRE(dirty.has_value());
        const int fd = (*dirty)->share_fd();
        CHECK(fd_open(fd));
        dirty->reset();
        CHECK_FALSE(fd_open(fd));
    }
}
