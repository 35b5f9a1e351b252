/**
 * @file lease/lease_window.hpp
 * Layer: lease (includes base/, detail/).
 *
 * LeaseWindow: one mappable object mapped once, whole and MAP_SHARED, in this process, for
 * leases to point into (lease/lease.hpp). It is not a VA mapper's range: topology changes never
 * touch it, so memory reached through a lease stays the object's memory whatever the guest's
 * layout becomes. The lease domain (lease/lease_domain.hpp) creates a window on the control path
 * when an object first becomes leasable and retires it when the object leaves every active
 * mapping; the window then lives until its last lease is released (deferred reclamation: the
 * control path never waits for a lease), and whoever drops the last reference unmaps it and
 * frees it (drop()).
 */
#pragma once

#include <membacking/detail/retirable_ref.hpp>

#include <cstddef>
#include <cstdint>

namespace membacking::detail {

struct LeaseWindow {
    /// How the VA policy that mapped the window unmaps it (cold: once per window).
    using Unmap = void (*)(std::byte* base, std::uint64_t size) noexcept;

    LeaseWindow(std::byte* b, std::uint64_t s, bool w, Unmap u) noexcept
        : base(b), size(s), writable(w), unmap(u)
    {}
    LeaseWindow(const LeaseWindow&) = delete;
    LeaseWindow& operator=(const LeaseWindow&) = delete;
    ~LeaseWindow() { unmap(base, size); }

    /// Drops one reference taken on `shard`; the last one after retirement frees the window.
    static void drop(LeaseWindow* w, std::size_t shard) noexcept
    {
        if (w->refs.release(shard)) [[unlikely]]
            delete w;
    }
    /// Retires the window (no reference may be taken any more); frees it if none is held.
    static void retire(LeaseWindow* w) noexcept
    {
        if (w->refs.retire())
            delete w;
    }

    std::byte* const base;
    const std::uint64_t size;
    const bool writable; ///< mapped read-write (a read-only file is mapped read-only)
    const Unmap unmap;
    RetirableRef refs;
};

} // namespace membacking::detail
