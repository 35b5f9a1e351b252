/**
 * @file manager/quiesce_hook.hpp
 * Layer: manager (includes nothing of the library).
 *
 * QuiesceHook: how a VMM keeps a running guest from seeing a topology change half done.
 *
 * Hypervisors cannot replace a mapped window atomically. KVM changes a memslot's permissions (a
 * PAM segment going read-only), a re-map with new params, or a region replaced by another, by
 * deleting the slot and creating the new one; a vCPU that touches those pages in between takes an
 * MMIO exit on RAM, and the VMM answers it with whatever its MMIO path returns. Guest writes that
 * land in a logged slot after its last dirty-log read and before its deletion are lost.
 *
 * The bracket, per attached partition that has a hook:
 * - begin() is called before the first step of a control operation that a running guest must not
 *   see half done: unmapping a window (always the first half of a replacement), and turning dirty
 *   logging on or off (one slot after the other);
 * - end() is called once the whole control operation is over, its rollback included;
 * - so a control operation calls them at most once, and not at all when it has no such step (a
 *   plain map of a new window is atomic). Without a hook nothing is called and nothing is paid.
 * - Teardown (destroying the manager) does not call the hook: stop the vCPUs first.
 *
 * begin() must return only once none of the partition's vCPUs is in guest mode, and keep them out
 * until end(). With KVM: set kvm_run->immediate_exit, kick each vCPU thread with a signal (KVM_RUN
 * returns EINTR), and park the thread before it calls KVM_RUN again (examples/vmm.cpp does this).
 * Both run on the thread that made the control call, with the manager's control lock held: they
 * must not call the manager, and must not throw.
 */
#pragma once

#include <functional>

namespace membacking {

struct QuiesceHook {
    std::function<void()> begin; ///< hold every vCPU of the partition out of guest mode
    std::function<void()> end;   ///< let them run again

    /// True if both halves are set.
    [[nodiscard]] explicit operator bool() const noexcept { return begin && end; }
};

} // namespace membacking
