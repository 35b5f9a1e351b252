/**
 * @file access/dirty_tracking.hpp
 * Layer: access (includes base/ and access/dirty_bitmap.hpp).
 *
 * The dirty-tracking policy of the access path: the third template argument of GuestMemoryView
 * and GuestMemory, in the spirit of vm-memory's bitmap type parameter. A manager type picks it
 * where it is composed (TrackedGuestMemoryManager, fwd.hpp), so that every handle it hands out,
 * primary or lazy, whole guest or window, marks: a migration does not depend on each device
 * remembering to use a special handle.
 *
 * - NoDirtyTracking: the marker is an empty member ([[no_unique_address]]) whose mark() is
 *   nothing, and GuestMemoryView runs it only under `if constexpr`: the access path is the
 *   untracked one, instruction for instruction (tests/dirty/untracked_cost checks it).
 * - DirtyTracking: the marker is the word array of the manager's DirtyBitmap (one pointer more in
 *   the handle). Every write path marks exactly the pages it wrote, after the write: the whole
 *   range on success, and on a write that faulted part way the part it completed
 *   (AccessError::completed). Compare-exchange marks only when it swapped (a failed one changes
 *   no byte); fetch_* mark always. The mark is DirtyBitmap::mark_words: test, then set.
 * - ByteMapDirtyTracking: the same, into a byte-per-page map (DirtyMapLayout::bytes): the mark is
 *   one plain store of 1, no load and no branch (access/dirty_byte_map.hpp), for 8x the memory.
 *   Its manager creates its DirtyBitmap in that layout, so the marker and the map always agree.
 */
#pragma once

#include <membacking/access/dirty_bitmap.hpp>
#include <membacking/base/config.hpp>

#include <atomic>
#include <concepts>
#include <cstdint>
#include <type_traits>

namespace membacking {

/// The access path records nothing (the default).
struct NoDirtyTracking {
    static constexpr bool enabled = false;
    static constexpr DirtyMapLayout layout = DirtyMapLayout::bits; // unused
    struct Marker {
        Marker() noexcept = default;
        template <class Mapper>
        explicit Marker(const Mapper& /*mapper*/) noexcept
        {}
        MEMBACKING_ALWAYS_INLINE void mark(std::uint64_t /*gpa*/,
                                           std::uint64_t /*len*/) const noexcept
        {}
        template <std::uint64_t Size, bool Aligned>
        MEMBACKING_ALWAYS_INLINE void mark_one(std::uint64_t /*gpa*/) const noexcept
        {}
    };
};

/// Every write through the access path marks the pages it wrote in the mapper's DirtyBitmap,
/// which its manager creates in `Layout`: DirtyTracking and ByteMapDirtyTracking below.
template <DirtyMapLayout Layout>
struct BasicDirtyTracking {
    static constexpr bool enabled = true;
    static constexpr DirtyMapLayout layout = Layout;
    struct Marker {
        static constexpr bool bits = Layout == DirtyMapLayout::bits;
        /// The bit map's words, or the byte map's bytes.
        using Map = std::conditional_t<bits, std::atomic<std::uint64_t>*, unsigned char*>;

        Marker() noexcept = default;
        /// The mapper's map (VaMapper::dirty_bitmap); it lives as long as the mapper.
        template <class Mapper>
        explicit Marker(const Mapper& mapper) noexcept : map(storage(*mapper.dirty_bitmap()))
        {}
        /// Marks the pages of [gpa, gpa + len), absolute GPAs (nothing when len is 0).
        MEMBACKING_ALWAYS_INLINE void mark(std::uint64_t gpa, std::uint64_t len) const noexcept
        {
            if (len == 0)
                return;
            if constexpr (bits)
                detail::DirtyBitmap::mark_words(map, gpa, len);
            else
                detail::DirtyByteMap::mark(map, gpa, len);
        }
        /// Marks the page of a fixed-size access of Size (1, 2, 4 or 8) bytes at gpa, absolute;
        /// `Aligned`: the caller has checked that gpa is a multiple of Size, so the access lies
        /// in one page (DirtyBitmap::mark_one, DirtyByteMap::mark_one).
        template <std::uint64_t Size, bool Aligned>
        MEMBACKING_ALWAYS_INLINE void mark_one(std::uint64_t gpa) const noexcept
        {
            if constexpr (bits)
                detail::DirtyBitmap::mark_one<Size, Aligned>(map, gpa);
            else
                detail::DirtyByteMap::mark_one<Size, Aligned>(map, gpa);
        }
        Map map = nullptr;

    private:
        [[nodiscard]] static Map storage(const detail::DirtyBitmap& m) noexcept
        {
            if constexpr (bits)
                return m.words();
            else
                return m.marks();
        }
    };
};

/// A bit per page: the mark is a load and a test, and a `lock or` the first time.
using DirtyTracking = BasicDirtyTracking<DirtyMapLayout::bits>;
/// A byte per page: the mark is one plain store (access/dirty_byte_map.hpp), the map 8x larger.
using ByteMapDirtyTracking = BasicDirtyTracking<DirtyMapLayout::bytes>;

/// What GuestMemoryView accepts as its tracking policy.
template <class T>
concept DirtyTrackingPolicy = std::same_as<T, NoDirtyTracking> || std::same_as<T, DirtyTracking> ||
    std::same_as<T, ByteMapDirtyTracking>;

} // namespace membacking
