/**
 * @file fwd.hpp
 * Layer: top.
 *
 * Forward declarations of the main templates, and the default compositions, so that code can name
 * a manager type without pulling in the manager's implementation. The aliases need the policy
 * types complete (the manager's parameters are concept-checked where the type is named), so this
 * header includes the policy headers, which are light; the manager itself is declared only.
 *
 * Default compositions, per platform (both: DefaultVaPolicy, DefaultGuestMemoryManager<Ps...>
 * = NestedPriority + the platform's VA policy + the given partitions, MockGuestMemoryManager):
 * - Linux: LinuxGuestMemoryManager<Partitions...> (NestedPriority + LinuxMmap + the partitions);
 *   MockGuestMemoryManager (Linux VA with the mock partition: tests, examples without KVM);
 *   KvmGuestMemoryManager (KVM partitions, and mock partitions to observe), and
 *   TrackedKvmGuestMemoryManager (the same with dirty tracking),
 * ByteMapTrackedKvmGuestMemoryManager (with a byte-per-page dirty map).
 * - Windows: WindowsGuestMemoryManager<Partitions...> (NestedPriority + WindowsPlaceholder + the
 *   partitions); MockGuestMemoryManager (placeholder VA with the mock partition);
 *   WhpGuestMemoryManager (WHP partitions, and mock partitions to observe).
 * Both: TrackedMockGuestMemoryManager (the mock with dirty tracking) and
 *   ByteMapTrackedMockGuestMemoryManager (with a byte-per-page dirty map).
 * Any other platform stops here with an #error: the library has no VA policy for it.
 */
#pragma once

#include <membacking/base/config.hpp>
#include <membacking/manager/manager_fwd.hpp>
#include <membacking/partition/mock.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/resolver.hpp>
#include <membacking/va/va_policy.hpp>

#if MEMBACKING_OS_LINUX
#    include <membacking/os/linux.hpp>
#    include <membacking/partition/kvm.hpp>
#    include <membacking/va/linux_mmap.hpp>
#elif MEMBACKING_OS_WINDOWS
#    include <membacking/os/windows.hpp>
#    include <membacking/partition/whp.hpp>
#    include <membacking/va/windows_placeholder.hpp>
#else
// Only Linux and Windows have a VA policy (va/) and a system-call seam (os/).
#    error "membacking: unsupported platform (Linux and Windows only): no VA policy for it"
#endif

namespace membacking {

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

/// The same, with dirty tracking: every GuestMemory marks what it writes (live migration).
using TrackedKvmGuestMemoryManager =
    TrackedGuestMemoryManager<NestedPriority, DefaultVaPolicy, DefaultKvmPartition, MockPartition>;

/// The same with a byte-per-page dirty map (marks cost one plain store; README, Dirty tracking).
using ByteMapTrackedKvmGuestMemoryManager =
    ByteMapTrackedGuestMemoryManager<NestedPriority, DefaultVaPolicy, DefaultKvmPartition,
                                     MockPartition>;
#elif MEMBACKING_OS_WINDOWS
/// The Windows VA policy (placeholders) with the real system calls.
using DefaultVaPolicy = WindowsPlaceholder<os::WindowsSyscalls>;

/// NestedPriority regions, placeholder VA mappers, and the given partition policies.
template <class... Partitions>
using WindowsGuestMemoryManager =
    GuestMemoryManager<NestedPriority, DefaultVaPolicy, Partitions...>;

/// Placeholder VA mappers with the mock partition: for tests, and for running without WHP.
using MockGuestMemoryManager = WindowsGuestMemoryManager<MockPartition>;

/// A WHP VMM's manager: WHP partitions, and mock partitions for observing (tests, dry runs).
using WhpGuestMemoryManager = WindowsGuestMemoryManager<WhpPartition, MockPartition>;
#endif

/// Mock partitions with dirty tracking (tests, migration without a hypervisor).
using TrackedMockGuestMemoryManager =
    TrackedGuestMemoryManager<NestedPriority, DefaultVaPolicy, MockPartition>;
/// The same with a byte-per-page dirty map.
using ByteMapTrackedMockGuestMemoryManager =
    ByteMapTrackedGuestMemoryManager<NestedPriority, DefaultVaPolicy, MockPartition>;

/// This platform's VA policy with NestedPriority regions and the given partitions.
template <class... Partitions>
using DefaultGuestMemoryManager =
    GuestMemoryManager<NestedPriority, DefaultVaPolicy, Partitions...>;

} // namespace membacking
