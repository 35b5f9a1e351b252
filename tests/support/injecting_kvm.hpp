/**
 * InjectingKvm: the Linux syscall seam with KVM failures on demand: a lowered memslot limit
 * (what KVM_CHECK_EXTENSION(KVM_CAP_NR_MEMSLOTS) reports) and the n-th memslot update
 * (KVM_SET_USER_MEMORY_REGION or ...REGION2) failing with a chosen errno, doing nothing; and a
 * scripted KVM_PRE_FAULT_MEMORY for hosts whose kernel lacks it (this project's do), so the
 * partition's use of it (progress, retries, errors) is tested somewhere. after_memslot, if set, is
 * called after every memslot update the kernel accepted, with its GPA and size (0: a deletion):
 * a test can stop there, inside a replacement, and look at what a running guest sees.
 * hide_manual_protect plays an old kernel without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, and every
 * KVM_CLEAR_DIRTY_LOG is recorded in clear_calls (then done by the kernel); drop_dirty_log
 * hides the guest's log from the partition.
 */
#pragma once

#include <membacking/os/linux.hpp>
#include <membacking/partition/kvm.hpp>

#include "injecting_syscalls.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <functional>
#include <linux/kvm.h>
#include <vector>

namespace membacking::test {

/// One scripted answer of the fake KVM_PRE_FAULT_MEMORY: advance by `progress` bytes and succeed,
/// or (progress 0) fail with `error`, or (both 0) succeed without doing anything (a broken kernel).
struct PreFaultStep {
    std::uint64_t progress = 0;
    int error = 0;
};

/// What the partition asked of the fake KVM_PRE_FAULT_MEMORY: the range left, per call.
struct PreFaultCall {
    std::uint64_t gpa;
    std::uint64_t size;
};

/// A KVM_CLEAR_DIRTY_LOG the partition issued: its slot, pages and mask (bit i = first_page + i).
struct ClearCall {
    std::uint32_t slot;
    std::uint64_t first_page;
    std::uint32_t num_pages;
    std::vector<std::uint64_t> mask;
};

struct InjectingKvm : os::LinuxSyscalls {
    static inline long memslot_limit = -1; ///< < 0: the kernel's own limit
    static inline Plan memslot_plan;       ///< failures of memslot updates
    static inline std::size_t memslot_calls = 0;
    /// Claim KVM_CAP_PRE_FAULT_MEMORY and answer the ioctl from pre_fault_script (then, once it
    /// runs out, by finishing the range).
    static inline bool fake_pre_fault = false;
    static inline std::vector<PreFaultStep> pre_fault_script;
    static inline std::vector<PreFaultCall> pre_fault_calls;
    static inline std::function<void(std::uint64_t gpa, std::uint64_t size)> after_memslot;
    /// Say KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is missing (an old kernel: clear-on-read).
    static inline bool hide_manual_protect = false;
    /// Drop the guest's dirty log: KVM_GET_DIRTY_LOG succeeds without asking the kernel, so the
    /// partition sees the zeroed buffer it passed (a loop's check must notice).
    static inline bool drop_dirty_log = false;
    /// Every KVM_CLEAR_DIRTY_LOG, recorded and then passed to the kernel.
    static inline std::vector<ClearCall> clear_calls;

    static void reset()
    {
        memslot_limit = -1;
        memslot_plan = {};
        memslot_calls = 0;
        fake_pre_fault = false;
        pre_fault_script.clear();
        pre_fault_calls.clear();
        after_memslot = nullptr;
        hide_manual_protect = false;
        drop_dirty_log = false;
        clear_calls.clear();
    }

    static int ioctl(int fd, unsigned long request, void* arg) noexcept
    {
        if (request == KVM_SET_USER_MEMORY_REGION ||
            request == detail::kvm_abi::set_user_memory_region2) {
            ++memslot_calls;
            if (memslot_plan.next()) {
                errno = memslot_plan.error;
                return -1;
            }
        }
        if (request == KVM_SET_USER_MEMORY_REGION && after_memslot)
            return reported(fd, request, *static_cast<kvm_userspace_memory_region*>(arg));
        if (request == detail::kvm_abi::set_user_memory_region2 && after_memslot)
            return reported(fd, request,
                            *static_cast<detail::kvm_abi::UserspaceMemoryRegion2*>(arg));
        if (request == KVM_GET_DIRTY_LOG && drop_dirty_log)
            return 0;
        if (request == KVM_CLEAR_DIRTY_LOG) {
            const auto& c = *static_cast<const kvm_clear_dirty_log*>(arg);
            const auto* words = static_cast<const std::uint64_t*>(c.dirty_bitmap);
            clear_calls.push_back(
                {c.slot, c.first_page, c.num_pages,
                 std::vector<std::uint64_t>(words, words + (c.num_pages + 63) / 64)});
        }
        if (request == detail::kvm_abi::pre_fault_memory && fake_pre_fault)
            return pre_fault(*static_cast<detail::kvm_abi::PreFaultMemory*>(arg));
        return os::LinuxSyscalls::ioctl(fd, request, arg);
    }
    static int ioctl(int fd, unsigned long request, unsigned long arg) noexcept
    {
        if (request == KVM_CHECK_EXTENSION && arg == KVM_CAP_NR_MEMSLOTS && memslot_limit >= 0)
            return static_cast<int>(memslot_limit);
        if (request == KVM_CHECK_EXTENSION && arg == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 &&
            hide_manual_protect)
            return 0;
        if (request == KVM_CHECK_EXTENSION && arg == detail::kvm_abi::cap_pre_fault_memory &&
            fake_pre_fault)
            return 1;
        return os::LinuxSyscalls::ioctl(fd, request, arg);
    }

private:
    template <class Region>
    static int reported(int fd, unsigned long request, Region& r) noexcept
    {
        const int rc = os::LinuxSyscalls::ioctl(fd, request, &r);
        if (rc == 0)
            after_memslot(r.guest_phys_addr, r.memory_size); // a test's hook: may not throw
        return rc;
    }

    static int pre_fault(detail::kvm_abi::PreFaultMemory& pf) noexcept
    {
        pre_fault_calls.push_back({pf.gpa, pf.size});
        PreFaultStep step{pf.size, 0};
        if (pre_fault_calls.size() <= pre_fault_script.size())
            step = pre_fault_script[pre_fault_calls.size() - 1];
        if (step.progress == 0 && step.error != 0) {
            errno = step.error;
            return -1;
        }
        const std::uint64_t done = std::min(step.progress, pf.size);
        pf.gpa += done;
        pf.size -= done;
        return 0;
    }
};

} // namespace membacking::test
