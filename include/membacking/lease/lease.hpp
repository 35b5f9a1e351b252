/**
 * @file lease/lease.hpp
 * Layer: lease (includes base/, detail/, lease/). The whole body is Linux-only (iovec).
 *
 * Lease: host memory behind a guest range, for zero-copy I/O (readv/writev/preadv/pwritev,
 * io_uring): GuestMemory::lease(gpa, len, access) returns one (guest_memory.hpp). Move-only and
 * RAII: the memory is valid from the moment the lease is taken until it is released (destroyed,
 * moved from into another lease that is destroyed, or reset()).
 *
 * Teardown semantics (the lead's decision): teardown never waits for leases.
 * - A lease's spans point into per-object lease windows (lease/lease_window.hpp), not into a VA
 *   mapper's range. A topology change (unmap, remap, move, visibility) proceeds at once, and a
 *   device access through a lease taken before it still reaches the pages of the object that
 *   were mapped at that GPA when the lease was taken: a late write lands in the memory it was
 *   meant for, and is visible through that object (and wherever the object is mapped), never
 *   through whatever the GPA maps now.
 * - The guest's own access follows the manager: partitions and VA mappers change as they always
 *   do; a lease gives the guest nothing.
 * - A stuck lease stalls nothing. It pins the generation of the lease table it was taken from
 *   (lease/lease_generation.hpp), and with it that table's windows' address space (and the
 *   object's pages, through the mapping), until it is released. A window is unmapped once its
 *   object is in no active mapping and no pinned table names it.
 * - Leases that outlive their manager stay valid until released.
 *
 * spans() and iovecs() list the same pieces in GPA order: one per run of guest memory that is
 * contiguous in one object. The span array and the iovec array are the lease's own (up to
 * inline_pieces pieces without an allocation).
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/units.hpp>
#    include <membacking/lease/lease_generation.hpp>

#    include <array>
#    include <cstddef>
#    include <cstdint>
#    include <memory>
#    include <new>
#    include <span>
#    include <sys/uio.h>
#    include <utility>

namespace membacking {

namespace detail {
class LeaseDomain;
} // namespace detail

/// What a lease is for: device reads of guest memory (read), device writes into it (write), or
/// both. A write or read_write lease of read-only memory is refused.
enum class LeaseAccess : std::uint8_t { read = 1, write = 2, read_write = 3 };

[[nodiscard]] constexpr bool lease_writes(LeaseAccess a) noexcept
{
    return (static_cast<unsigned>(a) & static_cast<unsigned>(LeaseAccess::write)) != 0;
}

/// What probe() says about a range: how many bytes from its start are mapped, and how many of
/// those are writable (both are prefixes: mapped is where the first gap begins, writable where
/// the first read-only or unmapped byte is). mapped == the range's length: fully mapped.
struct RangeProbe {
    Length mapped;
    Length writable;
    friend bool operator==(const RangeProbe&, const RangeProbe&) noexcept = default;
};

class Lease {
public:
    /// Pieces a lease holds without allocating.
    static constexpr std::size_t inline_pieces = 4;

    /// An empty lease: no pieces. User-provided on purpose: a defaulted one would make `Lease()`
    /// (value-initialisation, as in the domain's in-place Result) zero the whole object first.
    // NOLINTNEXTLINE(modernize-use-equals-default)
    Lease() noexcept {}
    Lease(Lease&& other) noexcept { take_from(other); }
    Lease& operator=(Lease&& other) noexcept
    {
        if (this != &other) {
            reset();
            take_from(other);
        }
        return *this;
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { reset(); }

    /// The host memory, one span per piece, in GPA order.
    [[nodiscard]] std::span<const std::span<std::byte>> spans() const noexcept
    {
        return {spans_ptr(), count_};
    }
    /// The same pieces as iovecs, for readv/writev/preadv/pwritev and io_uring.
    [[nodiscard]] std::span<const iovec> iovecs() const noexcept { return {iovs_ptr(), count_}; }

    [[nodiscard]] Gpa gpa() const noexcept { return gpa_; }
    [[nodiscard]] Length size() const noexcept { return size_; }
    [[nodiscard]] LeaseAccess access() const noexcept { return access_; }
    [[nodiscard]] bool empty() const noexcept { return count_ == 0; }

    /// Releases the memory now (the destructor does the same): one atomic decrement.
    void reset() noexcept
    {
        if (generation_ != nullptr) {
            detail::LeaseGeneration::drop(generation_, shard_);
            generation_ = nullptr;
        }
        count_ = 0;
        heap_.reset();
    }

private:
    friend class detail::LeaseDomain;

    /// The arrays of a lease with more than inline_pieces pieces, allocated together.
    struct Heap {
        explicit Heap(std::size_t n)
            : spans(new (std::nothrow) std::span<std::byte>[n]), iovs(new (std::nothrow) iovec[n])
        {}
        [[nodiscard]] bool ok() const noexcept { return spans && iovs; }
        std::unique_ptr<std::span<std::byte>[]> spans;
        std::unique_ptr<iovec[]> iovs;
    };

    [[nodiscard]] const std::span<std::byte>* spans_ptr() const noexcept
    {
        return heap_ ? heap_->spans.get() : inline_spans_.items.data();
    }
    [[nodiscard]] const iovec* iovs_ptr() const noexcept
    {
        return heap_ ? heap_->iovs.get() : inline_iovs_.data();
    }
    [[nodiscard]] std::span<std::byte>* spans_ptr() noexcept
    {
        return heap_ ? heap_->spans.get() : inline_spans_.items.data();
    }
    [[nodiscard]] iovec* iovs_ptr() noexcept
    {
        return heap_ ? heap_->iovs.get() : inline_iovs_.data();
    }

    /// Gives the lease room for n pieces (the domain calls it before filling). False: no memory.
    [[nodiscard]] bool reserve(std::size_t n) noexcept
    {
        if (n <= inline_pieces)
            return true;
        auto* h = new (std::nothrow) Heap(n);
        if (h == nullptr || !h->ok()) {
            delete h;
            return false;
        }
        heap_.reset(h);
        return true;
    }

    void take_from(Lease& other) noexcept
    {
        heap_ = std::move(other.heap_);
        count_ = std::exchange(other.count_, 0);
        if (!heap_) // only the pieces in use: the rest of the inline arrays is never read
            for (std::size_t i = 0; i < count_; ++i) {
                inline_spans_.items[i] = other.inline_spans_.items[i];
                inline_iovs_[i] = other.inline_iovs_[i];
            }
        generation_ = std::exchange(other.generation_, nullptr);
        shard_ = other.shard_;
        gpa_ = other.gpa_;
        size_ = other.size_;
        access_ = other.access_;
    }

    /// Storage for the inline spans that a lease does not initialise (std::span's default
    /// constructor would zero them on every lease): only the first count_ pieces are ever read,
    /// and the domain writes them before it sets count_.
    union InlineSpans {
        // NOLINTNEXTLINE(modernize-use-equals-default): = default would initialise `items`
        InlineSpans() noexcept {}
        std::array<std::span<std::byte>, inline_pieces> items;
    };

    InlineSpans inline_spans_;
    std::array<iovec, inline_pieces> inline_iovs_; ///< not initialised either (a trivial type)
    std::unique_ptr<Heap> heap_;
    std::size_t count_ = 0;
    detail::LeaseGeneration* generation_ = nullptr; ///< the table generation it pins, or nullptr
    std::size_t shard_ = 0;                         ///< the shard that pin was taken on
    Gpa gpa_{};
    Length size_{};
    LeaseAccess access_ = LeaseAccess::read;
};

} // namespace membacking

#endif // MEMBACKING_OS_LINUX
