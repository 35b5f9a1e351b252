/**
 * @file partition/kvm.hpp
 * Layer: partition (includes base/, detail/, os/linux.hpp, partition/partition_mapper.hpp). The
 * whole body is Linux-only.
 *
 * KvmPartition<Sys>: the KVM partition policy. It is given a VM file descriptor, which it
 * duplicates (F_DUPFD_CLOEXEC) and owns: the VMM may close its own descriptor, or see its number
 * reused, while the partition lives, and the partition's ioctls still reach the same VM. The
 * duplicate is closed by the destructor. It maps each window the manager gives it as one memslot
 * pointing at the VA mapper's range.
 *
 * - Memslots: KVM_SET_USER_MEMORY_REGION2 where the kernel has it (KVM_CAP_USER_MEMORY2), else
 *   KVM_SET_USER_MEMORY_REGION. Slot numbers come from a free list and are reused; the limit is
 *   KVM_CAP_NR_MEMSLOTS, and running out is errc::resource_exhausted, not an abort. Deleting a
 *   slot is setting its size to 0.
 * - Permissions: a read-only window is a KVM_MEM_READONLY slot (guest writes exit to the VMM as
 *   MMIO). KVM cannot express "not executable": the executable flag is accepted and ignored.
 * - Unmapping part of a slot is an error (errc::invalid_range), not an abort: KVM cannot shrink a
 *   slot. Several whole slots can be unmapped at once, all or nothing.
 * - Prefetch: KVM_PRE_FAULT_MEMORY (Linux 6.10+), which is a vCPU ioctl, so it needs a vCPU
 *   (set_prefetch_vcpu, which duplicates and owns the vCPU descriptor too). Where the kernel lacks
 * it (KVM_CAP_PRE_FAULT_MEMORY is 0, e.g. without TDP) or no vCPU is set, prefetch is
 * errc::unsupported. OpenVMM does nothing here.
 * - Pin: KVM itself never pins guest memory; devices that DMA pin through VFIO. Here "pinned"
 *   means resident: pin_range mlock()s the host range behind the slot, so it cannot be swapped
 *   out or reclaimed (it can still be migrated by compaction). When the kernel refuses (a hole
 *   in the range, RLIMIT_MEMLOCK) the error is returned and whatever part it had already locked
 *   is unlocked again. The lock belongs to the host mappings present at pin time: a mapping
 *   later replaced inside a pinned window (a new object placed into an active region) is a new
 *   host mapping and is not locked; unpin and pin the window again to cover it. Memory the
 *   process had locked itself before the pin (mlockall(MCL_CURRENT | MCL_FUTURE), the usual
 *   setting for realtime guests, or its own mlock), as /proc/self/smaps shows it, stays locked
 *   on unpin: only the parts the pin locked are unlocked.
 * - Dirty logging: a partition-wide mode: every slot, present and future, gets
 *   KVM_MEM_LOG_DIRTY_PAGES (one bit per 4 KiB page). take_dirty_log takes the bits of a part
 *   of one window (or the whole window) and resets them. Two kernel modes:
 *   - manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, Linux 5.8+; enabled by create() with
 *     KVM_ENABLE_CAP where the kernel has it): KVM_GET_DIRTY_LOG only reads the slot's bitmap,
 *     and KVM_CLEAR_DIRTY_LOG clears (and write-protects again) exactly the pages taken, in
 *     chunks of at most clear_chunk_pages() pages (64-page aligned, as KVM demands), so that a
 *     migration can harvest a big guest piece by piece, holding KVM's MMU lock for one chunk at
 *     a time. The bits of the slot outside the part stay in KVM's bitmap. Without
 *     KVM_DIRTY_LOG_INITIALLY_SET: a take reports the pages written since logging started,
 *     not every page (a diff snapshot needs that; a migration copies everything first anyway).
 *   - clear-on-read (older kernels): KVM_GET_DIRTY_LOG reads and clears the whole slot; the
 *     bits outside the part go to the pending log below, so they are reported by a later take.
 *   KVM keeps the bitmap in the slot, so deleting a slot would lose it: before a logged slot is
 *   deleted its bitmap is read into a pending log (by GPA), which the next take_dirty_log over
 *   those pages merges and clears. Only guest writes are logged; the VMM's own writes through
 *   GuestMemory are not.
 *
 * Every ioctl goes through Sys (os/linux.hpp), so tests can lower the slot limit or fail the
 * n-th memslot update. Every call leaves the partition as it was when it fails, except when the
 * kernel refuses the very update that would put it back (its resource keeps failing): then the
 * call fails with errc::quarantined, naming both failures, and the partition's books follow the
 * kernel (issue 10, defect 7: never fatal() for a host failure):
 * - unmap_range of several slots: a deleted slot the kernel will not re-add stays deleted (gone
 *   from slots(), its dirty bits kept in the pending log);
 * - set_dirty_logging: a slot whose flags the kernel will not restore keeps the new ones; the
 *   dirty log is then out of service for good (set_dirty_logging and take_dirty_log fail with
 *   errc::quarantined, naming the cause), since a slot may no longer log what the others do.
 * The manager marks such a partition failed (manager/detail/partition_set.hpp). Thread-safe.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/align.hpp>
#    include <membacking/base/fatal.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/detail/interval_map.hpp>
#    include <membacking/os/linux.hpp>
#    include <membacking/partition/partition_mapper.hpp>

#    include <algorithm>
#    include <bit>
#    include <cerrno>
#    include <cstdint>
#    include <linux/kvm.h>
#    include <memory>
#    include <mutex>
#    include <optional>
#    include <string>
#    include <string_view>
#    include <utility>
#    include <vector>

namespace membacking {

namespace detail::kvm_abi {
// Newer than Debian 12's <linux/kvm.h> (6.1); the layouts are the kernel's uapi ABI.
inline constexpr int cap_user_memory2 = 231;              // KVM_CAP_USER_MEMORY2
inline constexpr int cap_pre_fault_memory = 236;          // KVM_CAP_PRE_FAULT_MEMORY
inline constexpr std::uint64_t manual_protect_enable = 1; // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

struct UserspaceMemoryRegion2 { // struct kvm_userspace_memory_region2
    std::uint32_t slot;
    std::uint32_t flags;
    std::uint64_t guest_phys_addr;
    std::uint64_t memory_size;
    std::uint64_t userspace_addr;
    std::uint64_t guest_memfd_offset;
    std::uint32_t guest_memfd;
    std::uint32_t pad1;
    std::uint64_t pad2[14];
};
static_assert(sizeof(UserspaceMemoryRegion2) == 160);

struct PreFaultMemory { // struct kvm_pre_fault_memory
    std::uint64_t gpa;
    std::uint64_t size;
    std::uint64_t flags;
    std::uint64_t padding[5];
};
static_assert(sizeof(PreFaultMemory) == 64);

inline constexpr unsigned long set_user_memory_region2 =
    _IOW(KVMIO, 0x49, UserspaceMemoryRegion2); // KVM_SET_USER_MEMORY_REGION2
inline constexpr unsigned long pre_fault_memory =
    _IOWR(KVMIO, 0xd5, PreFaultMemory); // KVM_PRE_FAULT_MEMORY
} // namespace detail::kvm_abi

template <class Sys = os::LinuxSyscalls>
class KvmPartition {
public:
    static constexpr std::string_view name = "kvm";
    static constexpr PartitionFeatures features =
        PartitionFeatures::prefetch | PartitionFeatures::pin | PartitionFeatures::dirty_log |
        PartitionFeatures::quiesce_aware;

    /// What the kernel offers this VM.
    struct Capabilities {
        std::uint32_t max_slots = 0;
        bool user_memory2 = false;
        bool readonly_memory = false;
        bool pre_fault_memory = false;
        /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, enabled on the VM: dirty bits are cleared by
        /// KVM_CLEAR_DIRTY_LOG, a part at a time, not by KVM_GET_DIRTY_LOG.
        bool manual_dirty_log_protect = false;
    };

    /// One memslot, as the partition sees it.
    struct SlotInfo {
        std::uint32_t slot = 0;
        std::uint64_t gpa = 0;
        std::uint64_t size = 0;
        const void* host_va = nullptr;
        bool readonly = false;
        bool pinned = false;
        friend bool operator==(const SlotInfo&, const SlotInfo&) noexcept = default;
    };

    /// A partition over the VM `vm_fd`. The partition works on its own duplicate of it, so the
    /// caller may close `vm_fd` at any time.
    [[nodiscard]] static Result<std::shared_ptr<KvmPartition>> create(int vm_fd)
    {
        if (vm_fd < 0)
            return make_error(errc::invalid_argument, "no KVM VM file descriptor");
        const int own = Sys::dup_cloexec(vm_fd);
        if (own < 0)
            return os::last_error([&] {
                return "duplicating the KVM VM file descriptor " + std::to_string(vm_fd) +
                       " failed";
            });
        OwnedFd owned(own);
        auto caps = query_capabilities(own);
        if (!caps)
            return std::move(caps).error();
        return std::shared_ptr<KvmPartition>(new KvmPartition(std::move(owned), *caps));
    }

    KvmPartition(const KvmPartition&) = delete;
    KvmPartition& operator=(const KvmPartition&) = delete;
    KvmPartition(KvmPartition&&) = delete;
    KvmPartition& operator=(KvmPartition&&) = delete;
    ~KvmPartition() = default;

private:
    /// A descriptor the partition owns: closed when it goes (or is replaced).
    class OwnedFd {
    public:
        OwnedFd() = default;
        explicit OwnedFd(int fd) noexcept : fd_(fd) {}
        OwnedFd(OwnedFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
        OwnedFd& operator=(OwnedFd&& o) noexcept
        {
            if (this != &o) {
                reset();
                fd_ = std::exchange(o.fd_, -1);
            }
            return *this;
        }
        OwnedFd(const OwnedFd&) = delete;
        OwnedFd& operator=(const OwnedFd&) = delete;
        ~OwnedFd() { reset(); }
        [[nodiscard]] int get() const noexcept { return fd_; }
        [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }

    private:
        void reset() noexcept
        {
            if (fd_ >= 0)
                Sys::close(fd_);
            fd_ = -1;
        }
        int fd_ = -1;
    };

    static Result<Capabilities> query_capabilities(int vm_fd)
    {
        Capabilities caps;
        const int slots = Sys::ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
        if (slots < 0)
            return os::last_error([] { return std::string("KVM_CHECK_EXTENSION failed"); });
        if (slots == 0)
            return make_error(errc::unsupported, "KVM reports no memory slots");
        caps.max_slots = static_cast<std::uint32_t>(slots);
        caps.user_memory2 =
            Sys::ioctl(vm_fd, KVM_CHECK_EXTENSION, detail::kvm_abi::cap_user_memory2) > 0;
        caps.readonly_memory = Sys::ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_READONLY_MEM) > 0;
        caps.pre_fault_memory =
            Sys::ioctl(vm_fd, KVM_CHECK_EXTENSION, detail::kvm_abi::cap_pre_fault_memory) > 0;
        // Manual protect is a VM-wide mode; no slot logs yet (the partition logs only once it is
        // asked to). A kernel that lists the cap but refuses it keeps clear-on-read, which is as
        // exact, only not chunked.
        if ((static_cast<unsigned>(
                 Sys::ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) &
             detail::kvm_abi::manual_protect_enable) != 0) {
            kvm_enable_cap cap{};
            cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
            cap.args[0] = detail::kvm_abi::manual_protect_enable;
            caps.manual_dirty_log_protect = Sys::ioctl(vm_fd, KVM_ENABLE_CAP, &cap) == 0;
        }
        return caps;
    }

public:
    Result<void> map_range(void* host_va, std::uint64_t gpa, std::uint64_t size, bool writable,
                           bool /*executable: KVM has no such permission*/)
    {
        std::lock_guard lock(mutex_);
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        if (!range || range->empty() || !is_page_aligned(reinterpret_cast<std::uintptr_t>(host_va)))
            return make_error(errc::invalid_range,
                              "KVM: invalid window of " + MemoryRange::hex(size) + " bytes at " +
                                  MemoryRange::hex(gpa) + " (page aligned, non-empty)");
        if (const SlotInfo* other = slots_.first_overlap(*range))
            return make_error(errc::overlap, "KVM: window " + range->to_string() +
                                                 " overlaps memslot " +
                                                 std::to_string(other->slot) + " (" +
                                                 span_of(*other).to_string() + ")");
        if (!writable && !caps_.readonly_memory)
            return make_error(errc::unsupported,
                              "KVM: read-only window " + range->to_string() +
                                  " needs KVM_CAP_READONLY_MEM, which this kernel lacks");
        const std::optional<std::uint32_t> slot = take_slot();
        if (!slot)
            return make_error(errc::resource_exhausted,
                              "KVM memory slot limit of " + std::to_string(caps_.max_slots) +
                                  " reached mapping " + range->to_string());
        const SlotInfo info{*slot, gpa, size, host_va, !writable, false};
        if (auto r = set_region(info, info.size); !r) {
            give_back(*slot);
            return r;
        }
        slots_.insert(info);
        return {};
    }

    /// Deletes every slot inside [gpa, gpa+size), which must not cut a slot in half.
    Result<void> unmap_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        if (!range)
            return std::move(range).error().context("KVM unmap");
        const auto cover = slots_.cover(*range);
        if (const SlotInfo* cut = cover.cut)
            return make_error(errc::invalid_range, "KVM: unmapping " + range->to_string() +
                                                       " would split memslot " +
                                                       std::to_string(cut->slot) + " (" +
                                                       span_of(*cut).to_string() + ")");
        std::vector<SlotInfo> deleted;
        for (const SlotInfo& s : cover.inside) {
            // Deleting a slot drops its dirty bitmap: keep it first. If anything below fails
            // the slot comes back with a clean bitmap, and the bits wait in the pending log.
            Result<void> r = save_dirty_log(s);
            if (r)
                r = set_region(s, 0);
            if (!r)
                return put_back(deleted, *range, std::move(r).error());
            deleted.push_back(s);
        }
        for (const SlotInfo& s : deleted) {
            slots_.erase(s.gpa);
            give_back(s.slot);
        }
        return {};
    }

    /// Populates the second-level page tables for one mapped window. KVM_PRE_FAULT_MEMORY is
    /// a vCPU ioctl that waits while that vCPU is in KVM_RUN: it is issued without the
    /// partition's lock, so that a busy vCPU holds up no map or unmap (the manager gives this
    /// advice after its control lock is released, too). A window unmapped meanwhile makes the
    /// kernel fail the call (ENOENT); nothing else happens.
    Result<void> prefetch_range(std::uint64_t gpa, std::uint64_t size)
    {
        // A reference keeps the descriptor open while the ioctl runs outside the lock, even if
        // set_prefetch_vcpu replaces it meanwhile.
        std::shared_ptr<const OwnedFd> vcpu;
        {
            std::lock_guard lock(mutex_);
            vcpu = prefetch_vcpu_;
        }
        if (!caps_.pre_fault_memory)
            return make_error(errc::unsupported,
                              "KVM_PRE_FAULT_MEMORY is not supported by this kernel/host");
        if (!vcpu)
            return make_error(errc::unsupported,
                              "KVM prefetch needs a vCPU (KvmPartition::set_prefetch_vcpu)");
        // The kernel advances gpa/size as it goes and returns 0 once it has done at least one
        // page; EINTR (a signal before any progress) and EAGAIN (a race) ask for a retry, at
        // most max_prefetch_retries times in a row without progress. A success that did
        // nothing would loop forever: it is reported instead.
        detail::kvm_abi::PreFaultMemory pf{gpa, size, 0, {}};
        const auto what = [&] {
            return "KVM_PRE_FAULT_MEMORY of " + MemoryRange::hex(gpa) + "+" +
                   MemoryRange::hex(size) + " failed at " + MemoryRange::hex(pf.gpa);
        };
        unsigned retries = 0;
        while (pf.size != 0) {
            const std::uint64_t before = pf.size;
            if (Sys::ioctl(vcpu->get(), detail::kvm_abi::pre_fault_memory, &pf) < 0) {
                const int err = errno;
                if ((err == EINTR || err == EAGAIN) && ++retries <= max_prefetch_retries)
                    continue;
                const bool transient = err == EINTR || err == EAGAIN;
                return os_error(err,
                                what() + (transient ? " (given up after " +
                                                          std::to_string(max_prefetch_retries) +
                                                          " retries without progress)"
                                                    : std::string()));
            }
            if (pf.size >= before)
                return os_error(EIO, what() + ": the kernel reported success without progress");
            retries = 0;
        }
        return {};
    }

    /// How many EINTR/EAGAIN answers in a row prefetch_range accepts before it gives up.
    static constexpr unsigned max_prefetch_retries = 16;

    /// Keeps the host pages behind one window resident (mlock). Parts the process had locked
    /// itself before (mlockall(MCL_CURRENT | MCL_FUTURE), its own mlock) are noted, and
    /// unpin_range leaves them locked: munlock would undo the VMM's own lock.
    Result<void> pin_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        SlotInfo* s = exact(gpa, size);
        if (s == nullptr)
            return no_window(gpa, size);
        if (s->pinned)
            return {};
        std::vector<HostSpan> ours = not_yet_locked(s->host_va, size);
        if (Sys::mlock(s->host_va, size) != 0) {
            Error e = os::last_error([&] {
                return "could not pin (mlock) the memory of KVM memslot " +
                       std::to_string(s->slot) + " (" + span_of(*s).to_string() + ")";
            });
            // mlock works front to back and stops at the first VMA it cannot lock, leaving the
            // ones before it locked: unlock them so a failed pin holds nothing (and leave what
            // the VMM had locked).
            unlock(s->host_va, ours);
            return e;
        }
        pin_locks_.emplace_back(s->slot, std::move(ours));
        s->pinned = true;
        return {};
    }

    /// Undoes pin_range's lock: only the parts that were not locked before it.
    Result<void> unpin_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        SlotInfo* s = exact(gpa, size);
        if (s == nullptr)
            return no_window(gpa, size);
        if (!s->pinned)
            return {};
        auto it = std::find_if(pin_locks_.begin(), pin_locks_.end(),
                               [&](const auto& p) { return p.first == s->slot; });
        if (it == pin_locks_.end())
            detail::fatal("KVM: pinned memslot " + std::to_string(s->slot) + " has no lock record");
        for (const HostSpan& h : it->second)
            if (Sys::munlock(at(s->host_va, h.first), h.second - h.first) != 0)
                return os::last_error(
                    [&] { return "could not unpin KVM memslot " + std::to_string(s->slot); });
        pin_locks_.erase(it);
        s->pinned = false;
        return {};
    }

    /// Turns dirty-page logging on or off for every slot, now and for slots mapped later.
    /// Turning it off discards the log, once every slot is off. A failure leaves everything as
    /// it was: logging on or off as before, and, when turning off fails, every bit the log held
    /// still reported (KVM drops a slot's bitmap when its logging goes off, so each bitmap is
    /// read first and, on failure, kept in the pending log; a slot turned off and on again while
    /// the vCPUs may run is reported whole, see set_quiesced).
    Result<void> set_dirty_logging(bool enabled)
    {
        std::lock_guard lock(mutex_);
        if (dirty_log_failure_)
            return *dirty_log_failure_;
        if (enabled == dirty_logging_)
            return {};
        const bool before = dirty_logging_;
        std::vector<PendingDirty> saved; // turning off: each slot's bits, read before its flags
        std::vector<const SlotInfo*> done;
        const auto fail = [&](Error e) -> Result<void> {
            dirty_logging_ = before;
            std::string stuck;
            std::optional<Error> refused;
            for (const SlotInfo* d : done)
                if (auto back = set_region(*d, d->size); !back) {
                    stuck += (stuck.empty() ? "" : ", ") + std::to_string(d->slot);
                    if (!refused)
                        refused = std::move(back).error();
                }
            // The slots turned off and on again lost what the guest wrote in between, unless
            // the vCPUs were held; the failing slot kept logging.
            for (std::size_t i = 0; i < saved.size(); ++i) {
                if (i < done.size() && !quiesced_)
                    mark_all(saved[i]);
                keep_pending(std::move(saved[i]));
            }
            if (!refused)
                return e;
            // Some slots log and some do not, whatever dirty_logging_ says: out of service.
            dirty_log_failure_ =
                Error(make_error_code(errc::quarantined),
                      std::string("KVM: turning dirty logging ") + (enabled ? "on" : "off") +
                          " failed (" + e.full_message() + "), and the flags of memslots " + stuck +
                          " could not be restored, so the dirty log is out of service",
                      std::move(*refused));
            return *dirty_log_failure_;
        };
        dirty_logging_ = enabled; // set_region's flags
        for (const auto& [gpa, s] : slots_) {
            if (!enabled) {
                auto bits = read_dirty_bitmap(s);
                if (!bits)
                    return fail(std::move(bits).error());
                saved.push_back(PendingDirty{s.gpa, s.size / page_size, std::move(*bits)});
            }
            if (auto r = set_region(s, s.size); !r)
                return fail(std::move(r).error());
            done.push_back(&s);
        }
        if (!enabled)
            pending_dirty_.clear();
        return {};
    }

    /// Reads and clears the dirty bitmap of one mapped window (bit i = page i of the window).
    Result<std::vector<std::uint64_t>> take_dirty_log(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        const SlotInfo* s = exact(gpa, size);
        if (s == nullptr)
            return no_window(gpa, size);
        return take_part(*s, span_of(*s));
    }

    /// Reads and clears the dirty bits of `part`, page-aligned and inside one mapped window (bit
    /// i = page i of `part`). The window's other pages keep their bits for a later take.
    Result<std::vector<std::uint64_t>> take_dirty_log(const MemoryRange& part)
    {
        std::lock_guard lock(mutex_);
        const SlotInfo* s = part.empty() ? nullptr : slots_.first_overlap(part);
        if (s == nullptr || !span_of(*s).contains(part) || !is_page_aligned(part.start()) ||
            !is_page_aligned(part.end()))
            return make_error(errc::not_found, "KVM: " + part.to_string() +
                                                   " is not a page-aligned part of one memslot");
        return take_part(*s, part);
    }

    /// Pages per KVM_CLEAR_DIRTY_LOG (manual protect): a multiple of 64.
    [[nodiscard]] std::uint64_t clear_chunk_pages() const
    {
        std::lock_guard lock(mutex_);
        return clear_chunk_pages_;
    }
    /// Sets it, rounded up to a multiple of 64 (KVM's alignment), from 64 to 2^31. Smaller chunks
    /// hold KVM's MMU lock for less time each, in more ioctls.
    void set_clear_chunk_pages(std::uint64_t pages)
    {
        std::lock_guard lock(mutex_);
        clear_chunk_pages_ = std::clamp<std::uint64_t>((pages + 63) / 64 * 64, 64, max_clear_chunk);
    }

    /// The quiesce bracket's notice: true while the VMM holds every vCPU out of KVM_RUN. In
    /// between, no guest write can race a slot's deletion, so a deleted slot's dirty log is
    /// exact; outside it, it is conservative (save_dirty_log).
    void set_quiesced(bool quiesced) noexcept
    {
        std::lock_guard lock(mutex_);
        quiesced_ = quiesced;
    }

    /// The vCPU that KVM_PRE_FAULT_MEMORY runs on (nullopt: none). The partition duplicates the
    /// descriptor and owns the duplicate, so the caller may close its own; the one set before is
    /// closed. On failure the previous vCPU stays.
    [[nodiscard]] Result<void> set_prefetch_vcpu(std::optional<int> vcpu_fd)
    {
        OwnedFd owned;
        if (vcpu_fd) {
            const int own = *vcpu_fd < 0 ? -1 : Sys::dup_cloexec(*vcpu_fd);
            if (own < 0) {
                if (*vcpu_fd < 0)
                    return make_error(errc::invalid_argument, "no KVM vCPU file descriptor");
                return os::last_error([&] {
                    return "duplicating the KVM vCPU file descriptor " + std::to_string(*vcpu_fd) +
                           " failed";
                });
            }
            owned = OwnedFd(own);
        }
        std::shared_ptr<const OwnedFd> next =
            owned.valid() ? std::make_shared<OwnedFd>(std::move(owned)) : nullptr;
        std::lock_guard lock(mutex_);
        prefetch_vcpu_.swap(next);
        return {};
    }

    [[nodiscard]] const Capabilities& capabilities() const noexcept { return caps_; }
    [[nodiscard]] std::vector<SlotInfo> slots() const
    {
        std::lock_guard lock(mutex_);
        std::vector<SlotInfo> out;
        for (const auto& [gpa, s] : slots_)
            out.push_back(s);
        return out;
    }
    /// The partition's own duplicate of the VM descriptor (closed when the partition goes).
    [[nodiscard]] int vm_fd() const noexcept { return vm_fd_.get(); }
    /// Pages logged in slots since deleted and not yet taken (for tests and dumps).
    [[nodiscard]] std::uint64_t pending_dirty_pages() const
    {
        std::lock_guard lock(mutex_);
        std::uint64_t n = 0;
        for (const PendingDirty& p : pending_dirty_)
            for (std::uint64_t w : p.bits)
                n += static_cast<std::uint64_t>(std::popcount(w));
        return n;
    }

private:
    /// The dirty bitmap of a deleted slot: bit i is the page at gpa + i * page_size.
    struct PendingDirty {
        std::uint64_t gpa = 0;
        std::uint64_t pages = 0;
        std::vector<std::uint64_t> bits;
    };

    static bool test_bit(const std::vector<std::uint64_t>& bits, std::uint64_t i)
    {
        return (bits[i / 64] >> (i % 64)) & 1U;
    }

    /// The bits of `part` (inside slot s), taken: from KVM's bitmap and the pending log.
    Result<std::vector<std::uint64_t>> take_part(const SlotInfo& s, const MemoryRange& part)
    {
        if (dirty_log_failure_)
            return *dirty_log_failure_;
        if (!dirty_logging_)
            return make_error(errc::conflict, "KVM dirty logging is off");
        auto slot_bits = read_dirty_bitmap(s);
        if (!slot_bits)
            return std::move(slot_bits).error();
        const std::uint64_t first = (part.start() - s.gpa) / page_size; // in the slot
        const std::uint64_t pages = part.size() / page_size;
        std::vector<std::uint64_t> bitmap((pages + 63) / 64, 0);
        for (std::uint64_t i = 0; i < pages; ++i)
            if (test_bit(*slot_bits, first + i))
                bitmap[i / 64] |= std::uint64_t{1} << (i % 64);
        if (caps_.manual_dirty_log_protect) {
            MEMBACKING_TRY(clear_dirty_bits(s, first, bitmap));
        } else if (first != 0 || pages != s.size / page_size) {
            // The read cleared the whole slot: what lies outside the part waits by GPA.
            PendingDirty rest{s.gpa, s.size / page_size, std::move(*slot_bits)};
            for (std::uint64_t i = first; i < first + pages; ++i)
                rest.bits[i / 64] &= ~(std::uint64_t{1} << (i % 64));
            keep_pending(std::move(rest));
        }
        merge_pending(part, bitmap);
        return bitmap;
    }

    /// KVM_CLEAR_DIRTY_LOG of the pages set in `bits` (bit i = page first + i of slot s), in
    /// chunks of clear_chunk_pages_ that start at a multiple of 64 pages (KVM's rule; a chunk's
    /// length is a multiple of 64 too unless it ends the slot). A chunk with no bit set is not
    /// sent. A failure part-way loses no page: those of the chunks KVM did clear go to the
    /// pending log, the others stay in KVM's; the next take reports both (too often, never too
    /// rarely).
    Result<void> clear_dirty_bits(const SlotInfo& s, std::uint64_t first,
                                  const std::vector<std::uint64_t>& bits)
    {
        const std::uint64_t slot_pages = s.size / page_size;
        const std::uint64_t end =
            first + bits.size() * 64 > slot_pages ? slot_pages : first + bits.size() * 64;
        std::vector<std::uint64_t> mask;
        for (std::uint64_t chunk = first / 64 * 64; chunk < end; chunk += clear_chunk_pages_) {
            const std::uint64_t chunk_end = std::min(chunk + clear_chunk_pages_, slot_pages);
            mask.assign((chunk_end - chunk + 63) / 64, 0);
            bool any = false;
            for (std::uint64_t page = std::max(chunk, first); page < std::min(chunk_end, end);
                 ++page) {
                const std::uint64_t i = page - first;
                if (test_bit(bits, i)) {
                    mask[(page - chunk) / 64] |= std::uint64_t{1} << ((page - chunk) % 64);
                    any = true;
                }
            }
            if (!any)
                continue;
            kvm_clear_dirty_log clear{};
            clear.slot = s.slot;
            clear.first_page = chunk;
            clear.num_pages = static_cast<std::uint32_t>(chunk_end - chunk);
            clear.dirty_bitmap = mask.data();
            if (Sys::ioctl(vm_fd_.get(), KVM_CLEAR_DIRTY_LOG, &clear) != 0) {
                Error e = os::last_error([&] {
                    return "KVM_CLEAR_DIRTY_LOG of pages " + std::to_string(chunk) + "+" +
                           std::to_string(chunk_end - chunk) + " of memslot " +
                           std::to_string(s.slot) + " (" + span_of(s).to_string() + ") failed";
                });
                keep_cleared(s, first, bits, chunk);
                return e;
            }
        }
        return {};
    }

    /// After a clear that failed at slot page `stop`: the pages of `bits` (bit i = page
    /// first + i of slot s) below it, which KVM cleared, go to the pending log.
    void keep_cleared(const SlotInfo& s, std::uint64_t first,
                      const std::vector<std::uint64_t>& bits, std::uint64_t stop)
    {
        if (stop <= first)
            return;
        const std::uint64_t pages = stop - first;
        PendingDirty cleared{s.gpa + first * page_size, pages,
                             std::vector<std::uint64_t>((pages + 63) / 64, 0)};
        for (std::uint64_t i = 0; i < pages; ++i)
            if (test_bit(bits, i))
                cleared.bits[i / 64] |= std::uint64_t{1} << (i % 64);
        keep_pending(std::move(cleared));
    }

    /// Merges into `bitmap` (bit i = page i of `part`) and clears the pending log's bits of
    /// `part`, left by slots deleted while logging.
    void merge_pending(const MemoryRange& part, std::vector<std::uint64_t>& bitmap)
    {
        for (auto it = pending_dirty_.begin(); it != pending_dirty_.end();) {
            PendingDirty& p = *it;
            const MemoryRange span =
                MemoryRange::valid_or_abort(p.gpa, p.gpa + p.pages * page_size);
            const MemoryRange common = span.intersection(part);
            for (std::uint64_t page = common.start(); page < common.end(); page += page_size) {
                const std::uint64_t from = (page - p.gpa) / page_size;
                const std::uint64_t to = (page - part.start()) / page_size;
                if (test_bit(p.bits, from)) {
                    bitmap[to / 64] |= std::uint64_t{1} << (to % 64);
                    p.bits[from / 64] &= ~(std::uint64_t{1} << (from % 64));
                }
            }
            if (std::all_of(p.bits.begin(), p.bits.end(), [](std::uint64_t w) { return w == 0; }))
                it = pending_dirty_.erase(it);
            else
                ++it;
        }
    }

    /// KVM_GET_DIRTY_LOG of one slot: reads its bitmap (and clears it, unless manual protect).
    Result<std::vector<std::uint64_t>> read_dirty_bitmap(const SlotInfo& s)
    {
        std::vector<std::uint64_t> bitmap((s.size / page_size + 63) / 64, 0);
        kvm_dirty_log log{};
        log.slot = s.slot;
        log.dirty_bitmap = bitmap.data();
        if (Sys::ioctl(vm_fd_.get(), KVM_GET_DIRTY_LOG, &log) != 0)
            return os::last_error([&] {
                return "KVM_GET_DIRTY_LOG of memslot " + std::to_string(s.slot) + " (" +
                       span_of(s).to_string() + ") failed";
            });
        return bitmap;
    }

    /// unmap_range's rollback: re-adds the slots `deleted` (of an unmap of `range` that failed
    /// with `cause`). One the kernel will not take back stays deleted, and the books say so
    /// (errc::quarantined; see the file comment).
    Result<void> put_back(const std::vector<SlotInfo>& deleted, const MemoryRange& range,
                          Error cause)
    {
        std::string lost;
        std::optional<Error> refused;
        for (const SlotInfo& d : deleted) {
            auto back = set_region(d, d.size);
            if (back)
                continue;
            slots_.erase(d.gpa);
            give_back(d.slot);
            lost += (lost.empty() ? "" : ", ") + std::to_string(d.slot) + " (" +
                    span_of(d).to_string() + ")";
            if (!refused)
                refused = std::move(back).error();
        }
        if (!refused)
            return cause;
        return Error(make_error_code(errc::quarantined),
                     "KVM: unmapping " + range.to_string() + " failed (" + cause.full_message() +
                         "), and memslots " + lost + " could not be added back, so they stay " +
                         "deleted",
                     std::move(*refused));
    }

    /// Moves a logged slot's bitmap into the pending log, ahead of deleting the slot. Unless
    /// the VMM holds the vCPUs (set_quiesced), a guest write can land after this read and before
    /// the deletion, and KVM would drop it with the slot: then every page of the slot is
    /// reported dirty, so that no write is ever lost (reported too often, never too rarely).
    Result<void> save_dirty_log(const SlotInfo& s)
    {
        if (!dirty_logging_ || dirty_log_failure_) // out of service: a slot may not log at all
            return {};
        auto bitmap = read_dirty_bitmap(s);
        if (!bitmap)
            return std::move(bitmap).error().context("saving the dirty log before deleting it");
        PendingDirty p{s.gpa, s.size / page_size, std::move(*bitmap)};
        if (!quiesced_)
            mark_all(p);
        keep_pending(std::move(p));
        return {};
    }

    /// Every page of p dirty.
    static void mark_all(PendingDirty& p)
    {
        std::fill(p.bits.begin(), p.bits.end(), ~std::uint64_t{0});
        if (const std::uint64_t tail = p.pages % 64; tail != 0)
            p.bits.back() = (std::uint64_t{1} << tail) - 1;
    }

    /// Adds p to the pending log if it has a bit set.
    void keep_pending(PendingDirty p)
    {
        if (std::any_of(p.bits.begin(), p.bits.end(), [](std::uint64_t w) { return w != 0; }))
            pending_dirty_.push_back(std::move(p));
    }

    KvmPartition(OwnedFd vm_fd, const Capabilities& caps) : vm_fd_(std::move(vm_fd)), caps_(caps) {}

    /// A host address range [first, second).
    using HostSpan = std::pair<std::uintptr_t, std::uintptr_t>;

    /// The parts of [va, va + size) that are not mlock()ed yet.
    static std::vector<HostSpan> not_yet_locked(const void* va, std::uint64_t size)
    {
        const auto lo = reinterpret_cast<std::uintptr_t>(va);
        const std::uintptr_t hi = lo + size;
        std::vector<HostSpan> out;
        std::uintptr_t at = lo;
        for (const HostSpan& l : Sys::locked_spans(va, size)) {
            if (l.first > at)
                out.emplace_back(at, l.first);
            at = std::max(at, l.second);
        }
        if (at < hi)
            out.emplace_back(at, hi);
        return out;
    }

    /// The address `addr` as a pointer derived from `base` (a span lies inside its slot's
    /// host range), not cast from an integer.
    static const void* at(const void* base, std::uintptr_t addr) noexcept
    {
        return static_cast<const std::byte*>(base) +
               (addr - reinterpret_cast<std::uintptr_t>(base));
    }

    static void unlock(const void* base, const std::vector<HostSpan>& spans) noexcept
    {
        for (const HostSpan& h : spans)
            (void)Sys::munlock(at(base, h.first), h.second - h.first);
    }

    static MemoryRange span_of(const SlotInfo& s)
    {
        return MemoryRange::valid_or_abort(s.gpa, s.gpa + s.size);
    }
    struct SlotSpan {
        MemoryRange operator()(const SlotInfo& s) const { return span_of(s); }
    };

    static Error no_window(std::uint64_t gpa, std::uint64_t size)
    {
        return make_error(errc::not_found, "KVM: no memslot maps exactly " + MemoryRange::hex(gpa) +
                                               "+" + MemoryRange::hex(size));
    }

    std::optional<std::uint32_t> take_slot()
    {
        if (!free_.empty()) {
            const std::uint32_t s = free_.back();
            free_.pop_back();
            return s;
        }
        if (next_ >= caps_.max_slots)
            return std::nullopt;
        return next_++;
    }
    void give_back(std::uint32_t slot) { free_.push_back(slot); }

    /// Issues the memslot ioctl for `s` with `size` (0 deletes it).
    Result<void> set_region(const SlotInfo& s, std::uint64_t size)
    {
        std::uint32_t flags = 0;
        if (s.readonly)
            flags |= KVM_MEM_READONLY;
        if (dirty_logging_ && size != 0)
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        int rc = 0;
        if (caps_.user_memory2) {
            detail::kvm_abi::UserspaceMemoryRegion2 r{};
            r.slot = s.slot;
            r.flags = flags;
            r.guest_phys_addr = s.gpa;
            r.memory_size = size;
            r.userspace_addr = reinterpret_cast<std::uint64_t>(s.host_va);
            rc = Sys::ioctl(vm_fd_.get(), detail::kvm_abi::set_user_memory_region2, &r);
        } else {
            kvm_userspace_memory_region r{};
            r.slot = s.slot;
            r.flags = flags;
            r.guest_phys_addr = s.gpa;
            r.memory_size = size;
            r.userspace_addr = reinterpret_cast<std::uint64_t>(s.host_va);
            rc = Sys::ioctl(vm_fd_.get(), KVM_SET_USER_MEMORY_REGION, &r);
        }
        if (rc != 0)
            return os::last_error([&] {
                return std::string(size == 0 ? "deleting" : "setting") + " KVM memslot " +
                       std::to_string(s.slot) + " (" + span_of(s).to_string() + ") failed";
            });
        return {};
    }

    SlotInfo* exact(std::uint64_t gpa, std::uint64_t size)
    {
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        return range ? slots_.find_exact(*range) : nullptr;
    }

    static constexpr std::uint64_t max_clear_chunk = std::uint64_t{1} << 31; // num_pages is 32-bit

    mutable std::mutex mutex_;
    const OwnedFd vm_fd_; ///< the partition's duplicate of the VMM's VM descriptor
    const Capabilities caps_;
    detail::IntervalMap<SlotInfo, SlotSpan> slots_; ///< by GPA
    std::vector<std::uint32_t> free_;               ///< released slot numbers, reused first
    std::uint32_t next_ = 0;                        ///< the lowest never-used slot number
    bool dirty_logging_ = false;
    /// Set when set_dirty_logging could not restore a slot's flags: the log is out of service.
    std::optional<Error> dirty_log_failure_;
    bool quiesced_ = false;                        ///< the VMM holds the vCPUs (set_quiesced)
    std::vector<PendingDirty> pending_dirty_;      ///< bitmaps of logged slots deleted since
    std::shared_ptr<const OwnedFd> prefetch_vcpu_; ///< its own duplicate, or null
    /// KVM_CLEAR_DIRTY_LOG's chunk: 1 GiB of guest pages (QEMU's default clear size too).
    std::uint64_t clear_chunk_pages_ = std::uint64_t{1} << 18;
    /// Per pinned slot number: the host spans pin_range locked (unlocked before it).
    std::vector<std::pair<std::uint32_t, std::vector<HostSpan>>> pin_locks_;
};

static_assert(PartitionMapper<KvmPartition<>>);

} // namespace membacking

#endif // MEMBACKING_OS_LINUX
