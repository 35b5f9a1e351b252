// libFuzzer harness for the protocol decoder (ipc/protocol.hpp), a pure function.
//
// Input layout: byte 0 chooses the receiving side (bit 0), whether hello was seen (bit 1), and
// how many fds came with the message (bits 2-3); bytes 1-8 are the little-endian size of every
// such fd's object, byte 9 whether it is mappable (bit 0) and size-sealed (bit 1); the rest is the
// datagram.
//
// Properties checked beyond "no crash, no sanitizer report":
// - an accepted message re-encodes to exactly the bytes received (the format is canonical: no
//   two encodings of one message, so nothing unchecked can hide in a field);
// - its fd count is what the kind says, and a piece it names lies inside its object, page-aligned,
//   inside the guest; a hello's dirty map layout is a known one (bits or bytes), and bits when
//   there is no map; its dirty map has the size of the guest's map in that layout, and its fd is
//   a mappable, size-sealed object of exactly that size.
#include <membacking/ipc/protocol.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

namespace ipc = membacking::ipc;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    if (size < 10)
        return 0;
    const std::uint8_t flags = data[0];
    std::uint64_t object_size = 0;
    for (int i = 0; i < 8; ++i)
        object_size |= static_cast<std::uint64_t>(data[1 + i]) << (8 * i);
    const ipc::ObjectInfo object{(data[9] & 1) != 0, object_size, (data[9] & 2) != 0};
    const std::vector<ipc::ObjectInfo> objects((flags >> 2) & 3, object);
    const ipc::DecodeContext ctx{(flags & 1) != 0 ? ipc::Receiver::manager : ipc::Receiver::client,
                                 (flags & 2) != 0 ? std::uint64_t{0x40000000} : 0};
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data + 10),
                                           size - 10);

    auto m = ipc::decode(bytes, objects, ctx);
    if (!m)
        return 0;
    const auto e = ipc::encode(*m);
    if (e.size != bytes.size() || std::memcmp(e.buffer.data(), bytes.data(), e.size) != 0)
        std::abort(); // accepted a non-canonical encoding
    if (ipc::fd_count(m->body) != objects.size())
        std::abort();
    if (const auto* r = std::get_if<ipc::FaultReply>(&m->body); r != nullptr && r->status == 0) {
        const std::uint64_t guest = ctx.guest_size;
        if (r->length == 0 || r->gpa + r->length > guest || r->gpa + r->length < r->gpa ||
            r->object_offset + r->length > object.size ||
            r->object_offset + r->length < r->object_offset || !object.mappable ||
            r->gpa % ipc::wire_page_size != 0 || r->object_offset % ipc::wire_page_size != 0)
            std::abort();
    }
    if (const auto* h = std::get_if<ipc::Hello>(&m->body); h != nullptr) {
        if (h->dirty_layout != ipc::WireDirtyLayout::bits &&
            h->dirty_layout != ipc::WireDirtyLayout::bytes)
            std::abort(); // an unknown layout accepted
        if (h->dirty_bitmap_bytes == 0 && h->dirty_layout != ipc::WireDirtyLayout::bits)
            std::abort(); // a layout without a map: not canonical
        if (h->dirty_bitmap_bytes != 0 &&
            (h->dirty_bitmap_bytes != ipc::wire_dirty_map_bytes(h->guest_size, h->dirty_layout) ||
             object.size != h->dirty_bitmap_bytes || !object.mappable || !object.size_sealed))
            std::abort();
    }
    return 0;
}
