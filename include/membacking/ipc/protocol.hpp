/**
 * @file ipc/protocol.hpp
 * Layer: ipc (includes base/ only). Platform-neutral: pure encoding and validation, no system
 * call, so the fuzzer (tests/ipc/fuzz_decoder.cpp) calls decode() directly.
 *
 * The wire protocol between a guest memory manager and a client in another process (one
 * SOCK_SEQPACKET Unix socket per client: one datagram is one message, and a message's fds ride
 * with it as SCM_RIGHTS).
 *
 * Every message is a fixed-size little-endian record: a 16-byte header, then the body of its kind.
 *
 *   header  u32 magic 'MBIP' | u16 version | u16 kind | u32 size (whole message) | u32 seq
 *   hello           manager -> client  u64 guest_size | u64 dirty_bitmap_bytes |       1 fd if
 *                                      u8 dirty_layout | 7 zero bytes   dirty_bitmap_bytes is not
 *                                                                                 0, else 0 fds
 *   fault_request   client  -> manager u64 gpa | u8 write | 7 zero bytes               0 fds
 *   fault_reply     manager -> client  u32 status | u8 writable | 3 zero bytes |
 *                                      u64 gpa | u64 length | u64 object_offset        1 fd if
 *                                                                    status is 0, else 0 fds
 *   invalidate      manager -> client  u64 gpa | u64 length                            0 fds
 *   invalidate_ack  client  -> manager (seq names the invalidate)                      0 fds
 *
 * decode() trusts nothing: the size must be exactly that of the kind, the magic and version must
 * match, the kind must be one this side accepts (a client never receives a request, the manager
 * never receives a reply), reserved bytes and booleans must be canonical, ranges must be non-empty,
 * page-aligned, free of overflow and inside the guest, and a fault_reply's piece must lie inside
 * the object its fd names (ObjectInfo: what fstat says about that fd). A message that fails any of
 * these is rejected whole, with an error that says why.
 *
 * Version 2 (version 1 had no dirty bitmap): a manager that tracks dirty pages sends its dirty
 * map with the hello (access/dirty_bitmap.hpp: a sealed memfd), and the client marks what it
 * writes into it. The hello is accepted only if dirty_bitmap_bytes is exactly the size of the map
 * of guest_size in its layout (wire_dirty_map_bytes), the fd is a regular file of exactly that
 * size, and its size is sealed (F_SEAL_SHRINK and F_SEAL_GROW: the manager cannot shrink it under
 * the client's marks, which would be SIGBUS).
 *
 * Version 3 (version 2's map was always one bit per page): the hello names the map's layout,
 * dirty_layout (WireDirtyLayout, the values of DirtyMapLayout): 0 = one bit per 4 KiB page
 * (DirtyTracking), 1 = one byte per page (ByteMapDirtyTracking). Any other value is refused, and
 * a hello without a map must say 0 (the encoding stays canonical). The client maps the map in
 * that layout and connects only with the matching policy (ipc/remote_mapper.hpp).
 *
 * A peer of another version is refused with errc::unsupported, naming both versions.
 */
#pragma once

#include <membacking/base/dirty_map_layout.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>

namespace membacking::ipc {

inline constexpr std::uint32_t protocol_magic = 0x5049424d; // "MBIP" in little-endian bytes
inline constexpr std::uint16_t protocol_version = 3;
inline constexpr std::size_t header_size = 16;
inline constexpr std::size_t max_message_size = 48;
/// How a hello's dirty map records pages (version 3): DirtyMapLayout's values, fixed on the wire.
/// to_wire and from_wire below are the only conversions.
enum class WireDirtyLayout : std::uint8_t {
    bits = 0,  ///< one bit per 4 KiB page (DirtyTracking)
    bytes = 1, ///< one byte per 4 KiB page (ByteMapDirtyTracking)
};
static_assert(static_cast<std::uint8_t>(DirtyMapLayout::bits) ==
                      static_cast<std::uint8_t>(WireDirtyLayout::bits) &&
                  static_cast<std::uint8_t>(DirtyMapLayout::bytes) ==
                      static_cast<std::uint8_t>(WireDirtyLayout::bytes),
              "the wire's layout values are DirtyMapLayout's");
/// A map's layout as a hello sends it.
[[nodiscard]] constexpr WireDirtyLayout to_wire(DirtyMapLayout layout) noexcept
{
    return static_cast<WireDirtyLayout>(layout);
}
/// A decoded hello's layout (decode refuses values outside WireDirtyLayout) as a map's.
[[nodiscard]] constexpr DirtyMapLayout from_wire(WireDirtyLayout layout) noexcept
{
    return static_cast<DirtyMapLayout>(layout);
}
/// The bytes of the dirty map of a guest of guest_size bytes in `layout`: one bit (or one byte)
/// per 4 KiB page, in 64-bit words, rounded up to whole pages (DirtyBitmap::bytes_for; a test
/// checks they agree for both layouts).
[[nodiscard]] constexpr std::uint64_t wire_dirty_map_bytes(std::uint64_t guest_size,
                                                           WireDirtyLayout layout) noexcept
{
    constexpr std::uint64_t page = 4096;
    const std::uint64_t pages = (guest_size + page - 1) / page;
    const std::uint64_t words =
        layout == WireDirtyLayout::bytes ? (pages + 7) / 8 : (pages + 63) / 64;
    return (words * 8 + page - 1) / page * page;
}
/// The bytes of the bit layout's map (wire_dirty_map_bytes(guest_size, WireDirtyLayout::bits)).
[[nodiscard]] constexpr std::uint64_t wire_dirty_bitmap_bytes(std::uint64_t guest_size) noexcept
{
    return wire_dirty_map_bytes(guest_size, WireDirtyLayout::bits);
}
/// The largest guest a client accepts (2^52 bytes: more than any x86-64 physical address width).
inline constexpr std::uint64_t max_guest_size = std::uint64_t{1} << 52;
/// Pages on the wire are 4 KiB: ranges and offsets are multiples of it.
inline constexpr std::uint64_t wire_page_size = 4096;

enum class MessageKind : std::uint16_t {
    hello = 1,
    fault_request = 2,
    fault_reply = 3,
    invalidate = 4,
    invalidate_ack = 5,
};

/// Which side a message is decoded on: each accepts only what the other side may send.
enum class Receiver : std::uint8_t { client, manager };

struct Hello {
    std::uint64_t guest_size = 0;
    /// 0: the manager does not track dirty pages. Otherwise the size of its dirty map (in
    /// dirty_layout), whose fd comes with the message.
    std::uint64_t dirty_bitmap_bytes = 0;
    /// The dirty map's layout; bits when there is no map (version 3).
    WireDirtyLayout dirty_layout = WireDirtyLayout::bits;
};
struct FaultRequest {
    std::uint64_t gpa = 0;
    bool write = false;
};
/// status 0: the piece [gpa, gpa + length) of the attached fd at object_offset, mapped shared.
/// Otherwise an errc value (no fd): the manager has nothing there, or it is read-only.
struct FaultReply {
    std::uint32_t status = 0;
    bool writable = false;
    std::uint64_t gpa = 0;
    std::uint64_t length = 0;
    std::uint64_t object_offset = 0;
};
struct Invalidate {
    std::uint64_t gpa = 0;
    std::uint64_t length = 0;
};
struct InvalidateAck {};

using Body = std::variant<Hello, FaultRequest, FaultReply, Invalidate, InvalidateAck>;

struct Message {
    std::uint32_t seq = 0;
    Body body;
};

/// What the receiver knows of an fd that came with a message (from fstat).
struct ObjectInfo {
    bool mappable = false; ///< a regular file (memfd, tmpfs, hugetlbfs): mmap-able memory
    std::uint64_t size = 0;
    bool size_sealed = false; ///< F_SEAL_SHRINK and F_SEAL_GROW are set (memfd seals)
};

/// What the receiver knows before decoding: its side, and the guest size (0 until hello).
struct DecodeContext {
    Receiver receiver = Receiver::client;
    std::uint64_t guest_size = 0;
};

/// An encoded message: bytes() is what goes on the wire.
struct Encoded {
    std::array<std::byte, max_message_size> buffer{};
    std::size_t size = 0;
    [[nodiscard]] std::span<const std::byte> bytes() const noexcept
    {
        return {buffer.data(), size};
    }
};

namespace detail {

[[nodiscard]] constexpr MessageKind kind_of(const Body& b) noexcept
{
    return static_cast<MessageKind>(b.index() + 1);
}

[[nodiscard]] constexpr std::size_t size_of(MessageKind k) noexcept
{
    switch (k) {
    case MessageKind::hello: // u64 guest_size, u64 dirty_bitmap_bytes, u8 layout, 7 reserved
        return header_size + 24;
    case MessageKind::fault_request: // u64 gpa, u8 write, 7 reserved bytes
    case MessageKind::invalidate:    // u64 gpa, u64 length
        return header_size + 16;
    case MessageKind::fault_reply: return header_size + 32;
    case MessageKind::invalidate_ack: return header_size;
    }
    return 0;
}

[[nodiscard]] constexpr const char* name_of(MessageKind k) noexcept
{
    switch (k) {
    case MessageKind::hello: return "hello";
    case MessageKind::fault_request: return "fault_request";
    case MessageKind::fault_reply: return "fault_reply";
    case MessageKind::invalidate: return "invalidate";
    case MessageKind::invalidate_ack: return "invalidate_ack";
    }
    return "unknown";
}

/// Little-endian writer and reader over a fixed buffer (no host-order memcpy: the wire order is
/// fixed whatever the host).
class Writer {
public:
    explicit Writer(std::span<std::byte> out) noexcept : out_(out) {}
    template <class T>
    void put(T v) noexcept
    {
        for (std::size_t i = 0; i < sizeof(T); ++i)
            out_[pos_++] =
                static_cast<std::byte>((static_cast<std::uint64_t>(v) >> (8 * i)) & 0xff);
    }
    void zeros(std::size_t n) noexcept
    {
        for (std::size_t i = 0; i < n; ++i)
            out_[pos_++] = std::byte{0};
    }
    [[nodiscard]] std::size_t pos() const noexcept { return pos_; }

private:
    std::span<std::byte> out_;
    std::size_t pos_ = 0;
};

class Reader {
public:
    explicit Reader(std::span<const std::byte> in) noexcept : in_(in) {}
    template <class T>
    [[nodiscard]] T get() noexcept
    {
        std::uint64_t v = 0;
        for (std::size_t i = 0; i < sizeof(T); ++i)
            v |= static_cast<std::uint64_t>(in_[pos_++]) << (8 * i);
        return static_cast<T>(v);
    }
    /// Whether the next n bytes are all zero (reserved bytes must be).
    [[nodiscard]] bool zeros(std::size_t n) noexcept
    {
        bool all = true;
        for (std::size_t i = 0; i < n; ++i)
            all = all && in_[pos_++] == std::byte{0};
        return all;
    }

private:
    std::span<const std::byte> in_;
    std::size_t pos_ = 0;
};

[[nodiscard]] inline Error reject(MessageKind k, const std::string& why)
{
    return make_error(errc::invalid_argument,
                      std::string("rejected ") + name_of(k) + " message: " + why);
}

/// A wire range [gpa, gpa + length): non-empty, page-aligned, no overflow, inside the guest.
[[nodiscard]] inline Result<void> check_range(MessageKind k, std::uint64_t gpa,
                                              std::uint64_t length, std::uint64_t guest_size)
{
    if (length == 0)
        return reject(k, "empty range at " + MemoryRange::hex(gpa));
    if (gpa % wire_page_size != 0 || length % wire_page_size != 0)
        return reject(k, "range " + MemoryRange::hex(gpa) + "+" + MemoryRange::hex(length) +
                             " is not page-aligned");
    if (gpa > guest_size || length > guest_size - gpa)
        return reject(k, "range " + MemoryRange::hex(gpa) + "+" + MemoryRange::hex(length) +
                             " lies outside the guest's " + MemoryRange::hex(guest_size) +
                             " bytes");
    return {};
}

[[nodiscard]] constexpr bool valid_status(std::uint32_t s) noexcept
{
    return s >= static_cast<std::uint32_t>(errc::invalid_range) &&
           s <= static_cast<std::uint32_t>(errc::quarantined);
}

} // namespace detail

/// How many fds travel with this message.
[[nodiscard]] constexpr std::size_t fd_count(const Body& b) noexcept
{
    if (const auto* r = std::get_if<FaultReply>(&b))
        return r->status == 0 ? 1 : 0;
    if (const auto* h = std::get_if<Hello>(&b))
        return h->dirty_bitmap_bytes != 0 ? 1 : 0;
    return 0;
}

/// The wire form of m (the caller attaches fd_count(m.body) fds).
[[nodiscard]] inline Encoded encode(const Message& m) noexcept
{
    Encoded e;
    const MessageKind k = detail::kind_of(m.body);
    e.size = detail::size_of(k);
    detail::Writer w(e.buffer);
    w.put(protocol_magic);
    w.put(protocol_version);
    w.put(static_cast<std::uint16_t>(k));
    w.put(static_cast<std::uint32_t>(e.size));
    w.put(m.seq);
    // (get_if rather than std::visit, which may throw bad_variant_access: encode is noexcept)
    if (const auto* h = std::get_if<Hello>(&m.body)) {
        w.put(h->guest_size);
        w.put(h->dirty_bitmap_bytes);
        w.put(static_cast<std::uint8_t>(h->dirty_layout));
        w.zeros(7);
    } else if (const auto* q = std::get_if<FaultRequest>(&m.body)) {
        w.put(q->gpa);
        w.put(static_cast<std::uint8_t>(q->write ? 1 : 0));
        w.zeros(7);
    } else if (const auto* r = std::get_if<FaultReply>(&m.body)) {
        w.put(r->status);
        w.put(static_cast<std::uint8_t>(r->writable ? 1 : 0));
        w.zeros(3);
        w.put(r->gpa);
        w.put(r->length);
        w.put(r->object_offset);
    } else if (const auto* v = std::get_if<Invalidate>(&m.body)) {
        w.put(v->gpa);
        w.put(v->length);
    }
    return e;
}

/// Decodes and validates one received message. `objects` describes the fds that came with it,
/// in order (the transport fstat()s them). Never trusts a field it has not checked; an error
/// names the message kind and the reason.
[[nodiscard]] inline Result<Message> decode(std::span<const std::byte> bytes,
                                            std::span<const ObjectInfo> objects,
                                            const DecodeContext& ctx)
{
    if (bytes.size() < header_size)
        return make_error(errc::invalid_argument,
                          "rejected message: " + std::to_string(bytes.size()) +
                              " bytes is shorter than the header");
    detail::Reader r(bytes);
    const auto magic = r.get<std::uint32_t>();
    const auto version = r.get<std::uint16_t>();
    const auto raw_kind = r.get<std::uint16_t>();
    const auto size = r.get<std::uint32_t>();
    Message m;
    m.seq = r.get<std::uint32_t>();
    if (magic != protocol_magic)
        return make_error(errc::invalid_argument, "rejected message: bad magic");
    if (version != protocol_version)
        return make_error(errc::unsupported, "rejected message: protocol version " +
                                                 std::to_string(version) + " (this side speaks " +
                                                 std::to_string(protocol_version) + ")");
    if (raw_kind < 1 || raw_kind > 5)
        return make_error(errc::invalid_argument,
                          "rejected message: unknown kind " + std::to_string(raw_kind));
    const auto k = static_cast<MessageKind>(raw_kind);
    const bool for_client =
        k == MessageKind::hello || k == MessageKind::fault_reply || k == MessageKind::invalidate;
    if (for_client != (ctx.receiver == Receiver::client))
        return detail::reject(k, std::string("not accepted by the ") +
                                     (ctx.receiver == Receiver::client ? "client" : "manager"));
    if (size != bytes.size() || size != detail::size_of(k))
        return detail::reject(k, "size " + std::to_string(bytes.size()) + " (header says " +
                                     std::to_string(size) + ", the kind has " +
                                     std::to_string(detail::size_of(k)) + ")");
    if (k != MessageKind::hello && ctx.guest_size == 0)
        return detail::reject(k, "arrived before hello");

    std::size_t fds_expected = 0;
    switch (k) {
    case MessageKind::hello: {
        Hello h;
        h.guest_size = r.get<std::uint64_t>();
        h.dirty_bitmap_bytes = r.get<std::uint64_t>();
        const auto layout = r.get<std::uint8_t>();
        if (!r.zeros(7))
            return detail::reject(k, "reserved bytes are not zero");
        if (ctx.guest_size != 0)
            return detail::reject(k, "a second hello");
        if (h.guest_size == 0 || h.guest_size % wire_page_size != 0 ||
            h.guest_size > max_guest_size)
            return detail::reject(k, "guest size " + MemoryRange::hex(h.guest_size) +
                                         " is zero, unaligned or above 2^52");
        if (layout > static_cast<std::uint8_t>(WireDirtyLayout::bytes)) {
            std::string why = "unknown dirty map layout ";
            why += std::to_string(layout);
            return detail::reject(k, why);
        }
        h.dirty_layout = static_cast<WireDirtyLayout>(layout);
        if (h.dirty_bitmap_bytes == 0 && h.dirty_layout != WireDirtyLayout::bits)
            return detail::reject(k, "a dirty map layout without a dirty map (must be 0)");
        if (h.dirty_bitmap_bytes != 0) {
            const std::uint64_t expected = wire_dirty_map_bytes(h.guest_size, h.dirty_layout);
            if (h.dirty_bitmap_bytes != expected) {
                std::string why = "dirty map of ";
                why += MemoryRange::hex(h.dirty_bitmap_bytes);
                why += " bytes (a guest of ";
                why += MemoryRange::hex(h.guest_size);
                why += " bytes has ";
                why += MemoryRange::hex(expected);
                why += h.dirty_layout == WireDirtyLayout::bytes ? " in the byte layout)"
                                                                : " in the bit layout)";
                return detail::reject(k, why);
            }
            fds_expected = 1;
            if (objects.size() == 1) {
                const ObjectInfo& o = objects[0];
                if (!o.mappable || o.size != h.dirty_bitmap_bytes)
                    return detail::reject(k, "the dirty bitmap's fd is not a mappable object of " +
                                                 MemoryRange::hex(h.dirty_bitmap_bytes) + " bytes");
                if (!o.size_sealed)
                    return detail::reject(k, "the dirty bitmap's size is not sealed "
                                             "(F_SEAL_SHRINK | F_SEAL_GROW)");
            }
        }
        m.body = h;
        break;
    }
    case MessageKind::fault_request: {
        FaultRequest q;
        q.gpa = r.get<std::uint64_t>();
        const auto write = r.get<std::uint8_t>();
        if (write > 1 || !r.zeros(7))
            return detail::reject(k, "reserved bytes or the write flag are not canonical");
        if (q.gpa >= ctx.guest_size)
            return detail::reject(k, "GPA " + MemoryRange::hex(q.gpa) +
                                         " lies outside the guest's " +
                                         MemoryRange::hex(ctx.guest_size) + " bytes");
        q.write = write == 1;
        m.body = q;
        break;
    }
    case MessageKind::fault_reply: {
        FaultReply p;
        p.status = r.get<std::uint32_t>();
        const auto writable = r.get<std::uint8_t>();
        if (writable > 1 || !r.zeros(3))
            return detail::reject(k, "reserved bytes or the writable flag are not canonical");
        p.writable = writable == 1;
        p.gpa = r.get<std::uint64_t>();
        p.length = r.get<std::uint64_t>();
        p.object_offset = r.get<std::uint64_t>();
        if (p.status != 0) {
            if (!detail::valid_status(p.status))
                return detail::reject(k, "unknown status " + std::to_string(p.status));
            if (p.gpa != 0 || p.length != 0 || p.object_offset != 0 || p.writable)
                return detail::reject(k, "an error reply that carries a piece");
        } else {
            MEMBACKING_TRY(detail::check_range(k, p.gpa, p.length, ctx.guest_size));
            fds_expected = 1;
            if (objects.size() == 1) {
                const ObjectInfo& o = objects[0];
                if (!o.mappable)
                    return detail::reject(k, "the fd is not a mappable object");
                if (p.object_offset % wire_page_size != 0 || p.object_offset > o.size ||
                    p.length > o.size - p.object_offset)
                    return detail::reject(
                        k, "piece at object offset " + MemoryRange::hex(p.object_offset) + "+" +
                               MemoryRange::hex(p.length) + " lies outside its object of " +
                               MemoryRange::hex(o.size) + " bytes, or is unaligned");
            }
        }
        m.body = p;
        break;
    }
    case MessageKind::invalidate: {
        Invalidate v;
        v.gpa = r.get<std::uint64_t>();
        v.length = r.get<std::uint64_t>();
        MEMBACKING_TRY(detail::check_range(k, v.gpa, v.length, ctx.guest_size));
        m.body = v;
        break;
    }
    case MessageKind::invalidate_ack: m.body = InvalidateAck{}; break;
    }
    if (objects.size() != fds_expected)
        return detail::reject(k, std::to_string(objects.size()) + " fds attached, " +
                                     std::to_string(fds_expected) + " expected");
    return m;
}

} // namespace membacking::ipc
