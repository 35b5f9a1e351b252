/**
 * @file lease/lease_window.hpp
 * Layer: lease (includes base/, detail/).
 *
 * LeaseWindow: one mappable object mapped once, whole and MAP_SHARED, in this process, for
 * leases to point into (lease/lease.hpp). It is not a VA mapper's range: topology changes never
 * touch it, so memory reached through a lease stays the object's memory whatever the guest's
 * layout becomes. The lease domain (lease/lease_domain.hpp) creates a window on the control path
 * when an object first becomes leasable.
 *
 * Who keeps it mapped: the domain's registry while the object is in an active mapping, and every
 * lease table that has a piece in it (one reference per piece). Leases never count on windows
 * themselves: a lease holds its table's generation, and the generation its table (deferred
 * reclamation: the control path never waits for a lease). Whoever drops the last reference (the
 * control path, or the thread that releases the last lease of an old table) unmaps the window
 * and frees it. These counts change on the control path and when a table is freed, never on a
 * lease's fast path.
 */
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace membacking::detail {

struct LeaseWindow {
    /// How the VA policy that mapped the window unmaps it (cold: once per window).
    using Unmap = void (*)(std::byte* base, std::uint64_t size) noexcept;

    /// A window with one reference: the registry's.
    LeaseWindow(std::byte* b, std::uint64_t s, bool w, Unmap u) noexcept
        : base(b), size(s), writable(w), unmap(u)
    {}
    LeaseWindow(const LeaseWindow&) = delete;
    LeaseWindow& operator=(const LeaseWindow&) = delete;
    ~LeaseWindow() { unmap(base, size); }

    /// Takes one more reference (a table's piece; the caller holds one already).
    static void hold(LeaseWindow* w) noexcept { w->refs.fetch_add(1, std::memory_order_relaxed); }
    /// Drops one reference; the last one unmaps and frees the window.
    static void drop(LeaseWindow* w) noexcept
    {
        if (w->refs.fetch_sub(1, std::memory_order_acq_rel) == 1)
            delete w;
    }

    std::byte* const base;
    const std::uint64_t size;
    const bool writable; ///< mapped read-write (a read-only file is mapped read-only)
    const Unmap unmap;
    std::atomic<std::size_t> refs{1};
};

} // namespace membacking::detail
