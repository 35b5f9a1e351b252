/**
 * FakeKvm: a KVM VM as far as KvmPartition can tell, behind the Linux syscall seam, so that the
 * KVM policy runs (and fails) on every machine, /dev/kvm or not (tests/kvm runs the real one in
 * the emulated VM). It keeps memslots (KVM_SET_USER_MEMORY_REGION: GPA, size, userspace
 * address, flags), answers their dirty logs (KVM_GET_DIRTY_LOG: ENOENT for a slot that does not
 * log, as the kernel answers; nothing written, so the partition sees its zeroed buffer) and
 * reports its capabilities (32 slots, read-only memory; no KVM_SET_USER_MEMORY_REGION2, no
 * manual protect). Every VM ioctl is counted; from the fail_from-th on, each fails with ENOSPC
 * and changes nothing. `inject`, if set, is asked first for every VM ioctl (true: fail it), so a
 * test can number these ioctls together with its other seams' calls. A /dev/null descriptor
 * stands for the VM's.
 */
#pragma once

#include <membacking/os/linux.hpp>

#include <cerrno>
#include <cstdint>
#include <linux/kvm.h>
#include <map>

namespace membacking::test {

struct FakeKvm : os::LinuxSyscalls {
    struct Slot {
        std::uint64_t gpa = 0;
        std::uint64_t size = 0;
        std::uint32_t flags = 0;
        std::uint64_t userspace_addr = 0;
        friend bool operator==(const Slot&, const Slot&) noexcept = default;
    };
    static inline std::map<std::uint32_t, Slot> slots; ///< by slot number
    static inline long calls = 0;
    static inline long fail_from = 0; ///< 0: nothing fails
    static inline long failed = 0;
    /// Asked before every VM ioctl (true: it fails with ENOSPC); nullptr: only fail_from counts.
    static inline bool (*inject)() = nullptr;

    static void reset()
    {
        slots.clear();
        calls = 0;
        fail_from = 0;
        failed = 0;
        inject = nullptr;
    }
    /// Every ioctl from the n-th from now on fails.
    static void fail_from_now(long n)
    {
        fail_from = calls + n;
        failed = 0;
    }

    static int ioctl(int /*fd*/, unsigned long request, unsigned long arg) noexcept
    {
        if (request != KVM_CHECK_EXTENSION)
            return refuse(ENOTTY);
        if (arg == KVM_CAP_NR_MEMSLOTS)
            return 32;
        return arg == KVM_CAP_READONLY_MEM ? 1 : 0;
    }
    static int ioctl(int /*fd*/, unsigned long request, void* arg) noexcept
    {
        ++calls;
        if ((inject != nullptr && inject()) || (fail_from != 0 && calls >= fail_from)) {
            ++failed;
            return refuse(ENOSPC);
        }
        if (request == KVM_SET_USER_MEMORY_REGION) {
            const auto& r = *static_cast<const kvm_userspace_memory_region*>(arg);
            if (r.memory_size == 0)
                slots.erase(r.slot);
            else
                slots[r.slot] = {r.guest_phys_addr, r.memory_size, r.flags, r.userspace_addr};
            return 0;
        }
        if (request == KVM_GET_DIRTY_LOG) {
            const auto& l = *static_cast<const kvm_dirty_log*>(arg);
            auto it = slots.find(l.slot);
            if (it == slots.end() || (it->second.flags & KVM_MEM_LOG_DIRTY_PAGES) == 0)
                return refuse(ENOENT);
            return 0;
        }
        return refuse(ENOTTY);
    }

private:
    static int refuse(int error) noexcept
    {
        errno = error;
        return -1;
    }
};

} // namespace membacking::test
