/**
 * @file mapping/mapping_manager.hpp
 * Layer: mapping (includes base/, detail/, access/, va/, lease/, region/mapping.hpp). Knows
 * nothing of partitions.
 *
 * MappingManager<V> keeps every VA mapper of one guest in sync with the active mappings the
 * region manager computes (it is the region manager's VaEventSink). A VaMapper<V> is one linear
 * reservation (GPA g at base + g) in this process; GuestMemory handles are bound to one.
 *
 * Semantics (reference inventory §4, §5, §10):
 * - Eager mappers get the current mappings replayed when they are created, then every change.
 * - Lazy mappers get a mapping only when an access faults on it (resolve_fault); a gap is
 *   answered "no mapping". A lazy mapper can be upgraded to eager, with a replay.
 * - Removing a mapping invalidates it in every mapper that holds it, eager or lazy, before the
 *   call returns; afterwards an access there faults and is reported, never served stale memory.
 * - add_mapping replaces whatever overlaps it (MAP_FIXED, no unmapped window on Linux); lazy
 *   mappers that held the old memory there drop it and fault the new one in on demand. Adding
 *   the same memory over exactly the same range with another permission is an in-place
 *   mprotect in every mapper that holds it (a region's params changing).
 * - Every failure path rolls back: adding a mapper (its reservation simply goes away), adding or
 *   replacing a mapping (mappers that took it get the old pieces back), removing mappings, and
 *   upgrading (the mapper stays lazy, keeping what it mapped so far, which is still correct).
 * - Quarantine (issue 10, defect 7): a mapper whose restore the host refuses too is taken out of
 *   service instead of aborting: it leaves the books, its range is replaced by one PROT_NONE
 *   reservation or else made inaccessible in place (neither splits a VMA, so neither needs one
 *   more at vm.max_map_count; if both are refused, every later control operation tries again),
 *   and its accesses fail with errc::quarantined from their first fault. The operation returns
 *   its own error; the other mappers stay in sync. quarantined_mappers() lists them, and
 *   restore_mapper() puts one back once the host accepts calls again. A step run
 *   as a rollback (UndoLog::rolling_back()) never fails: a mapper that cannot follow it is
 *   quarantined and the books take the change.
 * - Private (anonymous) memory lives in exactly one mapper: a second mapper is refused while
 *   private memory is mapped, and private memory is refused while two mappers exist.
 * - Mapper ids are never reused (the reference's slab reuses keys).
 *
 * Concurrency: one mutex guards the books and every VA change. Control calls and lazy faults
 * both take it; the access path never does. A fault taken on a thread that already holds the
 * mutex (an access from inside a control call) is answered with an error, not a deadlock.
 * Shutdown (the manager's destructor) unmaps every mapper's whole range, so handles that outlive
 * the manager get errors, not stale memory. If the host refuses that and the in-place PROT_NONE
 * too (a host failure, not a broken invariant: never fatal), the mapper is quarantined and its
 * range left mapped as it is, never a hole another mmap could take: a handle that still holds it
 * reads the guest memory as it was (faults on what is not mapped give errc::quarantined) until
 * it drops the mapper, whose reservation goes with it; teardown_leaks() counts such mappers.
 *
 * Leases (Linux): the manager owns the guest's lease domain (lease/lease_domain.hpp), which every
 * mapper shares. Every operation that may change the active mappings republishes the domain's
 * table before it returns (success or failure), and a new object gets its lease window (made by
 * the VA policy's map_lease_window, if it has one) before any mapper is touched, so a window
 * that cannot be mapped fails the operation with nothing changed. Shutdown publishes an empty
 * table: leases taken before stay valid until released.
 */
#pragma once

#include <membacking/access/dirty_bitmap.hpp>
#include <membacking/base/config.hpp>
#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/detail/interval_map.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/va/va_policy.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS
#    include <membacking/access/fault_handler.hpp>
#endif
#if MEMBACKING_OS_LINUX
#    include <membacking/lease/lease_domain.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace membacking {

template <VaPolicy V>
class MappingManager;

namespace detail {
template <VaPolicy V>
class MappingCore;
} // namespace detail

/// Whether a new mapper gets every mapping pushed to it (eager) or faults them in (lazy).
enum class MapperMode : std::uint8_t { eager, lazy };

/// A VA mapper the manager could not restore after a host failure (see VaMapper::quarantined).
struct QuarantinedMapper {
    std::uint64_t id = 0;
    std::string cause; ///< the operation's error, then what the rollback could not do
    /// Whether its whole range is unmapped or inaccessible by now (if not, every later control
    /// operation tries again; until then pages it had mapped stay readable through it).
    bool invalidated = false;
};

/// Counters for tests and dumps.
struct MappingStats {
    std::uint64_t lazy_faults = 0;   ///< mappings faulted into lazy mappers
    std::uint64_t hint_failures = 0; ///< THP or prefetch advice the kernel refused (advisory)
};

/// One linear VA range for guest memory in this process. Created by MappingManager::new_mapper,
/// owned through shared_ptr (GuestMemory handles keep it alive), never moved.
template <VaPolicy V>
class VaMapper {
public:
    VaMapper(const VaMapper&) = delete;
    VaMapper& operator=(const VaMapper&) = delete;
    ~VaMapper();

    [[nodiscard]] std::byte* base() const noexcept { return va_.base(); }
    /// The guest address space size (max GPA + 1).
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    [[nodiscard]] bool is_eager() const noexcept { return eager_.load(std::memory_order_relaxed); }
    [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
    /// Whether the manager quarantined this mapper: a control operation failed on it and the host
    /// refused what would have put it back. Its range is then unmapped (or made inaccessible),
    /// every access that faults on it fails with errc::quarantined, and the manager no longer
    /// keeps it in sync. Read only on an access's failure side (resolve_fault).
    [[nodiscard]] bool quarantined() const noexcept
    {
        return quarantined_.load(std::memory_order_acquire);
    }

    /// The slow path of a guest access that faulted at `gpa`. Returns std::nullopt if the access
    /// should be retried (a lazy mapper fetched the mapping, or it was replaced concurrently), or
    /// the error to report: errc::unmapped (no mapping there), errc::read_only (a write to
    /// read-only memory), errc::conflict (the fault came from inside a control call on this
    /// thread), errc::quarantined (this mapper is quarantined). Takes the mapping manager's lock;
    /// may map memory. This is the cold path after a fault, not the access path: it may allocate
    /// (bookkeeping, error text), and being noexcept an allocation failure here ends the process
    /// rather than corrupting the books.
    [[nodiscard]] std::optional<errc> resolve_fault(std::uint64_t gpa, bool write) noexcept;

    /// The guest's dirty bitmap, if its manager tracks VMM writes (null otherwise). It lives as
    /// long as this mapper does.
    [[nodiscard]] detail::DirtyBitmap* dirty_bitmap() const noexcept { return dirty_.get(); }
    [[nodiscard]] const std::shared_ptr<detail::DirtyBitmap>& dirty_bitmap_owner() const noexcept
    {
        return dirty_;
    }

#if MEMBACKING_OS_LINUX
    /// The guest's lease domain (GuestMemory::lease and ::probe look ranges up there). It
    /// outlives the manager as long as this mapper does.
    [[nodiscard]] detail::LeaseDomain& leases() const noexcept
    {
        return *leases_;
    }
#endif

private:
    friend class detail::MappingCore<V>;
#if MEMBACKING_OS_LINUX
    using Leases = std::shared_ptr<detail::LeaseDomain>;
#else
    struct Leases {};
#endif
    VaMapper(V va, std::uint64_t size, std::weak_ptr<detail::MappingCore<V>> core, std::uint64_t id,
             bool eager, Leases leases, std::shared_ptr<detail::DirtyBitmap> dirty)
        : va_(std::move(va)), size_(size), core_(std::move(core)), id_(id), eager_(eager),
          leases_(std::move(leases)), dirty_(std::move(dirty))
    {}

    V va_;
    std::uint64_t size_;
    std::weak_ptr<detail::MappingCore<V>> core_;
    std::uint64_t id_;
    std::atomic<bool> eager_;
    /// Only registered mappers deregister on destruction; cleared at the manager's shutdown.
    std::atomic<bool> registered_ = false;
    /// Set by a quarantine and cleared by restore_mapper, both under the mapping manager's lock;
    /// read by resolve_fault without it.
    std::atomic<bool> quarantined_ = false;
    [[no_unique_address]] Leases leases_;
    std::shared_ptr<detail::DirtyBitmap> dirty_;
};

namespace detail {

/// The shared state of one MappingManager. Mappers refer to it weakly, so a mapper can outlive
/// the manager (its accesses then fail).
template <VaPolicy V>
class MappingCore : public std::enable_shared_from_this<MappingCore<V>> {
public:
    MappingCore(std::uint64_t max_addr, std::uint64_t min_alignment,
                std::shared_ptr<DirtyBitmap> dirty)
        : max_addr_(max_addr), min_alignment_(min_alignment), dirty_(std::move(dirty))
    {}

    Result<void> add_mapping(const ActiveMapping& m)
    {
        Locked lock(*this);
        const Republish republish(*this);
        retry_invalidations();
        if (m.gpa.empty() || m.gpa.end() > max_addr_)
            return make_error(errc::out_of_range, "mapping " + m.gpa.to_string() +
                                                      " lies outside the guest address space of " +
                                                      MemoryRange::hex(max_addr_) + " bytes");
        // A rollback step (an UndoLog running) must not fail: a mapper that cannot follow it is
        // quarantined, the books take the change. Without its lease window, leases of the range
        // answer errc::unsupported until a later change makes the window.
        const bool must_follow = UndoLog::rolling_back();
        if (auto w = ensure_lease_window(m); !w && !must_follow)
            return w;
        if (Entry* same = exact_entry(m.gpa); same != nullptr && same->mapping.backing == m.backing)
            return change_permission(*same, m, must_follow);
        if (m.backing.is_private() && healthy_count() > 1)
            return make_error(errc::conflict,
                              "cannot map private memory at " + m.gpa.to_string() + " while " +
                                  std::to_string(healthy_count()) +
                                  " VA mappers exist (private memory lives in one)");
        const std::vector<ActiveMapping> old = pieces_in(m.gpa);
        for (const ActiveMapping& p : old)
            if (p.backing.is_private())
                return make_error(errc::conflict, "replacing private memory at " +
                                                      p.gpa.to_string() + " would discard it");

        // Eager mappers take the new mapping; any failure gives the ones that took it the old
        // pieces back.
        // A mapper whose restore fails too is quarantined (quarantine()).
        std::vector<Slot*> took;
        for (Slot& s : mappers_) {
            if (!s.eager || s.quarantined)
                continue;
            if (auto r = map_into(*s.mapper, m); !r) {
                if (must_follow) {
                    quarantine(s, r.error().full_message());
                    continue;
                }
                // The failing mapper too: its MAP_FIXED may have replaced the old pages before
                // a later step (the NUMA binding) failed.
                restore_or_quarantine(s, m.gpa, old, r.error());
                for (Slot* t : took)
                    restore_or_quarantine(*t, m.gpa, old, r.error());
                return std::move(r).error();
            }
            took.push_back(&s);
        }
        // Lazy mappers that hold old memory here drop it; they will fault the new one in.
        std::vector<Slot*> dropped;
        for (Slot& s : mappers_) {
            if (s.eager || s.quarantined || !holds_any(s.id, m.gpa))
                continue;
            if (auto r = s.mapper->va_.unmap(m.gpa.start(), m.gpa.size()); !r) {
                if (must_follow) {
                    quarantine(s, r.error().full_message());
                    continue;
                }
                for (Slot* d : dropped)
                    restore_or_quarantine(*d, m.gpa, held_pieces(d->id, m.gpa), r.error());
                for (Slot* t : took)
                    restore_or_quarantine(*t, m.gpa, old, r.error());
                return std::move(r).error();
            }
            dropped.push_back(&s);
        }

        // Commit: split what overlapped, keep the outside parts with their holders.
        split_out(m.gpa);
        Entry e{m, {}};
        for (const Slot& s : mappers_)
            if (s.eager && !s.quarantined)
                e.holders.push_back(s.id);
        entries_.insert(std::move(e));
        has_private_ = has_private_ || m.backing.is_private();
        return {};
    }

    Result<void> remove_mappings(const MemoryRange& range)
    {
        Locked lock(*this);
        const Republish republish(*this);
        retry_invalidations();
        const bool must_follow = UndoLog::rolling_back(); // as in add_mapping
        const std::vector<ActiveMapping> old = pieces_in(range);
        if (old.empty())
            return {};
        const MemoryRange extent =
            MemoryRange::valid_or_abort(old.front().gpa.start(), old.back().gpa.end());
        std::vector<Slot*> done;
        for (Slot& s : mappers_) {
            if (s.quarantined || (!s.eager && !holds_any(s.id, extent)))
                continue;
            if (auto r = s.mapper->va_.unmap(extent.start(), extent.size()); !r) {
                if (must_follow) {
                    quarantine(s, r.error().full_message());
                    continue;
                }
                for (Slot* d : done)
                    restore_or_quarantine(*d, extent, held_pieces(d->id, extent), r.error());
                // Its unmap failed, so its private memory (if any) is most likely intact:
                // re-committing it would zero it. File pieces are put back either way.
                restore_or_quarantine(s, extent, held_pieces(s.id, extent), r.error(),
                                      Private::leave);
                return std::move(r).error();
            }
            done.push_back(&s);
        }
        split_out(extent);
        recompute_private();
        return {};
    }

    Result<std::shared_ptr<VaMapper<V>>> new_mapper(MapperMode mode)
    {
#if MEMBACKING_HAS_GUARDED_ACCESS
        access::install_fault_handler();
#endif
        Locked lock(*this);
        if (shut_down_)
            return make_error(errc::not_found, "the mapping manager has shut down");
        retry_invalidations();
        if (healthy_count() > 0 && has_private_)
            return make_error(errc::conflict,
                              "cannot add a second VA mapper while private memory is mapped "
                              "(private memory lives in one mapper)");
        auto va = V::reserve(max_addr_, min_alignment_);
        if (!va)
            return std::move(va).error().context("failed to reserve address space for a VA mapper");
        const bool eager = mode == MapperMode::eager;
        std::shared_ptr<VaMapper<V>> mapper(new VaMapper<V>(
            std::move(*va), max_addr_, this->weak_from_this(), next_id_++, eager, leases_, dirty_));
        if (eager) {
            // A failed replay needs no undo: the unregistered mapper and its whole reservation
            // go away when `mapper` does.
            MEMBACKING_TRY_CONTEXT(replay_all(*mapper),
                                   "failed to replay mappings into a new VA mapper");
        }
        mapper->registered_ = true;
        mappers_.push_back(Slot{mapper->id_, mapper.get(), eager, false, false, {}});
        return mapper;
    }

    Result<void> upgrade_to_eager(VaMapper<V>& mapper)
    {
        Locked lock(*this);
        Slot* s = find_slot(mapper.id_);
        if (s == nullptr)
            return make_error(errc::not_found,
                              "VA mapper " + std::to_string(mapper.id_) + " is not registered");
        retry_invalidations();
        if (s->quarantined)
            return quarantined_error(*s);
        if (s->eager)
            return {};
        for (auto& [start, e] : entries_) {
            if (holds(e, s->id))
                continue;
            // On failure the mapper stays lazy; what it mapped so far stays valid and recorded
            // (unless the failed step left memory behind that could not be cleared: quarantine).
            bool left_behind = false;
            if (auto r = map_into(mapper, e.mapping, &left_behind); !r) {
                if (left_behind)
                    quarantine(*s, r.error().full_message());
                return std::move(r).error().context("failed to upgrade VA mapper " +
                                                    std::to_string(s->id) + " to eager");
            }
            e.holders.push_back(s->id);
        }
        s->eager = true;
        mapper.eager_.store(true, std::memory_order_relaxed);
        return {};
    }

    /// Puts a quarantined mapper back in service once the host accepts calls again (see
    /// MappingManager::restore_mapper).
    Result<void> restore_mapper(std::uint64_t id)
    {
        Locked lock(*this);
        auto refuse = [id](errc code, const char* why) {
            std::string what = "VA mapper ";
            what += std::to_string(id);
            what += why;
            return make_error(code, what);
        };
        Slot* s = find_slot(id);
        if (s == nullptr)
            return refuse(errc::not_found, " is not registered");
        retry_invalidations();
        if (!s->quarantined)
            return {};
        if (has_private_)
            return refuse(errc::conflict, " cannot be restored while private memory is mapped: "
                                          "the only copy of its contents went with the quarantine");
        if (!s->invalidated) // its range may still show memory from before: never replay over it
            return refuse(errc::quarantined,
                          " cannot be restored: the host still refuses to invalidate its range");
        if (s->eager) {
            // Over the one inaccessible reservation the quarantine left; a replay that fails
            // part way is invalidated again, so the mapper is exactly as quarantined as before.
            if (auto r = replay_all(*s->mapper); !r) {
                s->invalidated = invalidate(*s->mapper);
                std::string context = "failed to restore VA mapper ";
                context += std::to_string(id);
                return std::move(r).error().context(context);
            }
        }
        s->quarantined = false;
        s->invalidated = false;
        s->cause.clear();
        s->mapper->quarantined_.store(false, std::memory_order_release);
        return {};
    }

    void remove_mapper(std::uint64_t id) noexcept
    {
        Locked lock(*this);
        std::erase_if(mappers_, [&](const Slot& s) { return s.id == id; });
        for (auto& [start, e] : entries_)
            std::erase(e.holders, id);
    }

    std::optional<errc> resolve_fault(VaMapper<V>& mapper, std::uint64_t gpa, bool write) noexcept
    {
        if (locked_here() == this)
            return errc::conflict; // re-entrant: the control call on this thread holds the lock
        Locked lock(*this);
        Slot* s = find_slot(mapper.id_);
        if (s == nullptr)
            return errc::unmapped;
        if (s->quarantined)
            return errc::quarantined;
        Entry* e = entry_at(gpa);
        if (e == nullptr)
            return errc::unmapped;
        if (write && !e->mapping.writable)
            return errc::read_only;
        if (holds(*e, s->id))
            return std::nullopt; // mapped by now: the access raced with a change; retry
        if (s->eager)
            return errc::unmapped;
        bool left_behind = false;
        if (!map_into(mapper, e->mapping, &left_behind)) {
            if (left_behind) { // mapped with the wrong permission or node, and stuck so
                std::string cause = "a lazy fault at ";
                cause += MemoryRange::hex(gpa);
                cause += " could not clear a half-made mapping";
                quarantine(*s, cause);
            }
            return errc::resource_exhausted;
        }
        e->holders.push_back(s->id);
        ++stats_.lazy_faults;
        return std::nullopt;
    }

    /// Unmaps every mapper's whole range and forgets everything. A mapper whose range can be
    /// neither replaced nor made inaccessible (neither call needs a new VMA on Linux, so an
    /// exhausted vm.max_map_count cannot cause it) is quarantined and left mapped as it is, and
    /// counted in teardown_leaks(): a host failure is not a broken invariant, so it is not
    /// fatal. Its range stays its own (unmapping it would leave a hole that another mmap could
    /// take while a handle still points there); a handle that survives reads the guest memory
    /// as it was, and the reservation goes when the last handle drops the mapper.
    void shut_down() noexcept
    {
        Locked lock(*this);
        const Republish republish(*this);
        for (Slot& s : mappers_) {
            if (!s.invalidated && !invalidate(*s.mapper)) {
                s.mapper->quarantined_.store(true, std::memory_order_release);
                teardown_leaks().fetch_add(1, std::memory_order_relaxed);
            }
            s.mapper->registered_ = false;
        }
        mappers_.clear();
        entries_.clear();
        has_private_ = false;
        shut_down_ = true;
    }

    [[nodiscard]] std::vector<ActiveMapping> mappings() const
    {
        Locked lock(*this);
        std::vector<ActiveMapping> out;
        for (const auto& [start, e] : entries_)
            out.push_back(e.mapping);
        return out;
    }
    [[nodiscard]] std::vector<std::uint64_t> holders_at(std::uint64_t gpa) const
    {
        Locked lock(*this);
        const Entry* e = entry_at(gpa);
        return e ? e->holders : std::vector<std::uint64_t>{};
    }
    [[nodiscard]] std::size_t mapper_count() const
    {
        Locked lock(*this);
        return mappers_.size();
    }
    [[nodiscard]] std::vector<QuarantinedMapper> quarantined_mappers() const
    {
        Locked lock(*this);
        std::vector<QuarantinedMapper> out;
        for (const Slot& s : mappers_)
            if (s.quarantined)
                out.push_back({s.id, s.cause, s.invalidated});
        return out;
    }
    /// VA mappers that the host refused to invalidate at teardown, left mapped (see
    /// shut_down), over every manager of this process.
    static std::atomic<std::uint64_t>& teardown_leaks() noexcept
    {
        static std::atomic<std::uint64_t> leaks = 0;
        return leaks;
    }
    [[nodiscard]] MappingStats stats() const
    {
        Locked lock(*this);
        return stats_;
    }
    [[nodiscard]] std::uint64_t max_addr() const noexcept
    {
        return max_addr_;
    }

#if MEMBACKING_OS_LINUX
    /// Lease windows mapped and not yet retired (for tests).
    [[nodiscard]] std::size_t lease_window_count() const
    {
        Locked lock(*this);
        return leases_->window_count();
    }
#endif

private:
    struct Entry {
        ActiveMapping mapping;
        std::vector<std::uint64_t> holders; ///< ids of mappers whose VA has this mapping
    };
    struct RangeOfEntry {
        MemoryRange operator()(const Entry& e) const noexcept { return e.mapping.gpa; }
    };
    struct Slot {
        std::uint64_t id;
        VaMapper<V>* mapper;
        bool eager;
        bool quarantined = false; ///< see quarantine(); no operation touches it until restored
        bool invalidated = false; ///< quarantined and its whole range unmapped or inaccessible
        std::string cause;        ///< why it was quarantined
    };

    /// The mutex, plus a per-thread note of which core this thread holds (for re-entrancy).
    struct Locked {
        explicit Locked(const MappingCore& c) : lock(c.mutex_), previous(locked_here())
        {
            locked_here() = &c;
        }
        ~Locked() { locked_here() = previous; }
        Locked(const Locked&) = delete;
        Locked& operator=(const Locked&) = delete;
        std::unique_lock<std::mutex> lock;
        const void* previous;
    };
    static const void*& locked_here() noexcept
    {
        static thread_local const void* core = nullptr;
        return core;
    }

    /// Republishes the lease table when it goes: at the end of every operation that may have
    /// changed the active mappings (or made a lease window), whatever path it returns by.
    struct Republish {
        explicit Republish(MappingCore& c) noexcept : core(c) {}
        Republish(const Republish&) = delete;
        Republish& operator=(const Republish&) = delete;
        ~Republish() { core.publish_leases(); }
        MappingCore& core;
    };

    /// Whether the VA policy can map lease windows (LinuxMmap can).
    static constexpr bool has_lease_windows =
        requires(const Mappable& o, std::uint64_t n, std::byte* b)
    {
        V::map_lease_window(o, n);
        V::unmap_lease_window(b, n);
    };

    /// Makes the lease window of m's object if it has none yet (on Linux, with a VA policy that
    /// can). Nothing else changes, so a failure leaves the books as they were.
    Result<void> ensure_lease_window([[maybe_unused]] const ActiveMapping& m)
    {
#if MEMBACKING_OS_LINUX
        if constexpr (has_lease_windows) {
            if (m.backing.is_private() || leases_->window(m.backing.object.identity()) != nullptr)
                return {};
            auto w = V::map_lease_window(m.backing.object, m.backing.file_offset + m.gpa.size());
            if (!w)
                return std::move(w).error().context("failed to make the lease window for " +
                                                    m.gpa.to_string());
            leases_->add_window(m.backing.object.identity(), w->base, w->size, w->writable,
                                &V::unmap_lease_window);
        }
#endif
        return {};
    }

    /// Publishes the active mappings as the lease table (and retires unused windows). A piece
    /// lies in its object's window at its file offset; private pieces, pieces of objects with no
    /// window, and pieces beyond their window's end (an object that grew after its window was
    /// made) cannot be leased (the domain says errc::unsupported).
    void publish_leases() noexcept
    {
#if MEMBACKING_OS_LINUX
        std::vector<detail::LeasePiece> pieces;
        pieces.reserve(entries_.size());
        for (const auto& [start, e] : entries_) {
            const ActiveMapping& m = e.mapping;
            detail::LeaseWindow* w =
                m.backing.is_private() ? nullptr : leases_->window(m.backing.object.identity());
            if (w != nullptr &&
                (m.backing.file_offset > w->size ||
                 m.gpa.size() > w->size - m.backing.file_offset || (m.writable && !w->writable)))
                w = nullptr;
            pieces.push_back({m.gpa.start(), m.gpa.end(),
                              w != nullptr ? w->base + m.backing.file_offset : nullptr, m.writable,
                              w});
        }
        leases_->publish(std::move(pieces));
#endif
    }

    static std::uint64_t align_up_page(std::uint64_t v)
    {
        return (v + page_size - 1) & ~(page_size - 1);
    }

    static bool holds(const Entry& e, std::uint64_t id)
    {
        return std::find(e.holders.begin(), e.holders.end(), id) != e.holders.end();
    }

    Slot* find_slot(std::uint64_t id)
    {
        for (Slot& s : mappers_)
            if (s.id == id)
                return &s;
        return nullptr;
    }

    Entry* entry_at(std::uint64_t gpa)
    {
        return entries_.containing(gpa);
    }
    const Entry* entry_at(std::uint64_t gpa) const
    {
        return entries_.containing(gpa);
    }

    /// The entry that covers exactly r, if there is one.
    Entry* exact_entry(const MemoryRange& r)
    {
        return entries_.find_exact(r);
    }

    /// The same memory at the same place with other permissions: mprotect it where it is, in
    /// every mapper that holds it. No window in which it is unmapped, and private memory keeps
    /// its contents (a replacement would drop them).
    Result<void> change_permission(Entry& e, const ActiveMapping& m, bool must_follow)
    {
        const bool was_writable = e.mapping.writable;
        if (was_writable != m.writable) {
            std::vector<Slot*> done;
            for (Slot& s : mappers_) {
                if (s.quarantined || !holds(e, s.id))
                    continue;
                if (auto r = s.mapper->va_.protect(m.gpa.start(), m.gpa.size(), m.writable); !r) {
                    if (must_follow) {
                        quarantine(s, r.error().full_message());
                        continue;
                    }
                    for (Slot* d : done)
                        if (auto u =
                                d->mapper->va_.protect(m.gpa.start(), m.gpa.size(), was_writable);
                            !u) {
                            std::string cause = r.error().full_message();
                            cause += "; restoring the permission failed: ";
                            cause += u.error().full_message();
                            quarantine(*d, cause);
                        }
                    return std::move(r).error();
                }
                done.push_back(&s);
            }
        }
        e.mapping = m;
        return {};
    }

    /// Iterates the entries overlapping r, in address order.
    template <class F>
    void for_each_overlapping(const MemoryRange& r, F&& f)
    {
        entries_.for_each_overlapping(r, std::forward<F>(f));
    }

    /// The parts of the active mappings that lie inside r.
    std::vector<ActiveMapping> pieces_in(const MemoryRange& r)
    {
        std::vector<ActiveMapping> out;
        for_each_overlapping(r, [&](const Entry& e) {
            out.push_back(e.mapping.slice(e.mapping.gpa.intersection(r)));
        });
        return out;
    }

    /// The parts inside r of the mappings mapper `id` holds.
    std::vector<ActiveMapping> held_pieces(std::uint64_t id, const MemoryRange& r)
    {
        std::vector<ActiveMapping> out;
        for_each_overlapping(r, [&](const Entry& e) {
            if (holds(e, id))
                out.push_back(e.mapping.slice(e.mapping.gpa.intersection(r)));
        });
        return out;
    }

    bool holds_any(std::uint64_t id, const MemoryRange& r)
    {
        bool any = false;
        for_each_overlapping(r, [&](const Entry& e) { any = any || holds(e, id); });
        return any;
    }

    /// Removes r from the books, keeping the parts of overlapping entries outside it (each part
    /// stays with the mappers that held the whole).
    void split_out(const MemoryRange& r)
    {
        entries_.punch(r, [](const Entry& e, const MemoryRange& part) {
            return Entry{e.mapping.slice(part), e.holders};
        });
    }

    void recompute_private()
    {
        has_private_ = std::any_of(entries_.begin(), entries_.end(), [](const auto& kv) {
            return kv.second.mapping.backing.is_private();
        });
    }

    /// Maps one active mapping into one mapper's VA, with its placement hints. On failure after
    /// the memory was mapped (its protection or NUMA binding), the range is unmapped again; if
    /// that fails too, *left_behind (if given) is set: the caller restores or quarantines.
    Result<void> map_into(VaMapper<V>& mapper, const ActiveMapping& m, bool* left_behind = nullptr)
    {
        V& va = mapper.va_;
        const std::uint64_t off = m.gpa.start();
        const std::uint64_t len = m.gpa.size();
        if (m.backing.is_private()) {
            // Private memory is committed read-write (there is nothing to map it from); a
            // read-only mapping of it is then protected, or the VMM's own accesses could write
            // what the guest and the memory map see as read-only.
            MEMBACKING_TRY(va.commit_private(off, len));
            if (!m.writable) {
                if (auto r = va.protect(off, len, false); !r) {
                    if (!va.unmap(off, len) && left_behind != nullptr)
                        *left_behind = true;
                    return std::move(r).error();
                }
            }
        } else
            MEMBACKING_TRY(
                va.map_file(off, len, m.backing.object, m.backing.file_offset, m.writable));
        // An explicit NUMA request that cannot be honoured is an error (the memory would silently
        // live on the wrong node); THP is advice the kernel may refuse (e.g. THP "never").
        if (m.policy.numa_node) {
            if (auto r = va.bind_numa(off, len, *m.policy.numa_node); !r) {
                if (!va.unmap(off, len) && left_behind != nullptr)
                    *left_behind = true;
                return std::move(r).error();
            }
        }
        if (m.policy.transparent_hugepages && !va.advise_hugepages(off, len))
            ++stats_.hint_failures;
        // Prefetch (RamBackingRequest::prefetch): the host pages are populated in eager mappers
        // (the primary is one), so neither the VMM nor a partition without its own prefetch
        // (KVM without KVM_PRE_FAULT_MEMORY) takes a host page fault on first touch. Lazy
        // mappers map on demand and are left so. Advice: a kernel that refuses is counted.
        if constexpr (requires { va.populate(off, len, m.writable); }) {
            if (m.policy.prefetch && mapper.is_eager() && !va.populate(off, len, m.writable))
                ++stats_.hint_failures;
        }
        return {};
    }

    /// What restore() does with private pieces: re-commit them (their contents are gone anyway),
    /// or leave whatever is there (an operation that failed did not touch them).
    enum class Private : std::uint8_t { recommit, leave };

    /// Puts `pieces` back into `mapper` over `range`, clearing the parts of `range` they do not
    /// cover. Used only to roll back.
    Result<void> restore(VaMapper<V>& mapper, const MemoryRange& range,
                         const std::vector<ActiveMapping>& pieces,
                         Private private_pieces = Private::recommit)
    {
        std::uint64_t cursor = range.start();
        for (const ActiveMapping& p : pieces) {
            if (p.gpa.start() > cursor)
                MEMBACKING_TRY(mapper.va_.unmap(cursor, p.gpa.start() - cursor));
            if (!p.backing.is_private() || private_pieces == Private::recommit)
                MEMBACKING_TRY(map_into(mapper, p));
            cursor = p.gpa.end();
        }
        if (cursor < range.end())
            MEMBACKING_TRY(mapper.va_.unmap(cursor, range.end() - cursor));
        return {};
    }

    std::size_t healthy_count() const
    {
        return static_cast<std::size_t>(std::count_if(
            mappers_.begin(), mappers_.end(), [](const Slot& s) { return !s.quarantined; }));
    }

    static Error quarantined_error(const Slot& s)
    {
        std::string what = "VA mapper ";
        what += std::to_string(s.id);
        what += " is quarantined: ";
        what += s.cause;
        return make_error(errc::quarantined, what);
    }

    /// Takes a mapper the host would not let us restore out of service, without any resource
    /// the failing host might refuse again being needed for the manager to go on: it leaves
    /// the books (no entry lists it as a holder, no operation touches it again), its accesses
    /// fail with errc::quarantined from their first fault (VaMapper::resolve_fault), and its
    /// range is invalidated: replaced by one PROT_NONE reservation, or else made inaccessible
    /// in place (neither splits a VMA, so neither needs a new one); if both fail, every later
    /// control operation tries again (retry_invalidations).
    void quarantine(Slot& s, const std::string& cause) noexcept
    {
        if (s.quarantined)
            return;
        s.quarantined = true;
        s.cause = cause;
        s.mapper->quarantined_.store(true, std::memory_order_release);
        for (auto& [start, e] : entries_)
            std::erase(e.holders, s.id);
        s.invalidated = invalidate(*s.mapper);
    }

    /// Maps every active mapping into `mapper` and records it as their holder; on failure it
    /// records nothing, and what it mapped is the caller's to dispose of (new_mapper,
    /// restore_mapper).
    Result<void> replay_all(VaMapper<V>& mapper)
    {
        for (auto& [start, e] : entries_)
            MEMBACKING_TRY(map_into(mapper, e.mapping));
        for (auto& [start, e] : entries_)
            e.holders.push_back(mapper.id_);
        return {};
    }

    /// Puts `pieces` back into a mapper after the operation failed with `root`; a mapper whose
    /// restore fails as well is quarantined.
    void restore_or_quarantine(Slot& s, const MemoryRange& range,
                               const std::vector<ActiveMapping>& pieces, const Error& root,
                               Private private_pieces = Private::recommit)
    {
        if (auto r = restore(*s.mapper, range, pieces, private_pieces); !r) {
            std::string cause = root.full_message();
            cause += "; restoring ";
            cause += range.to_string();
            cause += " failed: ";
            cause += r.error().full_message();
            quarantine(s, cause);
        }
    }

    /// Replaces a mapper's whole range by inaccessible memory; false if the host refused both
    /// ways.
    bool invalidate(VaMapper<V>& mapper) noexcept
    {
        V& va = mapper.va_;
        const std::uint64_t whole = align_up_page(max_addr_);
        if (va.unmap(0, whole))
            return true;
        if constexpr (requires { va.make_inaccessible(std::uint64_t{}, std::uint64_t{}); }) {
            if (va.make_inaccessible(0, whole))
                return true;
        }
        return false;
    }

    /// Tries again to invalidate the quarantined mappers the host refused it to before.
    void retry_invalidations() noexcept
    {
        for (Slot& s : mappers_)
            if (s.quarantined && !s.invalidated)
                s.invalidated = invalidate(*s.mapper);
    }

    mutable std::mutex mutex_;
    const std::uint64_t max_addr_;
    const std::uint64_t min_alignment_;
    const std::shared_ptr<DirtyBitmap> dirty_; ///< handed to every mapper (null: untracked)
    IntervalMap<Entry, RangeOfEntry> entries_; ///< the active mappings, disjoint, by GPA
    std::vector<Slot> mappers_;                ///< registration order
    std::uint64_t next_id_ = 1;
    bool has_private_ = false;
    bool shut_down_ = false;
    MappingStats stats_;
    /// The lease domain on Linux; an empty placeholder elsewhere.
#if MEMBACKING_OS_LINUX
    typename VaMapper<V>::Leases leases_ = std::make_shared<LeaseDomain>();
#else
    typename VaMapper<V>::Leases leases_{};
#endif
};

} // namespace detail

template <VaPolicy V>
VaMapper<V>::~VaMapper()
{
    if (registered_.load())
        if (auto core = core_.lock())
            core->remove_mapper(id_);
}

template <VaPolicy V>
std::optional<errc> VaMapper<V>::resolve_fault(std::uint64_t gpa, bool write) noexcept
{
    if (gpa >= size_)
        return errc::out_of_range;
    if (quarantined_.load(std::memory_order_acquire))
        return errc::quarantined;
    auto core = core_.lock();
    if (!core)
        return errc::unmapped; // the manager is gone; everything was unmapped at its shutdown
    return core->resolve_fault(*this, gpa, write);
}

/// The VA side of a guest: a VaEventSink for the region manager, and the factory of VA mappers.
template <VaPolicy V>
class MappingManager {
public:
    /// A manager for a guest address space of max_addr bytes; min_alignment is the smallest base
    /// alignment of every reservation (the largest hugetlb page size in use).
    /// `dirty`, if given, is the dirty bitmap every mapper hands to its tracked GuestMemory.
    [[nodiscard]] static Result<MappingManager>
    create(std::uint64_t max_addr, std::uint64_t min_alignment = page_size,
           std::shared_ptr<detail::DirtyBitmap> dirty = {})
    {
        if (max_addr == 0)
            return make_error(errc::invalid_argument, "guest address space size is zero");
        if (!is_power_of_two(min_alignment))
            return make_error(errc::invalid_argument, "minimum VA alignment " +
                                                          MemoryRange::hex(min_alignment) +
                                                          " is not a power of two");
        return MappingManager(
            std::make_shared<detail::MappingCore<V>>(max_addr, min_alignment, std::move(dirty)));
    }

    MappingManager(MappingManager&&) noexcept = default;
    MappingManager& operator=(MappingManager&& other) noexcept
    {
        if (this != &other) {
            shut_down();
            core_ = std::move(other.core_);
        }
        return *this;
    }
    MappingManager(const MappingManager&) = delete;
    MappingManager& operator=(const MappingManager&) = delete;
    ~MappingManager() { shut_down(); }

    /// Invalidates every mapper (their accesses fail from now on; one the host refuses to
    /// invalidate is left mapped and counted in teardown_leaks()) and forgets every mapping;
    /// new_mapper() fails afterwards. Idempotent; the destructor does it too.
    void shut_down() noexcept
    {
        if (core_)
            core_->shut_down();
    }

    /// VA mappers that the host refused to invalidate at a shutdown, left mapped, over every
    /// manager of this VA policy in the process.
    [[nodiscard]] static std::uint64_t teardown_leaks() noexcept
    {
        return detail::MappingCore<V>::teardown_leaks().load(std::memory_order_relaxed);
    }

    // VaEventSink
    Result<void> add_mapping(const ActiveMapping& m) { return core_->add_mapping(m); }
    Result<void> remove_mappings(const MemoryRange& r) { return core_->remove_mappings(r); }

    /// A new VA mapper in this process: eager ones get every mapping now and every change later.
    Result<std::shared_ptr<VaMapper<V>>> new_mapper(MapperMode mode)
    {
        return core_->new_mapper(mode);
    }
    /// Turns a lazy mapper eager (replaying what it lacks). On failure it stays lazy.
    Result<void> upgrade_to_eager(VaMapper<V>& mapper) { return core_->upgrade_to_eager(mapper); }
    /// Puts a quarantined mapper (quarantined_mappers(), by id) back in service once the host
    /// accepts calls again: an eager mapper gets every current mapping replayed over the
    /// inaccessible reservation its quarantine left, a lazy one faults them in again, and its
    /// accesses stop failing with errc::quarantined. All or nothing: if the host refuses a step,
    /// the mapper stays quarantined with its range inaccessible, and the host's error is
    /// returned. Refused with errc::quarantined while the host still refuses to invalidate the
    /// range (it may show memory from before the quarantine), and with errc::conflict while
    /// private memory is mapped (its only copy lived in the mapper that held it). A mapper that
    /// is not quarantined: nothing to do.
    Result<void> restore_mapper(std::uint64_t id) { return core_->restore_mapper(id); }

    [[nodiscard]] std::vector<ActiveMapping> mappings() const { return core_->mappings(); }
    /// Ids of the mappers whose VA holds the mapping at gpa (for tests and dumps).
    [[nodiscard]] std::vector<std::uint64_t> holders_at(std::uint64_t gpa) const
    {
        return core_->holders_at(gpa);
    }
    [[nodiscard]] std::size_t mapper_count() const { return core_->mapper_count(); }
    /// The quarantined mappers (see VaMapper::quarantined), in registration order.
    [[nodiscard]] std::vector<QuarantinedMapper> quarantined_mappers() const
    {
        return core_->quarantined_mappers();
    }
    [[nodiscard]] MappingStats stats() const { return core_->stats(); }
    [[nodiscard]] std::uint64_t max_addr() const noexcept { return core_->max_addr(); }
#if MEMBACKING_OS_LINUX
    /// Lease windows mapped and not yet retired (for tests).
    [[nodiscard]] std::size_t lease_window_count() const
    {
        return core_->lease_window_count();
    }
#endif

private:
    explicit MappingManager(std::shared_ptr<detail::MappingCore<V>> core) : core_(std::move(core))
    {}

    std::shared_ptr<detail::MappingCore<V>> core_;
};

} // namespace membacking
