/**
 * @file mapping/memory_piece.hpp
 * Layer: mapping (includes base/, va/mappable.hpp, region/mapping.hpp).
 *
 * The memory table's vocabulary: what a consumer outside this process's VA mappers (a vhost-user
 * backend's SET_MEM_TABLE, a VFIO container's MAP_DMA, a client process) needs to reach one piece
 * of guest memory, and how the table changes.
 *
 * - MemoryPiece: a GPA range, the mappable object behind it (its fd on Linux, its section handle
 *   on Windows: object.native_handle()), the offset in that object of the range's first byte, and
 *   whether the guest may write it. The piece holds a copy of the Mappable, so the handle stays
 *   open while the piece (or any copy of it) lives; a consumer that keeps the memory mapped longer
 *   keeps a copy or dups the handle.
 * - Private memory (anonymous, in this process only) has no object: object is empty,
 *   native_handle() is -1 (nullptr on Windows), shareable() is false and offset is 0. It cannot be
 *   handed to another process or device; require_shareable() turns it into a clear error.
 * - Pieces are maximal: two adjacent pieces of one region that continue the same object at
 *   contiguous offsets with the same permission are one piece. Nothing else is merged (pieces of
 *   different regions stay apart, so a region going away removes only its own pieces).
 * - MemoryTableChange: one step of the table, delivered to listeners (mapping/memory_listener.hpp).
 *   `removed` are whole pieces the listener was given before (never a part of one), `added` are
 *   the pieces that take their place and overlap nothing the listener still holds once `removed`
 *   are gone: apply the removals first (a VFIO container must unmap an IOVA before it maps a new
 *   piece there). A permission change is the piece removed and the same range added with the new
 *   permission, in one change.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/region/region_id.hpp>
#include <membacking/va/mappable.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace membacking {

/// One piece of active guest memory, as a consumer outside the VA mappers maps it.
struct MemoryPiece {
    MemoryRange gpa;
    Mappable object;       ///< empty for private memory (not shareable)
    Offset offset{0};      ///< offset in `object` of gpa.start() (0 for private memory)
    bool writable = false; ///< the guest may write it (mapping and region both writable)
    MappingType type = MappingType::Ram;
    RegionId region; ///< the region it belongs to

    /// The piece as the VA mappers see it (an ActiveMapping) in table form.
    [[nodiscard]] static MemoryPiece from(const ActiveMapping& m)
    {
        return {m.gpa,      m.backing.object, Offset{m.backing.file_offset},
                m.writable, m.type,           m.region};
    }

    /// Whether another process or device can map it (it has an object).
    [[nodiscard]] bool shareable() const noexcept { return !object.empty(); }

    /// The part covering `part` (which must lie inside gpa).
    [[nodiscard]] MemoryPiece slice(const MemoryRange& part) const
    {
        MEMBACKING_CHECK(gpa.contains(part), "MemoryPiece::slice outside the piece");
        MemoryPiece p = *this;
        p.gpa = part;
        if (shareable())
            p.offset = offset + Length(part.start() - gpa.start());
        return p;
    }

    /// Whether `next` continues this piece (adjacent, same region, object, offsets and
    /// permission): the two are one piece.
    [[nodiscard]] bool continued_by(const MemoryPiece& next) const noexcept
    {
        return gpa.end() == next.gpa.start() && region == next.region && type == next.type &&
               writable == next.writable && object == next.object &&
               (!shareable() || offset + gpa.length() == next.offset);
    }

    /// "0x0-0xa0000 (fd 5 at offset 0x0, rw)" or "0x0-0xa0000 (private memory, rw)".
    [[nodiscard]] std::string describe() const
    {
        std::string out = gpa.to_string() + " (";
        if (shareable()) {
#if MEMBACKING_OS_WINDOWS
            out += "section " +
                   MemoryRange::hex(reinterpret_cast<std::uintptr_t>(object.native_handle()));
#else
            out += "fd " + std::to_string(object.native_handle());
#endif
            out += " at offset " + to_string(offset);
        } else
            out += "private memory";
        return out + (writable ? ", rw)" : ", ro)");
    }

    friend bool operator==(const MemoryPiece&, const MemoryPiece&) noexcept = default;
};

/// One step of the memory table (see the file comment for the ordering contract).
struct MemoryTableChange {
    enum class Kind : std::uint8_t {
        initial,  ///< the whole table, once, when the listener is registered (removed is empty)
        update,   ///< a control operation changes the table
        rollback, ///< undoes a change this listener accepted earlier in the same control call;
                  ///< it cannot be refused (a listener that fails it is cut off)
    };

    Kind kind = Kind::update;
    std::vector<MemoryPiece> removed; ///< whole pieces given before, by GPA; remove these first
    std::vector<MemoryPiece> added;   ///< then add these, by GPA

    /// The GPA extent the change touches (for messages); empty if the change is empty.
    [[nodiscard]] MemoryRange extent() const
    {
        std::uint64_t lo = ~std::uint64_t{0};
        std::uint64_t hi = 0;
        for (const auto* list : {&removed, &added})
            for (const MemoryPiece& p : *list) {
                lo = std::min(lo, p.gpa.start());
                hi = std::max(hi, p.gpa.end());
            }
        return lo > hi ? MemoryRange{} : MemoryRange::valid_or_abort(lo, hi);
    }
};

/// errc::unsupported naming the first private piece, if any: private memory lives in this
/// process's VA only and cannot be handed to another process or a device.
[[nodiscard]] inline Result<void> require_shareable(std::span<const MemoryPiece> pieces)
{
    for (const MemoryPiece& p : pieces)
        if (!p.shareable())
            return make_error(errc::unsupported,
                              "guest memory at " + p.gpa.to_string() + " (region #" +
                                  std::to_string(p.region.value) +
                                  ") is private memory, which cannot be shared with another "
                                  "process or device; back it with a shared object (memfd)");
    return {};
}

} // namespace membacking
