/**
 * @file manager/manager_fwd.hpp
 * Layer: manager (includes access/dirty_tracking.hpp only).
 *
 * The manager template and its two spellings, declared once for fwd.hpp and
 * manager/guest_memory_manager.hpp:
 * - GuestMemoryManager<Resolver, Va, Partitions...>: the access path records nothing;
 * - TrackedGuestMemoryManager<Resolver, Va, Partitions...>: every GuestMemory it hands out marks
 *   the pages it writes (DirtyTracking), and the manager has the dirty API of a migration loop;
 * - ByteMapTrackedGuestMemoryManager<Resolver, Va, Partitions...>: the same with a byte per page
 *   (ByteMapDirtyTracking): a mark costs one plain store, the map 8x the memory.
 * All are BasicGuestMemoryManager<Tracking, Resolver, Va, Partitions...>.
 */
#pragma once

#include <membacking/access/dirty_tracking.hpp>

namespace membacking {

// Plain `class` parameters: the manager checks each policy with static_asserts that name what is
// missing (see manager/guest_memory_manager.hpp).
template <class Tracking, class Resolver, class Va, class... Partitions>
class BasicGuestMemoryManager;

/// A manager whose access path records nothing (no dirty API).
template <class Resolver, class Va, class... Partitions>
using GuestMemoryManager = BasicGuestMemoryManager<NoDirtyTracking, Resolver, Va, Partitions...>;

/// A manager whose every GuestMemory marks the pages it writes, with the dirty API.
template <class Resolver, class Va, class... Partitions>
using TrackedGuestMemoryManager =
    BasicGuestMemoryManager<DirtyTracking, Resolver, Va, Partitions...>;

/// The same with a byte-per-page map: marks as cheap as the write, harvests read 8x more.
template <class Resolver, class Va, class... Partitions>
using ByteMapTrackedGuestMemoryManager =
    BasicGuestMemoryManager<ByteMapDirtyTracking, Resolver, Va, Partitions...>;

} // namespace membacking
