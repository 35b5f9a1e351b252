/**
 * @file va/linux_mmap.hpp
 * Layer: va (includes base/, os/linux.hpp, va/). The whole body is Linux-only.
 *
 * LinuxMmap<Sys>: the Linux VaPolicy (reference: sparse_mmap's unix.rs).
 *
 * - reserve: one PROT_NONE anonymous mapping, over-allocated and trimmed so that its base is
 *   aligned: to the page if the size is below 2 MiB, to 2 MiB below 1 GiB, to 1 GiB above, and
 *   never less than the caller's minimum (the largest hugetlb page size in use). The reservation
 *   is rounded up to that alignment so a huge page at the end still fits, but size() reports the
 *   size that was asked for: an access past it is out of range, not a fault (the reference
 *   reports the rounded size).
 * - map_file / commit_private: mmap(MAP_FIXED) over the reservation. The kernel replaces the old
 *   pages atomically: a concurrent access sees the old or the new memory, never a hole.
 * - unmap: mmap(PROT_NONE, MAP_FIXED) again, never munmap inside the reservation, so the range
 *   can never be handed to another allocation.
 * - a failed MAP_FIXED: kernels before 6.12 may remove the old mapping before the new one fails
 *   (ENOMEM from the memory cgroup, a hugetlb pool that runs dry...). Another thread's
 *   mmap(NULL) could then land in the hole, and a later MAP_FIXED of ours (the caller's rollback)
 *   would silently replace that allocation. So after any failed fixed mapping the hole, if any,
 *   is reserved again at once (MAP_FIXED_NOREPLACE, which never replaces what is there: an
 *   allocation that got in first is left alone). What remains is the window between the kernel's
 *   removal and our re-reservation, a few system calls long; kernels from 6.12 have none.
 * - hints: madvise(MADV_HUGEPAGE), mbind(MPOL_BIND) and PR_SET_VMA_ANON_NAME.
 * - objects: memfd_create(MFD_CLOEXEC) + ftruncate; hugetlb memfds with a chosen page size, whose
 *   pages are reserved at creation (fallocate) so a short pool fails now, not at first touch.
 *
 * Every system call goes through Sys (os/linux.hpp), which tests replace to inject failures.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/align.hpp>
#    include <membacking/base/fatal.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/base/units.hpp>
#    include <membacking/os/linux.hpp>
#    include <membacking/va/detail/va_arguments.hpp>
#    include <membacking/va/mappable.hpp>
#    include <membacking/va/va_policy.hpp>

#    include <algorithm>
#    include <bit>
#    include <cerrno>
#    include <cstddef>
#    include <cstdint>
#    include <linux/mempolicy.h>
#    include <string>
#    include <sys/mman.h>
#    include <utility>
#    include <vector>

namespace membacking {

template <class Sys = os::LinuxSyscalls>
class LinuxMmap {
public:
    /// The system-call seam (the dirty bitmap of a manager over this policy uses it too).
    using Syscalls = Sys;

    static constexpr VaFeatures features =
        VaFeatures::atomic_replace | VaFeatures::hugepages | VaFeatures::numa | VaFeatures::names;

    static constexpr std::uint64_t two_mib = std::uint64_t{2} << 20;
    static constexpr std::uint64_t one_gib = std::uint64_t{1} << 30;

    /// The base alignment for a reservation of `size` bytes (reference: reservation_alignment).
    [[nodiscard]] static constexpr std::uint64_t default_alignment(std::uint64_t size) noexcept
    {
        return size < two_mib ? page_size : size < one_gib ? two_mib : one_gib;
    }

    /// Reserves `size` bytes (rounded up to a page), aligned as described above.
    [[nodiscard]] static Result<LinuxMmap> reserve(std::uint64_t size, std::uint64_t min_alignment)
    {
        if (size == 0)
            return make_error(errc::invalid_argument,
                              "cannot reserve an empty guest address space");
        if (!is_power_of_two(min_alignment))
            return make_error(errc::invalid_argument, "reservation alignment " +
                                                          MemoryRange::hex(min_alignment) +
                                                          " is not a power of two");
        const std::uint64_t align =
            std::max({default_alignment(size), min_alignment, std::uint64_t{page_size}});
        const auto usable = checked_align_up(size, page_size);
        const auto reserved = usable ? checked_align_up(*usable, align) : std::nullopt;
        const auto alloc = reserved ? checked_add(*reserved, align - page_size) : std::nullopt;
        if (!alloc)
            return make_error(errc::invalid_argument,
                              "guest address space of " + MemoryRange::hex(size) +
                                  " bytes overflows with alignment " + MemoryRange::hex(align));
        void* p = Sys::mmap(nullptr, *alloc, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                            -1, 0);
        if (p == MAP_FAILED)
            return os::last_error([&] {
                return std::string("failed to reserve " + MemoryRange::hex(*alloc) +
                                   " bytes of address space for guest memory");
            });
        // Trim the over-allocation so the base is aligned. Trimming splits the mapping, which
        // can fail (ENOMEM at vm.max_map_count): then the whole allocation goes back, which
        // splits nothing, rather than leaking up to `align` bytes of address space per call.
        const auto raw = reinterpret_cast<std::uintptr_t>(p);
        const std::uintptr_t aligned =
            (raw + (align - 1)) & ~static_cast<std::uintptr_t>(align - 1);
        const std::uintptr_t end = aligned + *reserved;
        const bool trimmed =
            (aligned == raw || Sys::munmap(p, aligned - raw) == 0) &&
            (raw + *alloc == end ||
             Sys::munmap(reinterpret_cast<void*>(end), // NOLINT(performance-no-int-to-ptr)
                         raw + *alloc - end) == 0);
        if (!trimmed) {
            auto error = os::last_error([&] {
                return "failed to trim the reservation of " + MemoryRange::hex(*alloc) +
                       " bytes to its alignment " + MemoryRange::hex(align);
            });
            (void)Sys::munmap(p, *alloc); // pages already trimmed are simply unmapped again
            return error;
        }
        // NOLINTNEXTLINE(performance-no-int-to-ptr): aligning an address is integer arithmetic
        LinuxMmap v(reinterpret_cast<std::byte*>(aligned), *usable, *reserved);
        (void)v.set_name(0, *reserved, "guest-memory"); // cosmetic; kernels without it refuse
        return v;
    }

    LinuxMmap(LinuxMmap&& other) noexcept
        : base_(std::exchange(other.base_, nullptr)), size_(std::exchange(other.size_, 0)),
          reserved_(std::exchange(other.reserved_, 0))
    {}
    LinuxMmap& operator=(LinuxMmap&& other) noexcept
    {
        if (this != &other) {
            release();
            base_ = std::exchange(other.base_, nullptr);
            size_ = std::exchange(other.size_, 0);
            reserved_ = std::exchange(other.reserved_, 0);
        }
        return *this;
    }
    LinuxMmap(const LinuxMmap&) = delete;
    LinuxMmap& operator=(const LinuxMmap&) = delete;
    ~LinuxMmap() { release(); }

    [[nodiscard]] std::byte* base() const noexcept { return base_; }
    /// The usable size: what reserve() was asked for, rounded up to a page.
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    /// The reserved size (rounded up to the base alignment).
    [[nodiscard]] std::uint64_t reserved_size() const noexcept { return reserved_; }

    Result<void> map_file(std::uint64_t off, std::uint64_t len, const Mappable& object,
                          std::uint64_t file_offset, bool writable)
    {
        MEMBACKING_TRY(detail::check_map_file(off, len, object, file_offset, reserved_));
        if (file_offset > static_cast<std::uint64_t>(INT64_MAX) - len)
            return make_error(errc::invalid_argument,
                              "file offset " + MemoryRange::hex(file_offset) + " for " +
                                  describe(off, len) + " is beyond the largest file offset (2^63)");
        const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
        return fixed_mmap(
            off, len, prot, MAP_SHARED, object.native_handle(), static_cast<off_t>(file_offset),
            [&] { return "failed to map file offset " + MemoryRange::hex(file_offset) + " at"; });
    }

    /// Zero-filled private anonymous memory, read-write.
    Result<void> commit_private(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        return fixed_mmap(off, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
                          [] { return std::string("failed to commit private memory at"); });
    }

    /// Back to reserved and inaccessible; the backing pages are released.
    Result<void> unmap(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        return fixed_mmap(off, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0,
                          [] { return std::string("failed to unmap"); });
    }

    /// Inaccessible in place (mprotect PROT_NONE), what stays mapped kept: the mapping manager's
    /// fallback when unmap() is refused while quarantining a mapper. Over the whole reservation
    /// it changes whole VMAs only and so needs no new one (unlike a split at vm.max_map_count).
    Result<void> make_inaccessible(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        if (Sys::mprotect(base_ + off, len, PROT_NONE) != 0)
            return os::last_error([&] {
                return std::string("failed to make " + describe(off, len) + " inaccessible");
            });
        return {};
    }

    Result<void> protect(std::uint64_t off, std::uint64_t len, bool writable)
    {
        MEMBACKING_TRY(check(off, len));
        if (Sys::mprotect(base_ + off, len, PROT_READ | (writable ? PROT_WRITE : 0)) != 0)
            return os::last_error([&] {
                return std::string("failed to change protection of " + describe(off, len));
            });
        return {};
    }

    Result<void> advise_hugepages(std::uint64_t off, std::uint64_t len)
    {
        MEMBACKING_TRY(check(off, len));
        if (Sys::madvise(base_ + off, len, MADV_HUGEPAGE) != 0)
            return os::last_error([&] {
                return std::string("madvise(MADV_HUGEPAGE) failed for " + describe(off, len));
            });
        return {};
    }

    /// Faults the host pages of [off, off + len) in ahead of use: madvise(MADV_POPULATE_WRITE)
    /// for a writable mapping, MADV_POPULATE_READ for a read-only one (Linux 5.14+; older
    /// kernels answer EINVAL and the pages fault in on first touch).
    Result<void> populate(std::uint64_t off, std::uint64_t len, bool writable)
    {
        MEMBACKING_TRY(check(off, len));
        constexpr int populate_read = 22;  // MADV_POPULATE_READ (newer than some headers)
        constexpr int populate_write = 23; // MADV_POPULATE_WRITE
        if (Sys::madvise(base_ + off, len, writable ? populate_write : populate_read) != 0)
            return os::last_error([&] {
                return std::string("madvise(MADV_POPULATE_") + (writable ? "WRITE" : "READ") +
                       ") failed for " + describe(off, len);
            });
        return {};
    }

    /// mbind(MPOL_BIND) to one host node. Nodes above 1023 are refused (the reference's cap of
    /// 0xffff would need a 8 KiB mask for no machine that exists).
    Result<void> bind_numa(std::uint64_t off, std::uint64_t len, std::uint32_t node)
    {
        MEMBACKING_TRY(check(off, len));
        constexpr std::uint32_t max_node = 1023;
        if (node > max_node)
            return make_error(errc::invalid_argument,
                              "NUMA node " + std::to_string(node) + " is out of range");
        constexpr unsigned bits = sizeof(unsigned long) * 8;
        std::vector<unsigned long> mask(node / bits + 1, 0);
        mask[node / bits] = 1UL << (node % bits);
        // maxnode is one more than the highest bit the kernel reads (an off-by-one of mbind(2)).
        if (Sys::mbind(base_ + off, len, MPOL_BIND, mask.data(), node + 2UL, 0) != 0)
            return os::last_error([&] {
                return std::string("failed to bind " + describe(off, len) + " to NUMA node " +
                                   std::to_string(node));
            });
        return {};
    }

    /// Names anonymous memory in /proc/self/maps ("[anon:name]"); file mappings keep the
    /// object's name, and the kernel refuses them.
    Result<void> set_name(std::uint64_t off, std::uint64_t len, const char* name)
    {
        MEMBACKING_TRY(check(off, len));
        constexpr int pr_set_vma = 0x53564d41; // PR_SET_VMA, absent from older headers
        constexpr unsigned long pr_set_vma_anon_name = 0;
        if (Sys::prctl(pr_set_vma, pr_set_vma_anon_name,
                       reinterpret_cast<unsigned long>(base_ + off), len,
                       reinterpret_cast<unsigned long>(name)) != 0)
            return os::last_error(
                [&] { return std::string("failed to name " + describe(off, len)); });
        return {};
    }

    /// A memfd of `size` bytes.
    [[nodiscard]] static Result<Mappable> create_shared_memory(std::uint64_t size, const char* name)
    {
        const int fd = Sys::memfd_create(name, MFD_CLOEXEC);
        if (fd < 0)
            return os::last_error(
                [&] { return std::string("memfd_create(\"") + name + "\") failed"; });
        Mappable object = Mappable::adopt(fd);
        if (size > static_cast<std::uint64_t>(INT64_MAX))
            return os_error(EFBIG, "shared memory size " + MemoryRange::hex(size) + " too large");
        if (Sys::ftruncate(fd, static_cast<off_t>(size)) != 0)
            return os::last_error([&] {
                return "failed to size shared memory '" + std::string(name) + "' to " +
                       MemoryRange::hex(size) + " bytes";
            });
        return object;
    }

    /// A hugetlb memfd of `size` bytes with pages of `page_bytes`, its pages reserved now.
    [[nodiscard]] static Result<Mappable>
    create_hugetlb_memory(std::uint64_t size, const char* name, std::uint64_t page_bytes)
    {
        if (!is_power_of_two(page_bytes) || page_bytes < page_size)
            return make_error(errc::invalid_argument,
                              "hugepage size " + MemoryRange::hex(page_bytes) +
                                  " must be a power of two and at least the page size");
        constexpr unsigned huge_shift = 26; // MFD_HUGE_SHIFT
        const auto log2 = static_cast<unsigned>(std::countr_zero(page_bytes));
        const int fd = Sys::memfd_create(name, MFD_CLOEXEC | MFD_HUGETLB | (log2 << huge_shift));
        if (fd < 0)
            return os::last_error(
                [&] { return std::string("memfd_create(\"") + name + "\", MFD_HUGETLB) failed"; });
        Mappable object = Mappable::adopt(fd);
        if (size > static_cast<std::uint64_t>(INT64_MAX))
            return os_error(EFBIG, "hugetlb memory size " + MemoryRange::hex(size) + " too large");
        if (Sys::ftruncate(fd, static_cast<off_t>(size)) != 0)
            return os::last_error([&] {
                return std::string("failed to size hugetlb memory '" + std::string(name) + "'");
            });
        if (Sys::fallocate(fd, 0, 0, static_cast<off_t>(size)) != 0)
            return os::last_error([&] {
                return std::string("failed to reserve hugetlb pages for '" + std::string(name) +
                                   "'");
            });
        return object;
    }

    /// The object's size now (fstat's st_size): what a mapping of it may reach.
    [[nodiscard]] static Result<std::uint64_t> object_size(const Mappable& object)
    {
        if (object.empty())
            return make_error(errc::invalid_argument, "no object to take the size of");
        struct stat st {};
        if (Sys::fstat(object.native_handle(), &st) != 0)
            return os::last_error([] { return std::string("fstat of a mapped object failed"); });
        return static_cast<std::uint64_t>(st.st_size);
    }

    /// A lease window (lease/lease_window.hpp): where it is, how big, whether writable.
    struct LeaseWindowMapping {
        std::byte* base;
        std::uint64_t size;
        bool writable;
    };

    /// Maps the whole object once, MAP_SHARED, anywhere in this process, for leases: its size
    /// (fstat), but at least min_size bytes, rounded up to a page. Read-write, or read-only if
    /// the handle does not allow writing (a file opened O_RDONLY).
    [[nodiscard]] static Result<LeaseWindowMapping> map_lease_window(const Mappable& object,
                                                                     std::uint64_t min_size)
    {
        struct stat st {};
        if (Sys::fstat(object.native_handle(), &st) != 0)
            return os::last_error([] { return std::string("fstat of a leasable object failed"); });
        const auto size =
            checked_align_up(std::max(static_cast<std::uint64_t>(st.st_size), min_size), page_size);
        if (!size || *size == 0 || *size > static_cast<std::uint64_t>(INT64_MAX))
            return make_error(errc::invalid_argument, "cannot map a lease window of " +
                                                          MemoryRange::hex(min_size) + " bytes");
        for (const int prot : {PROT_READ | PROT_WRITE, PROT_READ}) {
            void* p = Sys::mmap(nullptr, *size, prot, MAP_SHARED, object.native_handle(), 0);
            if (p != MAP_FAILED)
                return LeaseWindowMapping{static_cast<std::byte*>(p), *size,
                                          (prot & PROT_WRITE) != 0};
            if (errno != EACCES) // EACCES: the handle is read-only; try again without writing
                break;
        }
        return os::last_error([&] {
            return "failed to map a lease window of " + MemoryRange::hex(*size) + " bytes";
        });
    }

    /// Unmaps a window map_lease_window made. It cannot fail for a whole mapping; were it to,
    /// the address space would stay reserved, which is harmless.
    static void unmap_lease_window(std::byte* base, std::uint64_t size) noexcept
    {
        Sys::munmap(base, size);
    }

private:
    LinuxMmap(std::byte* base, std::uint64_t size, std::uint64_t reserved) noexcept
        : base_(base), size_(size), reserved_(reserved)
    {}

    void release() noexcept
    {
        if (base_ != nullptr)
            Sys::munmap(base_, reserved_);
        base_ = nullptr;
    }

    static std::string describe(std::uint64_t off, std::uint64_t len)
    {
        return detail::describe_va_range(off, len);
    }

    /// Page aligned, non-empty, and inside the reservation (a mapping may fill the tail that
    /// alignment added beyond size()).
    Result<void> check(std::uint64_t off, std::uint64_t len) const
    {
        return detail::check_va_range(off, len, reserved_);
    }

    /// mmap(MAP_FIXED) at base + off; `what` builds the error message, only on failure.
    template <class What>
    Result<void> fixed_mmap(std::uint64_t off, std::uint64_t len, int prot, int flags, int fd,
                            off_t file_offset, What&& what)
    {
        void* want = base_ + off;
        void* got = Sys::mmap(want, len, prot, flags | MAP_FIXED, fd, file_offset);
        if (got == MAP_FAILED) {
            const int err = errno;
            rereserve_holes(static_cast<std::byte*>(want), len);
            return os_error(err, what() + " " + describe(off, len));
        }
        MEMBACKING_CHECK(got == want, "mmap(MAP_FIXED) returned another address");
        return {};
    }

    /// Reserves again whatever part of [at, at + len) a failed MAP_FIXED left unmapped (see the
    /// file comment), without touching what is mapped there. Best effort: it runs on an error
    /// path that already reports the original failure.
    void rereserve_holes(std::byte* at, std::uint64_t len) noexcept
    {
        // The common cases: the failure removed nothing (one mincore per chunk says "all
        // mapped"), or removed the whole range (one mmap fills it).
        if (reserve_hole(at, len))
            return;
        constexpr std::uint64_t chunk_pages = 1024;
        unsigned char residency[chunk_pages];
        for (std::uint64_t done = 0; done < len;) {
            const std::uint64_t chunk = std::min(len - done, chunk_pages * page_size);
            if (Sys::mincore(at + done, chunk, residency) != 0 && errno == ENOMEM) {
                // Part of this chunk is a hole, part is something that got in first.
                for (std::uint64_t p = done; p < done + chunk; p += page_size)
                    if (Sys::mincore(at + p, page_size, residency) != 0 && errno == ENOMEM)
                        (void)reserve_hole(at + p, page_size);
            }
            done += chunk;
        }
    }

    /// PROT_NONE over [at, at + len) if nothing at all is mapped there; false otherwise.
    static bool reserve_hole(std::byte* at, std::uint64_t len) noexcept
    {
        void* got =
            Sys::mmap(at, len, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (got == MAP_FAILED)
            return false;
        if (got != at) { // a kernel before 4.17 took the flag for a hint
            Sys::munmap(got, len);
            return false;
        }
        return true;
    }

    std::byte* base_ = nullptr;
    std::uint64_t size_ = 0;
    std::uint64_t reserved_ = 0;
};

static_assert(VaPolicy<LinuxMmap<>>);

/// A memfd of `size` bytes, named `name` in /proc/<pid>/fd: the shared memory a device maps into
/// a device region (DeviceRegion::map), or loads an image into before mapping it. Zero-filled;
/// write it through its native_handle() (pwrite), or map it and write through the guest.
[[nodiscard]] inline Result<Mappable> create_memfd(const std::string& name, Length size)
{
    return LinuxMmap<>::create_shared_memory(size.value(), name.c_str());
}

} // namespace membacking

#endif // MEMBACKING_OS_LINUX
