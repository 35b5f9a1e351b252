/**
 * InjectingKvm: the Linux syscall seam with KVM failures on demand: a lowered memslot limit
 * (what KVM_CHECK_EXTENSION(KVM_CAP_NR_MEMSLOTS) reports) and the n-th memslot update
 * (KVM_SET_USER_MEMORY_REGION or ...REGION2) failing with a chosen errno, doing nothing.
 */
#pragma once

#include <membacking/os/linux.hpp>
#include <membacking/partition/kvm.hpp>

#include "injecting_syscalls.hpp"

#include <cerrno>
#include <linux/kvm.h>

namespace membacking::test {

struct InjectingKvm : os::LinuxSyscalls {
    static inline long memslot_limit = -1; ///< < 0: the kernel's own limit
    static inline Plan memslot_plan;       ///< failures of memslot updates
    static inline std::size_t memslot_calls = 0;

    static void reset()
    {
        memslot_limit = -1;
        memslot_plan = {};
        memslot_calls = 0;
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
        return os::LinuxSyscalls::ioctl(fd, request, arg);
    }
    static int ioctl(int fd, unsigned long request, unsigned long arg) noexcept
    {
        if (request == KVM_CHECK_EXTENSION && arg == KVM_CAP_NR_MEMSLOTS && memslot_limit >= 0)
            return static_cast<int>(memslot_limit);
        return os::LinuxSyscalls::ioctl(fd, request, arg);
    }
};

} // namespace membacking::test
