/**
 * InjectingSyscalls: the Linux syscall seam with failure injection. Derives from the real seam
 * and shadows the calls tests want to break: the n-th mmap (or munmap, mprotect, mbind, madvise,
 * memfd_create, ftruncate, F_ADD_SEALS, fallocate) from now fails with a chosen errno and does
 * nothing; membarrier plays a kernel that does not know some of its commands (EINVAL, as before
 * the Linux version that added them). A
 * failing MAP_FIXED mmap can also model kernels before 6.12, which may remove the old mapping
 * before failing (remove_before_failing), and another thread's allocation landing in that hole
 * (after_removal).
 *
 * State is static (the seam is a type, not an object); tests that use it run on one thread and
 * call reset() first.
 */
#pragma once

#include <membacking/os/linux.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <sys/mman.h>
#include <sys/stat.h>
#include <vector>

namespace membacking::test {

/// When one kind of call fails.
struct Plan {
    long countdown = -1; ///< calls to let through before failing; -1 = never fail
    int error = ENOMEM;
    std::size_t calls = 0; ///< calls seen since reset
    bool fired = false;

    bool next()
    {
        ++calls;
        if (countdown < 0)
            return false;
        if (countdown-- == 0) {
            fired = true;
            return true;
        }
        return false;
    }
};

struct InjectingSyscalls : os::LinuxSyscalls {
    static inline Plan mmap_plan;
    static inline Plan munmap_plan;
    static inline Plan mprotect_plan;
    static inline Plan mbind_plan;
    static inline Plan madvise_plan;
    static inline Plan memfd_plan;
    static inline Plan fallocate_plan;
    static inline Plan fstat_plan; ///< VaPolicy::object_size (and lease windows) ask fstat
    static inline Plan ftruncate_plan;
    static inline Plan seals_plan; ///< add_seals (F_ADD_SEALS)
    /// membarrier commands (MEMBARRIER_CMD_*) this kernel does not know: EINVAL, nothing done.
    static inline std::vector<int> unknown_membarrier_commands;
    /// The descriptor the last memfd_create returned (-1: none yet).
    static inline int last_memfd = -1;
    /// A failing MAP_FIXED mmap first unmaps its range, as kernels before 6.12 may.
    static inline bool remove_before_failing = false;
    /// Runs right after that removal (another thread's mmap into the hole, for instance).
    static inline void (*after_removal)(void* addr, std::size_t len) = nullptr;
    /// The last mmap that succeeded: where, and how long.
    static inline void* last_mmap_addr = nullptr;
    static inline std::size_t last_mmap_len = 0;
    /// While set, every mmap that would make exactly [refused_unmap_at, + refused_unmap_len)
    /// inaccessible (PROT_NONE: a VA policy's unmap, or its re-reservation of a hole) fails
    /// with ENOMEM: a host that will not take that piece of a mapper back, however often asked.
    static inline void* refused_unmap_at = nullptr;
    static inline std::size_t refused_unmap_len = 0;
    /// While set, every MAP_FIXED mmap to PROT_NONE fails with ENOMEM (no piece, nor the whole
    /// range, can be taken back).
    static inline bool refuse_every_unmap = false;

    static void reset()
    {
        mmap_plan = {};
        munmap_plan = {};
        mprotect_plan = {};
        mbind_plan = {};
        madvise_plan = {};
        memfd_plan = {};
        fallocate_plan = {};
        fstat_plan = {};
        ftruncate_plan = {};
        seals_plan = {};
        unknown_membarrier_commands.clear();
        last_memfd = -1;
        remove_before_failing = false;
        after_removal = nullptr;
        last_mmap_addr = nullptr;
        last_mmap_len = 0;
        refused_unmap_at = nullptr;
        refused_unmap_len = 0;
        refuse_every_unmap = false;
    }
    /// The n-th mmap from now (1 = the next) fails with err.
    static void fail_mmap(long n, int err = ENOMEM) { mmap_plan = Plan{n - 1, err}; }

    static void* mmap(void* addr, std::size_t len, int prot, int flags, int fd, off_t off) noexcept
    {
        if (prot == PROT_NONE && (flags & MAP_FIXED) != 0 &&
            (refuse_every_unmap || (addr == refused_unmap_at && len == refused_unmap_len))) {
            errno = ENOMEM;
            return MAP_FAILED;
        }
        if (mmap_plan.next()) {
            if (remove_before_failing && (flags & MAP_FIXED) != 0) {
                ::munmap(addr, len);
                if (after_removal != nullptr)
                    after_removal(addr, len);
            }
            errno = mmap_plan.error;
            return MAP_FAILED;
        }
        void* p = os::LinuxSyscalls::mmap(addr, len, prot, flags, fd, off);
        if (p != MAP_FAILED) {
            last_mmap_addr = p;
            last_mmap_len = len;
        }
        return p;
    }
    /// The n-th munmap from now (1 = the next) fails with err.
    static void fail_munmap(long n, int err = ENOMEM) { munmap_plan = Plan{n - 1, err}; }
    static int munmap(void* addr, std::size_t len) noexcept
    {
        if (munmap_plan.next()) {
            errno = munmap_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::munmap(addr, len);
    }
    /// The n-th mprotect from now (1 = the next) fails with err.
    static void fail_mprotect(long n, int err = ENOMEM) { mprotect_plan = Plan{n - 1, err}; }
    static int mprotect(void* addr, std::size_t len, int prot) noexcept
    {
        if (mprotect_plan.next()) {
            errno = mprotect_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::mprotect(addr, len, prot);
    }
    static long mbind(void* addr, unsigned long len, int mode, const unsigned long* mask,
                      unsigned long maxnode, unsigned flags) noexcept
    {
        if (mbind_plan.next()) {
            errno = mbind_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::mbind(addr, len, mode, mask, maxnode, flags);
    }
    static int madvise(void* addr, std::size_t len, int advice) noexcept
    {
        if (madvise_plan.next()) {
            errno = madvise_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::madvise(addr, len, advice);
    }
    static int fallocate(int fd, int mode, off_t offset, off_t len) noexcept
    {
        if (fallocate_plan.next()) {
            errno = fallocate_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::fallocate(fd, mode, offset, len);
    }
    static int fstat(int fd, struct stat* st) noexcept
    {
        if (fstat_plan.next()) {
            errno = fstat_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::fstat(fd, st);
    }
    static int memfd_create(const char* name, unsigned flags) noexcept
    {
        if (memfd_plan.next()) {
            errno = memfd_plan.error;
            return -1;
        }
        last_memfd = os::LinuxSyscalls::memfd_create(name, flags);
        return last_memfd;
    }
    static int ftruncate(int fd, off_t len) noexcept
    {
        if (ftruncate_plan.next()) {
            errno = ftruncate_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::ftruncate(fd, len);
    }
    static int add_seals(int fd, int seals) noexcept
    {
        if (seals_plan.next()) {
            errno = seals_plan.error;
            return -1;
        }
        return os::LinuxSyscalls::add_seals(fd, seals);
    }
    static int membarrier(int cmd, unsigned flags) noexcept
    {
        if (std::find(unknown_membarrier_commands.begin(), unknown_membarrier_commands.end(),
                      cmd) != unknown_membarrier_commands.end()) {
            errno = EINVAL;
            return -1;
        }
        return os::LinuxSyscalls::membarrier(cmd, flags);
    }
};

} // namespace membacking::test
