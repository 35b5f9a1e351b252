/**
 * @file fwd.hpp
 * Layer: top.
 *
 * Forward declarations of the main templates, and the default compositions, so that code can name
 * a manager type without pulling in the manager's implementation. The aliases need the policy
 * types complete (the manager's parameters are concept-checked where the type is named), so this
 * header includes the policy headers, which are light; the manager itself is declared only.
 *
 * Default compositions:
 * - LinuxGuestMemoryManager<Partitions...>: NestedPriority + LinuxMmap + the given partitions.
 * - MockGuestMemoryManager: Linux VA with the mock partition (tests, examples without KVM).
 * - KvmGuestMemoryManager: Linux VA with KVM partitions (and mock partitions to observe).
 */
#pragma once

#include <membacking/base/config.hpp>
#include <membacking/partition/mock.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/resolver.hpp>
#include <membacking/va/va_policy.hpp>

#if MEMBACKING_OS_LINUX
#    include <membacking/os/linux.hpp>
#    include <membacking/partition/kvm.hpp>
#    include <membacking/va/linux_mmap.hpp>
#endif

namespace membacking {

// Plain `class` parameters: the manager checks each policy with static_asserts that name what is
// missing (see manager/guest_memory_manager.hpp).
template <class Resolver, class Va, class... Partitions>
class GuestMemoryManager;

template <class Manager>
class GuestMemoryBuilder;

#if MEMBACKING_OS_LINUX
/// The Linux VA policy with the real system calls.
using DefaultVaPolicy = LinuxMmap<os::LinuxSyscalls>;

/// NestedPriority regions, Linux VA mappers, and the given partition policies.
template <class... Partitions>
using LinuxGuestMemoryManager = GuestMemoryManager<NestedPriority, DefaultVaPolicy, Partitions...>;

/// Linux VA mappers with the mock partition: for tests, and for running without a hypervisor.
using MockGuestMemoryManager = LinuxGuestMemoryManager<MockPartition>;

/// The KVM partition with the real system calls.
using DefaultKvmPartition = KvmPartition<os::LinuxSyscalls>;

/// A KVM VMM's manager: KVM partitions, and mock partitions for observing (tests, dry runs).
using KvmGuestMemoryManager = LinuxGuestMemoryManager<DefaultKvmPartition, MockPartition>;
#endif

} // namespace membacking
