/**
 * @file partition/partition_mapper.hpp
 * Layer: partition (includes base/ only).
 *
 * The PartitionMapper concept: a hypervisor partition that guest memory is pushed into (KVM, WHP,
 * the mock). Partitions never see individual mappings: they map whole active regions by host
 * virtual address, pointing into a VA mapper's linear range.
 *
 * Required:
 *   static constexpr PartitionFeatures features;
 *   static constexpr std::string_view name;      // "kvm", "whp", "mock": for dumps
 *   Result<void> map_range(void* host_va, uint64_t gpa, uint64_t size,
 *                          bool writable, bool executable);
 *   Result<void> unmap_range(uint64_t gpa, uint64_t size);
 *   unmap_range is given whole earlier maps only, never part of one. Both must leave the
 *   partition unchanged when they fail.
 *   Every call, the optional ones included, may fail in one more way: with errc::quarantined,
 *   when the host refused the very call that would have undone the policy's own part of it
 *   (a policy that makes several host calls per call: KVM's several memslots, WHP's windows).
 *   The partition has then changed, its own books follow the host, and the error names both
 *   failures; the manager marks such a partition failed (it never calls fatal() for a host
 *   failure: issue 10, defect 7).
 *
 * Optional capabilities, claimed in `features` (snmalloc's "claims F => provides F" pattern):
 *   prefetch:   Result<void> prefetch_range(uint64_t gpa, uint64_t size);
 *   pin:        Result<void> pin_range(uint64_t gpa, uint64_t size);
 *               Result<void> unpin_range(uint64_t gpa, uint64_t size);
 *   dirty_log:  Result<void> set_dirty_logging(bool enabled);
 *               Result<std::vector<uint64_t>> take_dirty_log(uint64_t gpa, uint64_t size);
 *               Logging is a partition-wide mode: it applies to every window, including those
 *               mapped later (a region re-mapped by a visibility change keeps being logged).
 *               take_dirty_log reads and clears the log of one mapped window: one bit per 4 KiB
 *               page, bit i of word i/64. The log belongs to guest physical pages, not to
 *               windows: a page written before its window was unmapped and mapped again (a
 *               visibility or permission change re-creates windows) is still reported by the
 *               next take_dirty_log that covers it. Turning logging off discards the log.
 *               Optionally also Result<std::vector<uint64_t>> take_dirty_log(const MemoryRange&
 *               part): the log of a part of one window only (PartitionMapper_dirty_log_part).
 *   quiesce_aware: void set_quiesced(bool quiesced) noexcept;
 *               Told when the VMM's quiesce hook (GuestMemoryManager::attach_partition) holds
 *               this partition's vCPUs out of guest mode (true) and when it lets them go (false).
 *               A partition that must be conservative while vCPUs may run (KVM: a slot's dirty
 *               log read just before the slot goes) can be exact in between.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>

#include <concepts>
#include <cstdint>
#include <string_view>
#include <vector>

namespace membacking {

/// Optional partition capabilities, as a bitmask.
enum class PartitionFeatures : std::uint32_t {
    none = 0,
    prefetch = 1U << 0,      ///< can populate second-level page tables ahead of guest faults
    pin = 1U << 1,           ///< can pin mapped ranges (device assignment)
    dirty_log = 1U << 2,     ///< can log guest writes per page
    quiesce_aware = 1U << 3, ///< wants to know when the VMM holds its vCPUs (set_quiesced)
};

[[nodiscard]] constexpr PartitionFeatures operator|(PartitionFeatures a,
                                                    PartitionFeatures b) noexcept
{
    return static_cast<PartitionFeatures>(static_cast<std::uint32_t>(a) |
                                          static_cast<std::uint32_t>(b));
}

/// True if policy P claims capability F.
template <PartitionFeatures F, class P>
inline constexpr bool partition_supports = (static_cast<std::uint32_t>(P::features) &
                                            static_cast<std::uint32_t>(F)) != 0;

// clang-format off
template <class P>
concept PartitionMapper_features = requires {
    { P::features } -> std::convertible_to<PartitionFeatures>;
};

template <class P>
concept PartitionMapper_name = requires {
    { P::name } -> std::convertible_to<std::string_view>;
};

template <class P>
concept PartitionMapper_map = requires(P& p, void* host_va, std::uint64_t gpa, std::uint64_t size,
                                       bool writable, bool executable) {
    { p.map_range(host_va, gpa, size, writable, executable) } -> std::same_as<Result<void>>;
};

template <class P>
concept PartitionMapper_unmap = requires(P& p, std::uint64_t gpa, std::uint64_t size) {
    { p.unmap_range(gpa, size) } -> std::same_as<Result<void>>;
};

template <class P>
concept PartitionMapper_prefetch = requires(P& p, std::uint64_t gpa, std::uint64_t size) {
    { p.prefetch_range(gpa, size) } -> std::same_as<Result<void>>;
};

template <class P>
concept PartitionMapper_pin = requires(P& p, std::uint64_t gpa, std::uint64_t size) {
    { p.pin_range(gpa, size) } -> std::same_as<Result<void>>;
    { p.unpin_range(gpa, size) } -> std::same_as<Result<void>>;
};

template <class P>
concept PartitionMapper_dirty_log = requires(P& p, std::uint64_t gpa, std::uint64_t size,
                                             bool enabled) {
    { p.set_dirty_logging(enabled) } -> std::same_as<Result<void>>;
    { p.take_dirty_log(gpa, size) } -> std::same_as<Result<std::vector<std::uint64_t>>>;
};

/// Optional with dirty_log: takes the log of a part of one window (bit i = page i of `part`),
/// leaving the window's other pages for a later take, so that a harvest of a GPA range resets
/// only that range (KVM's manual protect). Without it a take covers whole windows.
template <class P>
concept PartitionMapper_dirty_log_part = requires(P& p, const MemoryRange& part) {
    { p.take_dirty_log(part) } -> std::same_as<Result<std::vector<std::uint64_t>>>;
};

template <class P>
concept PartitionMapper_quiesce_aware = requires(P& p, bool quiesced) {
    { p.set_quiesced(quiesced) } noexcept -> std::same_as<void>;
};

/// "Claims F => provides F" for each optional capability.
template <class P>
concept PartitionMapper_capabilities =
    (!partition_supports<PartitionFeatures::prefetch, P> || PartitionMapper_prefetch<P>) &&
    (!partition_supports<PartitionFeatures::pin, P> || PartitionMapper_pin<P>) &&
    (!partition_supports<PartitionFeatures::dirty_log, P> || PartitionMapper_dirty_log<P>) &&
    (!partition_supports<PartitionFeatures::quiesce_aware, P> ||
     PartitionMapper_quiesce_aware<P>);

template <class P>
concept PartitionMapper = PartitionMapper_features<P> && PartitionMapper_name<P> &&
    PartitionMapper_map<P> && PartitionMapper_unmap<P> && PartitionMapper_capabilities<P>;
// clang-format on

namespace detail {
/// True if P declares `features` and claims F (false, not an error, if it declares none).
template <PartitionFeatures F, class P>
consteval bool claims_partition_feature()
{
    if constexpr (PartitionMapper_features<P>)
        return partition_supports<F, P>;
    else
        return false;
}

/// PartitionMapper<P>, checked one sub-concept at a time, so that every compiler names what is
/// missing and how it must be declared (GCC 12 says only that the whole concept "evaluated to
/// false"). The manager static_asserts this for each of its partition policies; a new policy can
/// too: static_assert(detail::check_partition_mapper<MyPartition>()).
template <class P>
consteval bool check_partition_mapper()
{
    static_assert(PartitionMapper_features<P>,
                  "partition policy: missing `static constexpr PartitionFeatures features`");
    static_assert(PartitionMapper_name<P>,
                  "partition policy: missing `static constexpr std::string_view name`");
    static_assert(PartitionMapper_map<P>,
                  "partition policy: missing `Result<void> map_range(void* host_va, std::uint64_t "
                  "gpa, std::uint64_t size, bool writable, bool executable)`");
    static_assert(PartitionMapper_unmap<P>,
                  "partition policy: missing `Result<void> unmap_range(std::uint64_t gpa, "
                  "std::uint64_t size)`");
    static_assert(!claims_partition_feature<PartitionFeatures::prefetch, P>() ||
                      PartitionMapper_prefetch<P>,
                  "partition policy claims PartitionFeatures::prefetch but lacks `Result<void> "
                  "prefetch_range(std::uint64_t gpa, std::uint64_t size)`");
    static_assert(!claims_partition_feature<PartitionFeatures::pin, P>() || PartitionMapper_pin<P>,
                  "partition policy claims PartitionFeatures::pin but lacks `Result<void> "
                  "pin_range(std::uint64_t gpa, std::uint64_t size)` or `Result<void> "
                  "unpin_range(std::uint64_t gpa, std::uint64_t size)`");
    static_assert(!claims_partition_feature<PartitionFeatures::dirty_log, P>() ||
                      PartitionMapper_dirty_log<P>,
                  "partition policy claims PartitionFeatures::dirty_log but lacks `Result<void> "
                  "set_dirty_logging(bool enabled)` or `Result<std::vector<std::uint64_t>> "
                  "take_dirty_log(std::uint64_t gpa, std::uint64_t size)`");
    static_assert(!claims_partition_feature<PartitionFeatures::quiesce_aware, P>() ||
                      PartitionMapper_quiesce_aware<P>,
                  "partition policy claims PartitionFeatures::quiesce_aware but lacks `void "
                  "set_quiesced(bool quiesced) noexcept`");
    return PartitionMapper<P>;
}
} // namespace detail

} // namespace membacking
