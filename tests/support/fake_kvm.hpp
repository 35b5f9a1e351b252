/**
 * FakeKvm: a KVM VM as far as KvmPartition can tell, behind the Linux syscall seam, so that the
 * KVM policy runs (and fails) on every machine, /dev/kvm or not (tests/kvm runs the real one on
 * the host's /dev/kvm or in the emulated VM). It keeps memslots (GPA, size, userspace address,
 * flags) and a dirty bitmap per logging slot, which a test fills with dirty(gpa), as a guest's
 * writes would. Two kernels, chosen by `modern` before the partition is created:
 * - old (false, Linux < 5.8): KVM_SET_USER_MEMORY_REGION only, and clear-on-read: no
 *   KVM_CAP_USER_MEMORY2, no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
 * - modern (true): KVM_SET_USER_MEMORY_REGION2 (the old call is refused, so a test sees which one
 *   the partition uses) and manual protect (KVM_ENABLE_CAP, then KVM_GET_DIRTY_LOG only reads
 *   and KVM_CLEAR_DIRTY_LOG clears, with the kernel's alignment rule: first_page a multiple of
 *   64, num_pages too unless the range ends the slot, else EINVAL).
 * KVM_GET_DIRTY_LOG of a slot that does not log is ENOENT, as the kernel answers. Both report 32
 * slots and read-only memory. Every VM ioctl is counted; from the fail_from-th on, each fails
 * with ENOSPC and changes nothing. `inject`, if set, is asked first for every VM ioctl (true:
 * fail it), so a test can number these ioctls together with its other seams' calls. A
 * /dev/null descriptor stands for the VM's.
 */
#pragma once

#include <membacking/os/linux.hpp>
#include <membacking/partition/kvm.hpp>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <linux/kvm.h>
#include <map>
#include <vector>

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
    /// The dirty bitmap of each logging slot (bit i: page i of the slot), by slot number.
    static inline std::map<std::uint32_t, std::vector<std::uint64_t>> logs;
    static inline bool modern = false;         ///< see the file comment
    static inline bool manual_protect = false; ///< enabled by KVM_ENABLE_CAP (modern only)
    static inline long calls = 0;
    static inline long fail_from = 0; ///< 0: nothing fails
    static inline long failed = 0;
    /// Asked before every VM ioctl (true: it fails with ENOSPC); nullptr: only fail_from counts.
    static inline bool (*inject)() = nullptr;

    static void reset()
    {
        slots.clear();
        logs.clear();
        modern = false;
        manual_protect = false;
        calls = 0;
        fail_from = 0;
        failed = 0;
        inject = nullptr;
    }

    /// A guest write to the page at gpa: logged if a logging slot holds it (true), else not.
    static bool dirty(std::uint64_t gpa)
    {
        for (const auto& [n, s] : slots)
            if (gpa >= s.gpa && gpa < s.gpa + s.size && (s.flags & KVM_MEM_LOG_DIRTY_PAGES) != 0) {
                const std::uint64_t page = (gpa - s.gpa) / 4096;
                log_of(n)[page / 64] |= std::uint64_t{1} << (page % 64);
                return true;
            }
        return false;
    }
    /// Pages logged in KVM's bitmaps and not cleared.
    static std::uint64_t logged_pages()
    {
        std::uint64_t n = 0;
        for (const auto& [slot, bits] : logs)
            for (const std::uint64_t w : bits)
                n += static_cast<std::uint64_t>(std::popcount(w));
        return n;
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
        if (modern &&
            (arg == detail::kvm_abi::cap_user_memory2 || arg == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            return 1; // for manual protect: KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        return arg == KVM_CAP_READONLY_MEM ? 1 : 0;
    }
    static int ioctl(int /*fd*/, unsigned long request, void* arg) noexcept
    {
        ++calls;
        if ((inject != nullptr && inject()) || (fail_from != 0 && calls >= fail_from)) {
            ++failed;
            return refuse(ENOSPC);
        }
        if (request == KVM_SET_USER_MEMORY_REGION && !modern) {
            const auto& r = *static_cast<const kvm_userspace_memory_region*>(arg);
            return set_slot(r.slot, {r.guest_phys_addr, r.memory_size, r.flags, r.userspace_addr});
        }
        if (request == detail::kvm_abi::set_user_memory_region2 && modern) {
            const auto& r = *static_cast<const detail::kvm_abi::UserspaceMemoryRegion2*>(arg);
            return set_slot(r.slot, {r.guest_phys_addr, r.memory_size, r.flags, r.userspace_addr});
        }
        if (request == KVM_ENABLE_CAP && modern) {
            const auto& c = *static_cast<const kvm_enable_cap*>(arg);
            if (c.cap != KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 || c.args[0] != 1)
                return refuse(EINVAL);
            manual_protect = true;
            return 0;
        }
        if (request == KVM_GET_DIRTY_LOG) {
            const auto& l = *static_cast<const kvm_dirty_log*>(arg);
            auto it = slots.find(l.slot);
            if (it == slots.end() || (it->second.flags & KVM_MEM_LOG_DIRTY_PAGES) == 0)
                return refuse(ENOENT);
            std::vector<std::uint64_t>& bits = log_of(l.slot);
            std::copy(bits.begin(), bits.end(), static_cast<std::uint64_t*>(l.dirty_bitmap));
            if (!manual_protect)
                std::fill(bits.begin(), bits.end(), 0);
            return 0;
        }
        if (request == KVM_CLEAR_DIRTY_LOG && manual_protect) {
            const auto& c = *static_cast<const kvm_clear_dirty_log*>(arg);
            auto it = slots.find(c.slot);
            if (it == slots.end() || (it->second.flags & KVM_MEM_LOG_DIRTY_PAGES) == 0)
                return refuse(ENOENT);
            const std::uint64_t slot_pages = it->second.size / 4096;
            const std::uint64_t end = std::uint64_t{c.first_page} + c.num_pages;
            if (c.first_page % 64 != 0 || end > slot_pages ||
                (c.num_pages % 64 != 0 && end != slot_pages))
                return refuse(EINVAL);
            std::vector<std::uint64_t>& bits = log_of(c.slot);
            const auto* mask = static_cast<const std::uint64_t*>(c.dirty_bitmap);
            for (std::uint64_t i = 0; i < c.num_pages; ++i)
                if ((mask[i / 64] >> (i % 64)) & 1U) {
                    const std::uint64_t page = c.first_page + i;
                    bits[page / 64] &= ~(std::uint64_t{1} << (page % 64));
                }
            return 0;
        }
        return refuse(ENOTTY);
    }

private:
    /// A memslot update: size 0 deletes the slot and its log; a slot that stops logging loses
    /// its log, as the kernel's does.
    static int set_slot(std::uint32_t n, const Slot& s)
    {
        if (s.size == 0) {
            slots.erase(n);
            logs.erase(n);
            return 0;
        }
        const auto it = slots.find(n);
        if (it != slots.end() && (it->second.gpa != s.gpa || it->second.size != s.size))
            return refuse(EINVAL); // the kernel moves or resizes no slot
        slots[n] = s;
        if ((s.flags & KVM_MEM_LOG_DIRTY_PAGES) == 0)
            logs.erase(n);
        return 0;
    }
    static std::vector<std::uint64_t>& log_of(std::uint32_t n)
    {
        std::vector<std::uint64_t>& bits = logs[n];
        bits.resize((slots.at(n).size / 4096 + 63) / 64, 0);
        return bits;
    }
    static int refuse(int error) noexcept
    {
        errno = error;
        return -1;
    }
};

} // namespace membacking::test
