/**
 * @file manager/ram_backing_request.hpp
 * Layer: manager (includes base/, va/mappable.hpp).
 *
 * RamBackingRequest: one allocation of guest RAM (one memfd, or private anonymous memory) that
 * backs one or more GPA ranges, laid out back to back in the object in ascending GPA order,
 * whatever order they are listed in (so a restore that lists them in another order sees the same
 * memory at the same GPAs). Typically one per host NUMA node, or one in total. Reference
 * inventory §2.3.
 *
 * Example:
 *     RamBackingRequest ram({MemoryRange::constant(0, std::uint64_t{2} << 30)});
 *     ram.transparent_hugepages(true).host_numa_node(0);
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/units.hpp>
#include <membacking/manager/shared_backing.hpp>
#include <membacking/va/mappable.hpp>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace membacking {

class RamBackingRequest {
public:
    /// The default hugetlb page size when hugepages are requested without one.
    static constexpr Length default_hugepage_size{std::uint64_t{2} << 20};

    explicit RamBackingRequest(std::vector<MemoryRange> ranges) : ranges_(std::move(ranges)) {}

    /// Ask partitions to populate second-level page tables when the RAM is mapped.
    RamBackingRequest& prefetch(bool on)
    {
        prefetch_ = on;
        return *this;
    }
    /// Anonymous private memory instead of a memfd: lives in one VA mapper only.
    RamBackingRequest& private_memory(bool on)
    {
        private_memory_ = on;
        return *this;
    }
    /// madvise(MADV_HUGEPAGE) on the RAM's VA (ignored with hugepages).
    RamBackingRequest& transparent_hugepages(bool on)
    {
        transparent_hugepages_ = on;
        return *this;
    }
    /// A hugetlb memfd with pages of `size` bytes (2 MiB if not given; std::nullopt: none).
    RamBackingRequest& hugepages(std::optional<Length> size = default_hugepage_size)
    {
        hugepages_ = size;
        return *this;
    }
    /// Reuse an existing object (restore / servicing); nothing is allocated. The object must
    /// hold this request's ranges in the canonical layout (ascending GPA order, back to back);
    /// nothing checks that: prefer the SharedMemoryBacking overload, which does.
    RamBackingRequest& existing_mappable(Mappable object)
    {
        existing_ = std::move(object);
        restored_layout_.reset();
        return *this;
    }
    /// Reuse a backing of an earlier manager (GuestMemoryManager::shared_memory_backings()): the
    /// build checks that this request's ranges are the GPA ranges the backing holds (in any
    /// order), and fails with build_errc::restore_layout_mismatch otherwise, since other ranges
    /// would show guest memory at the wrong GPAs.
    RamBackingRequest& existing_mappable(const SharedMemoryBacking& backing)
    {
        existing_ = backing.mappable();
        restored_layout_ =
            backing.ranges().empty() ? std::nullopt : std::optional(backing.ranges());
        return *this;
    }
    /// Bind the RAM to one host NUMA node (mbind).
    RamBackingRequest& host_numa_node(std::optional<std::uint32_t> node)
    {
        numa_node_ = node;
        return *this;
    }

    [[nodiscard]] const std::vector<MemoryRange>& ranges() const noexcept { return ranges_; }
    [[nodiscard]] bool prefetch() const noexcept { return prefetch_; }
    [[nodiscard]] bool private_memory() const noexcept { return private_memory_; }
    [[nodiscard]] bool transparent_hugepages() const noexcept { return transparent_hugepages_; }
    [[nodiscard]] const std::optional<Length>& hugepages() const noexcept { return hugepages_; }
    /// The object to reuse; empty if none was given.
    [[nodiscard]] const Mappable& existing_mappable() const noexcept { return existing_; }
    [[nodiscard]] const std::optional<std::uint32_t>& host_numa_node() const noexcept
    {
        return numa_node_;
    }
    /// The layout the existing object holds, if it came from a SharedMemoryBacking that knew it.
    [[nodiscard]] const std::optional<std::vector<MemoryRange>>& restored_layout() const noexcept
    {
        return restored_layout_;
    }

private:
    std::vector<MemoryRange> ranges_;
    bool prefetch_ = false;
    bool private_memory_ = false;
    bool transparent_hugepages_ = false;
    std::optional<Length> hugepages_;
    Mappable existing_;                                       ///< empty: allocate a new object
    std::optional<std::vector<MemoryRange>> restored_layout_; ///< canonical, if known
    std::optional<std::uint32_t> numa_node_;
};

} // namespace membacking
