/**
 * @file region/event_sink.hpp
 * Layer: region.
 *
 * The RegionEventSink concept: where the region manager sends the consequences of a topology
 * change. It is two roles, each its own concept, so that a failed check names the missing half:
 *
 * - VaEventSink: the VA side (the mapping manager, which keeps every VA mapper in sync).
 *   add_mapping atomically *replaces* whatever active mappings overlap m.gpa, splitting them;
 *   remove_mappings removes everything inside the range, splitting mappings at its edges.
 * - PartitionEventSink: the hypervisor side. map_region maps one window; unmap_region is always
 *   given exactly the activation of an earlier map_region (so a sink can put it back if it has
 *   to roll back), never a part of one.
 *
 * Every call may fail and must then leave the sink as it was; the region manager rolls back the
 * calls that succeeded before it. Ordering is the region manager's job: enabling goes to the VA
 * side first, then partitions; disabling goes to partitions first, then the VA side.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/region/mapping.hpp>

#include <concepts>

namespace membacking {

// clang-format off
template <class S>
concept VaEventSink = requires(S& sink, const ActiveMapping& mapping, const MemoryRange& range) {
    { sink.add_mapping(mapping) } -> std::same_as<Result<void>>;
    { sink.remove_mappings(range) } -> std::same_as<Result<void>>;
};

template <class S>
concept PartitionEventSink = requires(S& sink, const RegionActivation& activation) {
    { sink.map_region(activation) } -> std::same_as<Result<void>>;
    { sink.unmap_region(activation) } -> std::same_as<Result<void>>;
};

template <class S>
concept RegionEventSink = VaEventSink<S> && PartitionEventSink<S>;
// clang-format on

} // namespace membacking
