/**
 * @file os/linux.hpp
 * Layer: os (includes base/ only). The whole body is Linux-only.
 *
 * LinuxSyscalls: the seam between the library and the Linux kernel. Every policy that makes a
 * system call takes a `Sys` template parameter defaulting to this struct and calls `Sys::mmap`,
 * `Sys::ioctl`, ... instead of the libc function. Tests pass a struct that derives from this one
 * and shadows a few members to inject ENOMEM, EINVAL or an exhausted slot table, without root and
 * without touching the real call sites.
 *
 * Conventions: each function behaves like the libc call it wraps (return value and errno).
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/result.hpp>

#    include <algorithm>
#    include <cerrno>
#    include <cstddef>
#    include <cstdint>
#    include <cstdio>
#    include <cstdlib>
#    include <cstring>
#    include <fcntl.h>
#    include <poll.h>
#    include <sys/ioctl.h>
#    include <sys/mman.h>
#    include <sys/prctl.h>
#    include <sys/socket.h>
#    include <sys/stat.h>
#    include <sys/syscall.h>
#    include <unistd.h>
#    include <utility>
#    include <vector>

namespace membacking::os {

struct LinuxSyscalls {
    static void* mmap(void* addr, std::size_t len, int prot, int flags, int fd,
                      off_t offset) noexcept
    {
        return ::mmap(addr, len, prot, flags, fd, offset);
    }
    static int munmap(void* addr, std::size_t len) noexcept { return ::munmap(addr, len); }
    static int mprotect(void* addr, std::size_t len, int prot) noexcept
    {
        return ::mprotect(addr, len, prot);
    }
    /// mincore(2): fails with ENOMEM where part of the range is not mapped at all.
    static int mincore(void* addr, std::size_t len, unsigned char* vec) noexcept
    {
        return ::mincore(addr, len, vec);
    }
    static int madvise(void* addr, std::size_t len, int advice) noexcept
    {
        return ::madvise(addr, len, advice);
    }
    /// mlock/munlock as raw system calls: sanitizer runtimes intercept the libc functions and
    /// make them no-ops, and pinning must really pin.
    static int mlock(const void* addr, std::size_t len) noexcept
    {
        return static_cast<int>(::syscall(SYS_mlock, addr, len));
    }
    static int munlock(const void* addr, std::size_t len) noexcept
    {
        return static_cast<int>(::syscall(SYS_munlock, addr, len));
    }
    /// The parts of [addr, addr + len) that are already mlock()ed (VmFlags "lo" in
    /// /proc/self/smaps), as [begin, end) address pairs in ascending order: memory the process
    /// locked itself, e.g. with mlockall(MCL_CURRENT | MCL_FUTURE). Empty when smaps cannot be
    /// read.
    static std::vector<std::pair<std::uintptr_t, std::uintptr_t>> locked_spans(const void* addr,
                                                                               std::size_t len)
    {
        std::vector<std::pair<std::uintptr_t, std::uintptr_t>> out;
        const auto lo = reinterpret_cast<std::uintptr_t>(addr);
        const std::uintptr_t hi = lo + len;
        std::FILE* f = std::fopen("/proc/self/smaps", "re");
        if (f == nullptr)
            return out;
        char* line = nullptr;
        std::size_t cap = 0;
        std::uintptr_t vma_lo = 0;
        std::uintptr_t vma_hi = 0;
        while (::getline(&line, &cap, f) >= 0) {
            unsigned long a = 0;
            unsigned long b = 0;
            char dash = 0;
            if (std::sscanf(line, "%lx%c%lx", &a, &dash, &b) == 3 && dash == '-') {
                vma_lo = a;
                vma_hi = b;
                continue;
            }
            if (std::strncmp(line, "VmFlags:", 8) != 0 || vma_hi <= lo || vma_lo >= hi)
                continue;
            if (std::strstr(line, " lo") == nullptr)
                continue;
            const std::uintptr_t b0 = std::max(vma_lo, lo);
            const std::uintptr_t e0 = std::min(vma_hi, hi);
            if (!out.empty() && out.back().second == b0)
                out.back().second = e0;
            else
                out.emplace_back(b0, e0);
        }
        std::free(line);
        (void)std::fclose(f);
        return out;
    }
    static int memfd_create(const char* name, unsigned flags) noexcept
    {
        return ::memfd_create(name, flags);
    }
    static int ftruncate(int fd, off_t len) noexcept { return ::ftruncate(fd, len); }
    static int fallocate(int fd, int mode, off_t offset, off_t len) noexcept
    {
        return ::fallocate(fd, mode, offset, len);
    }
    static int open(const char* path, int flags) noexcept { return ::open(path, flags); }
    static int close(int fd) noexcept { return ::close(fd); }
    /// fcntl(fd, F_DUPFD_CLOEXEC, 0): a new descriptor for the same open file, closed on exec.
    static int dup_cloexec(int fd) noexcept { return ::fcntl(fd, F_DUPFD_CLOEXEC, 0); }
    static int fstat(int fd, struct stat* st) noexcept { return ::fstat(fd, st); }
    /// fcntl(fd, F_GET_SEALS): the memfd seals of fd (-1 if it cannot have any).
    static int get_seals(int fd) noexcept { return ::fcntl(fd, F_GET_SEALS); }
    /// fcntl(fd, F_ADD_SEALS, seals).
    static int add_seals(int fd, int seals) noexcept { return ::fcntl(fd, F_ADD_SEALS, seals); }
    /// membarrier(2) (cmd: a MEMBARRIER_CMD_*), through syscall(): glibc has no wrapper. Dirty
    /// tracking's harvest barriers and their registrations (access/dirty_bitmap.hpp).
    static int membarrier(int cmd, unsigned flags) noexcept
    {
        return static_cast<int>(::syscall(SYS_membarrier, cmd, flags, 0));
    }
    /// mbind(2) through syscall(): glibc has no wrapper and libnuma is not a dependency.
    static long mbind(void* addr, unsigned long len, int mode, const unsigned long* nodemask,
                      unsigned long maxnode, unsigned flags) noexcept
    {
        return ::syscall(SYS_mbind, addr, len, mode, nodemask, maxnode, flags);
    }
    /// get_mempolicy(2) through syscall(), for the same reason.
    static long get_mempolicy(int* mode, unsigned long* nodemask, unsigned long maxnode, void* addr,
                              unsigned long flags) noexcept
    {
        return ::syscall(SYS_get_mempolicy, mode, nodemask, maxnode, addr, flags);
    }
    static int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
                     unsigned long a5) noexcept
    {
        return ::prctl(option, a2, a3, a4, a5);
    }
    static int ioctl(int fd, unsigned long request, void* arg) noexcept
    {
        return ::ioctl(fd, request, arg);
    }
    static int ioctl(int fd, unsigned long request, unsigned long arg) noexcept
    {
        return ::ioctl(fd, request, arg);
    }
    static long sysconf(int name) noexcept { return ::sysconf(name); }
    // The cross-process client's socket (ipc/): tests inject short sends, EAGAIN, forged
    // control messages and EOF here.
    static int socketpair(int domain, int type, int protocol, int fds[2]) noexcept
    {
        return ::socketpair(domain, type, protocol, fds);
    }
    static ssize_t sendmsg(int fd, const struct msghdr* msg, int flags) noexcept
    {
        return ::sendmsg(fd, msg, flags);
    }
    static ssize_t recvmsg(int fd, struct msghdr* msg, int flags) noexcept
    {
        return ::recvmsg(fd, msg, flags);
    }
    static int poll(struct pollfd* fds, nfds_t n, int timeout_ms) noexcept
    {
        return ::poll(fds, n, timeout_ms);
    }
    static int shutdown(int fd, int how) noexcept { return ::shutdown(fd, how); }
};

/// The Error for the errno left by the call that just failed. errno is read before `message()`
/// runs, because building the message may allocate and allocation may change errno.
template <class F>
[[nodiscard]] Error last_error(F&& message)
{
    const int err = errno;
    return os_error(err, message());
}

} // namespace membacking::os

#endif // MEMBACKING_OS_LINUX
