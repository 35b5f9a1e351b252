/**
 * @file manager/manager_fwd.hpp
 * Layer: manager (includes access/dirty_tracking.hpp only).
 *
 * The manager template and its two spellings, declared once for fwd.hpp and
 * manager/guest_memory_manager.hpp:
 * - GuestMemoryManager<Resolver, Va, Partitions...>: the access path records nothing;
 * - TrackedGuestMemoryManager<Resolver, Va, Partitions...>: every GuestMemory it hands out marks
 *   the pages it writes (DirtyTracking), and the manager has the dirty API of a migration loop.
 * Both are BasicGuestMemoryManager<Tracking, Resolver, Va, Partitions...>.
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

} // namespace membacking
