/**
 * @file guest_memory.hpp
 * Layer: guest_memory (includes base/, access/, lease/). Knows nothing of the region manager.
 *
 * The access API, in two types bound to one VA mapper:
 * - GuestMemoryView<Mapper>: base pointer, size, GPA base and the mapper (for the slow path). It
 *   owns nothing and is trivially copyable: passing it costs four registers, no atomic reference
 *   count. It must not outlive an owning handle of the same mapper.
 * - GuestMemory<Mapper>: a GuestMemoryView plus a shared reference that keeps the mapper (and so
 *   its reservation) alive. Copying it costs one atomic increment.
 * Both run accesses at the same speed. (For hot loops: keep the handle or view in a non-const
 * local. GCC 12's scalar replacement refuses const local aggregates, and then reloads base and
 * size from the stack after every store; bench/guest_access.cpp measured 1.5x from that alone.)
 *
 * Addresses are strong types (base/units.hpp). The handles over the whole guest take a Gpa. A
 * window made by subrange() is addressed by Offset from the window's start (its second template
 * argument is Offset), so a GPA cannot be passed to a window by mistake, nor a window offset to
 * the whole guest; errors always name the absolute GPA.
 *
 * read() and write() take any contiguous range of trivially copyable elements (std::span of any
 * such T, std::vector, std::array, a C array, std::string; for write also std::string_view and
 * string literals, whose terminating NUL is part of the array): the bytes it spans are copied.

 * The journey of an access, e.g. read(gpa, dst):
 *   1. bounds check against the handle's size (an out-of-range access is an error, not a fault);
 *   2. one guarded primitive on base + gpa (access/primitives.hpp);
 *   3. success: done. No lock, no allocation, no call through a pointer, no system call.
 *   4. fault (cold, out of line): the fault address says how far the access got; the mapper's
 *      resolve_fault decides: a lazy mapper maps the missing memory and the access resumes where
 *      it stopped; an eager mapper, a gap, or a write to read-only memory gives an AccessError
 *      naming the GPA, the direction and the bytes already done.
 *
 * A guest can therefore never crash the VMM through this API: unmapped, read-only, truncated
 * (SIGBUS) and torn-down memory all come back as errors.
 *
 * Atomics (compare_exchange, fetch_*) need natural alignment; a misaligned one is an error
 * (errc::invalid_argument), because a locked access across a cache line is slow at best and a
 * bus error where split-lock detection is on.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS

#    include <membacking/access/access_result.hpp>
#    include <membacking/access/dirty_tracking.hpp>
#    include <membacking/access/primitives.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/base/units.hpp>

#    if MEMBACKING_OS_LINUX
#        include <membacking/lease/lease.hpp>
#    endif

#    include <algorithm>
#    include <concepts>
#    include <cstddef>
#    include <cstdint>
#    include <memory>
#    include <optional>
#    include <ranges>
#    include <span>
#    include <type_traits>
#    include <utility>

namespace membacking {

/// What GuestMemory needs from the mapper it is bound to.
// clang-format off
template <class M>
concept GuestMemoryBacking = requires(const M& cm, M& m, std::uint64_t gpa, bool write) {
    {
        cm.base()
    }
    noexcept->std::same_as<std::byte*>;
    {
        cm.size()
    }
    noexcept->std::same_as<std::uint64_t>;
    {
        m.resolve_fault(gpa, write)
    }
    noexcept->std::same_as<std::optional<errc>>;
};

/// A value that can be read from or written to guest memory as bytes.
template <class T>
concept GuestValue = std::is_trivially_copyable_v<T>;

/// An integer that atomic operations work on: 1, 2, 4 or 8 bytes.
template <class T>
concept GuestInteger = std::integral<T> && access::AtomicSized<T>;

/// What read() fills: a contiguous range of trivially copyable, writable elements.
template <class R>
concept GuestReadBuffer = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
    GuestValue<std::ranges::range_value_t<R>> &&
    !std::is_const_v<std::remove_reference_t<std::ranges::range_reference_t<R>>>;

/// What write() copies from: a contiguous range of trivially copyable elements.
template <class R>
concept GuestWriteBuffer = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
    GuestValue<std::ranges::range_value_t<R>>;

/// How a view is addressed: Gpa over the whole guest, Offset inside a window (subrange).
template <class A>
concept GuestAddress = std::same_as<A, Gpa> || std::same_as<A, Offset>;
// clang-format on

template <GuestMemoryBacking Mapper, GuestAddress Address, DirtyTrackingPolicy Tracking>
class GuestMemory;

template <GuestMemoryBacking Mapper, GuestAddress Address = Gpa,
          DirtyTrackingPolicy Tracking = NoDirtyTracking>
class GuestMemoryView {
public:
    /// An empty view: every access is out of range.
    GuestMemoryView() noexcept = default;

    /// A view of the mapper's whole guest address space; the caller keeps the mapper alive.
    explicit GuestMemoryView(Mapper& mapper) noexcept requires std::same_as<Address, Gpa>
        : base_(mapper.base()), size_(mapper.size()), mapper_(&mapper), marker_(mapper)
    {
        static_assert(std::is_trivially_copyable_v<GuestMemoryView>);
        static_assert(!std::is_polymorphic_v<GuestMemoryView>,
                      "the access path has no virtual calls");
        access::install_fault_handler();
    }

    /// No view of a temporary owning handle: it would dangle at the end of the statement (the
    /// handle's mapper and reservation go with it). Keep the handle in a variable first.
    GuestMemoryView(GuestMemory<Mapper, Address, Tracking>&&) = delete;
    GuestMemoryView(const GuestMemory<Mapper, Address, Tracking>&&) = delete;

    /// The number of bytes this view spans: addresses Address{0} to Address{size() - 1}.
    [[nodiscard]] Length size() const noexcept { return Length(size_); }
    /// The absolute GPA of this view's first byte (0 for the whole guest; a window's start).
    [[nodiscard]] Gpa gpa_base() const noexcept { return Gpa(gpa_base_); }
    [[nodiscard]] Mapper* mapper() const noexcept { return mapper_; }

    /// Copies guest memory at `at` into dst (every byte of it).
    template <GuestReadBuffer Buffer>
    AccessResult<> read(Address at, Buffer&& dst) const noexcept
    {
        const std::span<std::byte> bytes = std::as_writable_bytes(std::span(dst));
        std::byte* out = bytes.data();
        const std::uint64_t gpa = at.value();
        return bulk(gpa, bytes.size(), AccessKind::read,
                    [out, p = base_, gpa](std::uint64_t off, std::uint64_t n) noexcept {
                        return access::try_copy(out + off, p + gpa + off, n);
                    });
    }

    /// Copies src (every byte of it) into guest memory at `at`.
    template <GuestWriteBuffer Buffer>
    AccessResult<> write(Address at, const Buffer& src) const noexcept
    {
        const std::span<const std::byte> bytes = std::as_bytes(std::span(src));
        const std::byte* in = bytes.data();
        const std::uint64_t gpa = at.value();
        return marked(gpa, bytes.size(),
                      bulk(gpa, bytes.size(), AccessKind::write,
                           [in, p = base_, gpa](std::uint64_t off, std::uint64_t n) noexcept {
                               return access::try_copy(p + gpa + off, in + off, n);
                           }));
    }

    /// Sets len bytes of guest memory at `at` to value.
    AccessResult<> fill(Address at, std::uint8_t value, Length len) const noexcept
    {
        const std::uint64_t gpa = at.value();
        return marked(gpa, len.value(),
                      bulk(gpa, len.value(), AccessKind::write,
                           [value, p = base_, gpa](std::uint64_t off, std::uint64_t n) noexcept {
                               return access::try_fill(p + gpa + off, value, n);
                           }));
    }

    /// Reads a T. Sizes 1, 2, 4 and 8 are one load (no tearing when aligned); others a copy.
    /// The address usually comes from the guest: handle the error (value_or, if), because
    /// operator* and value() on an error abort the VMM.
    template <GuestValue T>
    AccessResult<T> read_plain(Address at) const noexcept
    {
        if constexpr (access::AtomicSized<T>) {
            return single<T>(
                at.value(), sizeof(T), AccessKind::read,
                [](std::byte* p, T& out) noexcept { return access::try_load(p, out); });
        } else {
            T value;
            auto r = read(at, std::span<T, 1>(&value, 1));
            if (!r) [[unlikely]]
                return r.error();
            return value;
        }
    }

    /// Writes a T. Sizes 1, 2, 4 and 8 are one store; others a copy.
    template <GuestValue T>
    AccessResult<> write_plain(Address at, const T& value) const noexcept
    {
        if constexpr (access::AtomicSized<T>) {
            auto r = single<Done>(
                at.value(), sizeof(T), AccessKind::write,
                [value](std::byte* p, Done&) noexcept { return access::try_store(p, value); });
            if (!r) [[unlikely]]
                return r.error();
            if constexpr (Tracking::enabled)
                marker_.template mark_one<sizeof(T), false>(gpa_base_ + at.value());
            return {};
        } else {
            return write(at, std::span<const T, 1>(&value, 1));
        }
    }

    /// Sequentially consistent compare-exchange of a naturally aligned 1/2/4/8-byte T.
    template <access::AtomicSized T>
    AccessResult<CompareExchangeOutcome<T>> compare_exchange(Address at, T expected,
                                                             T desired) const noexcept
    {
        const std::uint64_t gpa = at.value();
        if (!is_aligned_for<T>(gpa)) [[unlikely]]
            return misaligned(view(), gpa);
        auto r = single<CompareExchangeOutcome<T>>(
            gpa, sizeof(T), AccessKind::write,
            [expected, desired](std::byte* p, CompareExchangeOutcome<T>& out) noexcept {
                T seen = expected;
                bool swapped = false;
                if (!access::try_compare_exchange(p, seen, desired, swapped))
                    return false;
                out = {swapped, seen};
                return true;
            });
        if constexpr (Tracking::enabled)
            if (r && r.value().exchanged) // a failed compare-exchange changed no byte
                marker_.template mark_one<sizeof(T), true>(gpa_base_ + gpa);
        return r;
    }

    /// Atomic read-modify-write operations on a naturally aligned integer; each returns the old
    /// value. fetch_add is one `lock xadd`; the bitwise ones are a compare-exchange loop.
    template <GuestInteger T>
    AccessResult<T> fetch_add(Address at, T addend) const noexcept
    {
        using U = std::make_unsigned_t<T>;
        const std::uint64_t gpa = at.value();
        if (!is_aligned_for<T>(gpa)) [[unlikely]]
            return misaligned(view(), gpa);
        auto r =
            single<T>(gpa, sizeof(T), AccessKind::write, [addend](std::byte* p, T& out) noexcept {
                U old{};
                if (!access::try_fetch_add(p, static_cast<U>(addend), old))
                    return false;
                out = static_cast<T>(old);
                return true;
            });
        if constexpr (Tracking::enabled)
            if (r)
                marker_.template mark_one<sizeof(T), true>(gpa_base_ + gpa);
        return r;
    }
    template <GuestInteger T>
    AccessResult<T> fetch_sub(Address at, T value) const noexcept
    {
        using U = std::make_unsigned_t<T>;
        return fetch_add<T>(at, static_cast<T>(U{0} - static_cast<U>(value)));
    }
    template <GuestInteger T>
    AccessResult<T> fetch_or(Address at, T bits) const noexcept
    {
        return fetch_update<T>(at.value(), [bits](T v) { return static_cast<T>(v | bits); });
    }
    template <GuestInteger T>
    AccessResult<T> fetch_and(Address at, T bits) const noexcept
    {
        return fetch_update<T>(at.value(), [bits](T v) { return static_cast<T>(v & bits); });
    }
    template <GuestInteger T>
    AccessResult<T> fetch_xor(Address at, T bits) const noexcept
    {
        return fetch_update<T>(at.value(), [bits](T v) { return static_cast<T>(v ^ bits); });
    }

#    if MEMBACKING_OS_LINUX
    /// A lease of [at, at + len) for zero-copy I/O (lease/lease.hpp: what it holds, and why
    /// topology changes never wait for it). Errors: errc::out_of_range outside this view,
    /// errc::unmapped naming the first GPA that is not mapped, errc::read_only for a write lease
    /// of read-only memory, errc::unsupported for private memory. Works the same through every
    /// mapper of a guest, lazy or eager: it never touches the mapper's VA. No lock, no system
    /// call, and no allocation up to Lease::inline_pieces pieces.
    [[nodiscard]] Result<Lease> lease(Address at, Length len, LeaseAccess access) const requires
        requires(const Mapper& m)
    {
        m.leases();
    }
    {
        const std::uint64_t start = at.value();
        if (mapper_ == nullptr || !in_bounds(start, len.value())) [[unlikely]]
            return lease_outside(gpa_base_, size_, start, len);
        if constexpr (Tracking::enabled) {
            auto lease = mapper_->leases().take(gpa_base_ + start, len.value(), access);
            if (lease && lease_writes(access))
                lease->mark_on_release(mapper_->dirty_bitmap_owner());
            return lease;
        } else {
            return mapper_->leases().take(gpa_base_ + start, len.value(), access);
        }
    }

    /// lease()'s error for a range outside this handle (out of line: keeps lease() small).
    [[nodiscard]] MEMBACKING_NOINLINE MEMBACKING_COLD static Error
    lease_outside(std::uint64_t gpa_base, std::uint64_t size, std::uint64_t start, Length len)
    {
        return make_error(errc::out_of_range,
                          "cannot lease " + to_string(len) + " bytes at " +
                              MemoryRange::hex(gpa_base + start) + ": outside guest memory " +
                              MemoryRange::hex(gpa_base) + "+" + MemoryRange::hex(size));
    }

    /// How much of [at, at + len) is mapped, and writable, from `at` on (prefix lengths; the
    /// part outside this view counts as unmapped). No copy, no allocation, no lock.
    [[nodiscard]] RangeProbe probe(Address at, Length len) const noexcept requires
        requires(const Mapper& m)
    {
        m.leases();
    }
    {
        const std::uint64_t start = at.value();
        if (mapper_ == nullptr || start >= size_)
            return {};
        const std::uint64_t n = std::min(len.value(), size_ - start);
        return mapper_->leases().probe(gpa_base_ + start, n);
    }
#    endif

    /// A window over [at, at + len) of this view, addressed by Offset from `at`.
    [[nodiscard]] Result<GuestMemoryView<Mapper, Offset, Tracking>> subrange(Address at,
                                                                             Length len) const
    {
        const std::uint64_t start = at.value();
        if (!in_bounds(start, len.value()))
            return make_error(errc::out_of_range, "subrange of " + to_string(len) + " bytes at " +
                                                      MemoryRange::hex(gpa_base_ + start) +
                                                      " lies outside guest memory " +
                                                      MemoryRange::hex(gpa_base_) + "+" +
                                                      MemoryRange::hex(size_));
        GuestMemoryView<Mapper, Offset, Tracking> window;
        window.base_ = base_ + start;
        window.size_ = len.value();
        window.gpa_base_ = gpa_base_ + start;
        window.mapper_ = mapper_;
        window.marker_ = marker_;
        return window;
    }

private:
    template <GuestMemoryBacking, GuestAddress, DirtyTrackingPolicy>
    friend class GuestMemoryView;

    /// A bulk write's result, after marking what it wrote: all of it, or the part a faulting
    /// write completed. Untracked, this is the result itself.
    MEMBACKING_ALWAYS_INLINE AccessResult<> marked(std::uint64_t gpa, std::uint64_t len,
                                                   AccessResult<> r) const noexcept
    {
        if constexpr (Tracking::enabled)
            marker_.mark(gpa_base_ + gpa, r ? len : r.error().completed.value());
        return r;
    }

    /// The result type of single-instruction operations that produce no value.
    struct Done {};

    /// How often one address may fault again right after resolve_fault said "retry" (a race with
    /// a concurrent change) before the access gives up.
    static constexpr int max_retries_per_address = 3;

    [[nodiscard]] bool in_bounds(std::uint64_t gpa, std::uint64_t len) const noexcept
    {
        return len <= size_ && gpa <= size_ - len;
    }

    /// The handle's fields as plain values, for the cold paths. Passing these instead of `this`
    /// keeps the handle's address from escaping, so a hot loop keeps base and size in registers
    /// across anything that clobbers memory (measured: 2 reloads per access otherwise).
    struct View {
        std::byte* base;
        std::uint64_t gpa_base;
        Mapper* mapper;

        [[nodiscard]] AccessError error_at(errc code, std::uint64_t gpa, std::uint64_t done,
                                           AccessKind kind) const noexcept
        {
            return {code, kind, Gpa(gpa_base + gpa), Length(done)};
        }
    };
    [[nodiscard]] View view() const noexcept { return {base_, gpa_base_, mapper_}; }

    [[nodiscard]] AccessError error_at(errc code, std::uint64_t gpa, std::uint64_t done,
                                       AccessKind kind) const noexcept
    {
        return view().error_at(code, gpa, done, kind);
    }

    template <class T>
    [[nodiscard]] bool is_aligned_for(std::uint64_t gpa) const noexcept
    {
        return (reinterpret_cast<std::uintptr_t>(base_) + gpa) % sizeof(T) == 0;
    }
    [[nodiscard]] MEMBACKING_NOINLINE MEMBACKING_COLD static AccessError
    misaligned(View v, std::uint64_t gpa) noexcept
    {
        return v.error_at(errc::invalid_argument, gpa, 0, AccessKind::write);
    }

    /// The fault that just happened inside [start, start + len), as an offset; or nullopt if it
    /// was outside (in the caller's own buffer). A fault reported without an address (#GP) is
    /// blamed on `fallback`.
    [[nodiscard]] static std::optional<std::uint64_t>
    fault_offset(std::uintptr_t start, std::uint64_t len, std::uint64_t fallback) noexcept
    {
        const std::uintptr_t a = access::last_fault().address;
        if (a >= start && a - start < len)
            return a - start;
        if (a == 0)
            return fallback;
        return std::nullopt;
    }

    /// A copy or fill of [gpa, gpa+len): op(off, n) runs the primitive on the part at off.
    /// Op captures by value only, so nothing of it needs memory on the fast path.
    template <class Op>
    MEMBACKING_ALWAYS_INLINE AccessResult<> bulk(std::uint64_t gpa, std::uint64_t len,
                                                 AccessKind kind, Op op) const noexcept
    {
        if (!in_bounds(gpa, len)) [[unlikely]]
            return error_at(errc::out_of_range, gpa, 0, kind);
        if (op(0, len)) [[likely]]
            return {};
        return bulk_fault(view(), gpa, len, kind, op);
    }

    /// The cold path of a bulk access: resolve each fault and resume where the access stopped.
    template <class Op>
    MEMBACKING_NOINLINE MEMBACKING_COLD static AccessResult<>
    bulk_fault(View v, std::uint64_t gpa, std::uint64_t len, AccessKind kind, Op op) noexcept
    {
        const auto start = reinterpret_cast<std::uintptr_t>(v.base + gpa);
        std::uint64_t done = 0; // where the attempt that just faulted started
        std::uintptr_t previous = 0;
        int repeats = 0;
        for (;;) {
            // The completed prefix comes from RCX, not from the fault address: the CPU may
            // fault ahead of its architectural progress (see FaultRecord::remaining).
            const std::uint64_t left = len - done;
            const std::uint64_t progress =
                done + (left - std::min<std::uint64_t>(access::last_fault().remaining, left));
            // A fault reported without an address (#GP) is blamed on the progress point.
            const auto at = fault_offset(start + done, left, progress - done);
            if (!at) // the fault was in the caller's own buffer, not in guest memory
                return v.error_at(errc::invalid_argument, gpa + progress, progress, kind);
            const std::uint64_t off = done + *at; // the guest byte that faulted
            const std::uintptr_t addr = start + off;
            repeats = addr == previous ? repeats + 1 : 0;
            previous = addr;
            if (repeats > max_retries_per_address)
                return v.error_at(errc::unmapped, gpa + off, progress, kind);
            if (auto code =
                    v.mapper->resolve_fault(v.gpa_base + gpa + off, kind == AccessKind::write))
                return v.error_at(*code, gpa + off, progress, kind);
            done = progress;
            if (op(done, len - done))
                return {};
        }
    }

    /// A single-instruction access of `size` bytes at gpa, all or nothing: op(address, out) runs
    /// the primitive and stores its result in out. Op captures at most two words, by value, so
    /// it travels in registers even to the cold path.
    template <class R, class Op>
    MEMBACKING_ALWAYS_INLINE AccessResult<R> single(std::uint64_t gpa, std::uint64_t size,
                                                    AccessKind kind, Op op) const noexcept
    {
        if (!in_bounds(gpa, size)) [[unlikely]]
            return error_at(errc::out_of_range, gpa, 0, kind);
        R out;
        if (op(base_ + gpa, out)) [[likely]]
            return out;
        return single_fault<R>(view(), gpa, size, kind, op);
    }

    /// The cold path of a single access: resolve the fault and run it again from scratch.
    template <class R, class Op>
    MEMBACKING_NOINLINE MEMBACKING_COLD static AccessResult<R>
    single_fault(View v, std::uint64_t gpa, std::uint64_t size, AccessKind kind, Op op) noexcept
    {
        const auto start = reinterpret_cast<std::uintptr_t>(v.base + gpa);
        std::uintptr_t previous = 0;
        int repeats = 0;
        for (;;) {
            const std::uint64_t at = fault_offset(start, size, 0).value_or(0);
            repeats = start + at == previous ? repeats + 1 : 0;
            previous = start + at;
            if (repeats > max_retries_per_address)
                return v.error_at(errc::unmapped, gpa + at, 0, kind);
            if (auto code =
                    v.mapper->resolve_fault(v.gpa_base + gpa + at, kind == AccessKind::write))
                return v.error_at(*code, gpa + at, 0, kind);
            R out;
            if (op(v.base + gpa, out))
                return out;
        }
    }

    template <class T, class F>
    AccessResult<T> fetch_update(std::uint64_t gpa, F update) const noexcept
    {
        if (!is_aligned_for<T>(gpa)) [[unlikely]]
            return misaligned(view(), gpa);
        auto r =
            single<T>(gpa, sizeof(T), AccessKind::write, [update](std::byte* p, T& out) noexcept {
                T seen;
                if (!access::try_load(p, seen))
                    return false;
                for (;;) {
                    bool swapped = false;
                    const T expected = seen;
                    if (!access::try_compare_exchange(p, seen, update(expected), swapped))
                        return false;
                    if (swapped) {
                        out = expected;
                        return true;
                    }
                }
            });
        if constexpr (Tracking::enabled)
            if (r)
                marker_.template mark_one<sizeof(T), true>(gpa_base_ + gpa);
        return r;
    }

    std::byte* base_ = nullptr;
    std::uint64_t size_ = 0;
    std::uint64_t gpa_base_ = 0;
    Mapper* mapper_ = nullptr;
    /// Empty unless tracked: an untracked view is the four words above.
    [[no_unique_address]] typename Tracking::Marker marker_;
};

/// The owning handle: a GuestMemoryView that also keeps its mapper alive. All access methods
/// are the view's. For hot loops, take view() once and access through it.
template <GuestMemoryBacking Mapper, GuestAddress Address = Gpa,
          DirtyTrackingPolicy Tracking = NoDirtyTracking>
class GuestMemory : public GuestMemoryView<Mapper, Address, Tracking> {
    using View = GuestMemoryView<Mapper, Address, Tracking>;

public:
    /// Marks the handle as an owner of the views it hands out (base/result.hpp, OwnerOfViews).
    using owner_of_views = void;

    /// An empty handle: every access is out of range.
    GuestMemory() noexcept = default;

    /// A handle over the mapper's whole guest address space.
    explicit GuestMemory(
        std::shared_ptr<Mapper> mapper) noexcept requires std::same_as<Address, Gpa>
        : View(*mapper), owner_(std::move(mapper))
    {
        static_assert(!std::is_polymorphic_v<GuestMemory>, "the access path has no virtual calls");
    }

    /// The non-owning view, valid while this handle (or another owner of the mapper) lives.
    [[nodiscard]] View view() const& noexcept MEMBACKING_LIFETIMEBOUND { return *this; }
    /// Not on a temporary handle: the view would dangle at the end of the statement.
    View view() const&& = delete;

    /// The mapper, shared.
    [[nodiscard]] const std::shared_ptr<Mapper>& owner() const noexcept { return owner_; }

    /// An owning window over [at, at + len) of this handle, addressed by Offset from `at`.
    [[nodiscard]] Result<GuestMemory<Mapper, Offset, Tracking>> subrange(Address at,
                                                                         Length len) const
    {
        auto sub = View::subrange(at, len);
        if (!sub)
            return std::move(sub).error();
        GuestMemory<Mapper, Offset, Tracking> out;
        static_cast<GuestMemoryView<Mapper, Offset, Tracking>&>(out) = *sub;
        out.owner_ = owner_;
        return out;
    }

private:
    template <GuestMemoryBacking, GuestAddress, DirtyTrackingPolicy>
    friend class GuestMemory;

    std::shared_ptr<Mapper> owner_;
};

} // namespace membacking

#endif // MEMBACKING_HAS_GUARDED_ACCESS
