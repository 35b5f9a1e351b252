/**
 * @file manager/detail/partition_set.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/, detail/, region/
 * mapping.hpp, partition/, manager/types.hpp, manager/errors.hpp, manager/memory_map.hpp).
 *
 * PartitionSet<Ps...>: the partitions' fan-out. It owns the attached partitions, one list per
 * partition policy in a std::tuple (fold expressions, no virtual call), and does everything that
 * goes to them: attach (replaying what is visible), detach, map and unmap one visible window in
 * every partition, pin, prefetch, and the dirty-log dispatch. It knows nothing of regions or VA
 * mappers: the manager gives it the visible windows (RegionActivation) and the host VA base of
 * the VA mapper partitions map from.
 *
 * Every operation is all or nothing (detail::UndoLog); an undo step that fails is fatal. Not
 * thread-safe by itself: the manager calls it under its control lock. Testable against the mock
 * without a manager (tests/manager/partition_set.cpp).
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/manager/errors.hpp>
#include <membacking/manager/memory_map.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/mapping.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace membacking::detail {

/// True if T appears in Ts exactly once.
template <class T, class... Ts>
inline constexpr bool occurs_once = (std::is_same_v<T, Ts> + ... + 0) == 1;

template <class... Ps>
class PartitionSet {
    static_assert((occurs_once<Ps, Ps...> && ...),
                  "each partition policy may be listed once in a GuestMemoryManager");

public:
    struct Options {
        /// GPA g of every window is host VA host_base + g (the primary VA mapper's base).
        std::byte* host_base = nullptr;
        /// VTL2 partitions also get all of memory at gpa + this offset.
        std::optional<std::uint64_t> vtl0_alias_map;
        /// Pin every window after mapping it (device assignment).
        bool pin = false;
    };

    /// One mapping of one attached partition: a VTL2 partition with an alias map has two, with
    /// the same id.
    template <class P>
    struct Attached {
        PartitionId id;
        std::shared_ptr<P> partition;
        Vtl vtl = Vtl::vtl0;
        std::uint64_t offset = 0;
        bool pin = false;
    };

    explicit PartitionSet(const Options& options) : options_(options) {}
    PartitionSet(const PartitionSet&) = delete;
    PartitionSet& operator=(const PartitionSet&) = delete;

    /// Adds a partition and maps every window of `visible` into it. All or nothing: on failure
    /// the partition is left with nothing mapped (attach_errc::partition_mapper).
    template <class P>
    Result<PartitionId> attach(Vtl vtl, std::shared_ptr<P> partition,
                               const std::vector<RegionActivation>& visible)
    {
        static_assert(occurs_once<P, Ps...>,
                      "this partition policy is not one of the manager's partition policies");
        if (!partition)
            return attach_error(make_error(errc::invalid_argument, "no partition given"));
        if constexpr (!partition_supports<PartitionFeatures::pin, P>) {
            if (options_.pin)
                return attach_error(
                    make_error(errc::unsupported, std::string(P::name) +
                                                      " partitions cannot pin mappings, and the "
                                                      "manager was built with pin_mappings"));
        }
        const PartitionId id{next_id_++};
        std::vector<Attached<P>> entries;
        // VTL2 also sees all of memory at the alias offset; that mapping goes first.
        if (vtl == Vtl::vtl2 && options_.vtl0_alias_map)
            entries.push_back({id, partition, vtl, *options_.vtl0_alias_map, options_.pin});
        entries.push_back({id, partition, vtl, 0, options_.pin});

        // Replay what is visible now; any failure takes everything of this attach back out
        // (the reference keeps the alias mapping when the second registration fails).
        UndoLog undo;
        for (const Attached<P>& e : entries)
            for (const RegionActivation& act : visible) {
                if (auto r = map_one(e, act); !r)
                    return attach_error(std::move(r).error());
                undo.push([this, e, range = act.gpa] { return unmap_one(e, range); });
            }
        undo.commit();
        auto& list = std::get<std::vector<Attached<P>>>(lists_);
        list.insert(list.end(), entries.begin(), entries.end());
        return id;
    }

    /// Unmaps every window of `visible` from partition `id` and forgets it. All or nothing.
    Result<void> detach(PartitionId id, const std::vector<RegionActivation>& visible)
    {
        bool found = false;
        UndoLog undo;
        Result<void> result;
        for_each([&](auto& a) {
            if (a.id != id)
                return true;
            found = true;
            for (const RegionActivation& act : visible) {
                if (auto r = unmap_one(a, act.gpa); !r) {
                    result = std::move(r).error();
                    return false;
                }
                undo.push([this, a, act] { return map_one(a, act); });
            }
            return true;
        });
        if (!found)
            return not_attached(id);
        if (!result)
            return result;
        undo.commit();
        std::apply(
            [&](auto&... lists) {
                (std::erase_if(lists, [&](const auto& a) { return a.id == id; }), ...);
            },
            lists_);
        return {};
    }

    /// Maps one newly visible window into every partition. All or nothing.
    Result<void> map(const RegionActivation& act)
    {
        UndoLog undo;
        Result<void> result;
        for_each([&](auto& a) {
            if (auto r = map_one(a, act); !r) {
                result = std::move(r).error();
                return false;
            }
            undo.push([this, &a, range = act.gpa] { return unmap_one(a, range); });
            return true;
        });
        if (!result)
            return result;
        undo.commit();
        return {};
    }

    /// Unmaps one window that stops being visible from every partition. All or nothing.
    Result<void> unmap(const RegionActivation& act)
    {
        UndoLog undo;
        Result<void> result;
        for_each([&](auto& a) {
            if (auto r = unmap_one(a, act.gpa); !r) {
                result = std::move(r).error();
                return false;
            }
            undo.push([this, &a, act] { return map_one(a, act); });
            return true;
        });
        if (!result)
            return result;
        undo.commit();
        return {};
    }

    /// Takes every window of `visible` out of every partition, ignoring failures: for teardown,
    /// where nothing can be reported.
    void unmap_all(const std::vector<RegionActivation>& visible) noexcept
    {
        for_each([&](auto& a) {
            for (const RegionActivation& act : visible)
                (void)unmap_one(a, act.gpa);
            return true;
        });
    }

    /// Partition-wide dirty-page logging, for partitions whose policy can do it.
    Result<void> set_dirty_logging(PartitionId id, bool enabled)
    {
        bool found = false;
        Result<void> result;
        for_each([&](auto& a) {
            if (a.id != id)
                return true;
            found = true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>)
                result = a.partition->set_dirty_logging(enabled);
            else
                result = no_dirty_log<P>();
            return false; // one call per partition, even with an alias mapping
        });
        if (!found)
            return not_attached(id);
        return result;
    }

    /// Reads and clears the dirty bitmap of one visible window in partition `id` (bit i is page
    /// i of the window).
    Result<std::vector<std::uint64_t>> take_dirty_log(PartitionId id, const MemoryRange& window)
    {
        bool found = false;
        Result<std::vector<std::uint64_t>> result = std::vector<std::uint64_t>{};
        for_each([&](auto& a) {
            if (a.id != id || a.offset != 0)
                return true;
            found = true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>)
                result = a.partition->take_dirty_log(window.start(), window.size());
            else
                result = no_dirty_log<P>();
            return false;
        });
        if (!found)
            return not_attached(id);
        return result;
    }

    /// One entry per mapping of every attached partition, in policy order, for the memory map.
    [[nodiscard]] std::vector<MemoryMap::Partition> describe() const
    {
        std::vector<MemoryMap::Partition> out;
        std::apply(
            [&](const auto&... lists) {
                (..., [&](const auto& list) {
                    for (const auto& a : list)
                        out.push_back(
                            {a.id, std::string(std::remove_cvref_t<decltype(*a.partition)>::name),
                             a.vtl, a.offset, a.pin});
                }(lists));
            },
            lists_);
        return out;
    }

    /// Attached mappings (a VTL2 partition with an alias map counts twice).
    [[nodiscard]] std::size_t size() const noexcept
    {
        std::size_t n = 0;
        std::apply([&](const auto&... lists) { ((n += lists.size()), ...); }, lists_);
        return n;
    }

private:
    static Error attach_error(Error cause)
    {
        const std::error_code code = make_error_code(attach_errc::partition_mapper);
        return {code, code.message(), std::move(cause)};
    }

    static Error not_attached(PartitionId id)
    {
        return make_error(errc::not_found,
                          "no partition with id " + std::to_string(id.value) + " is attached");
    }

    template <class P>
    static Error no_dirty_log()
    {
        return make_error(errc::unsupported,
                          std::string(P::name) + " partitions cannot log dirty pages");
    }

    /// Calls f(attached) for every attached mapping of every policy, in policy order, until f
    /// returns false. Returns whether it ran to the end.
    template <class F>
    bool for_each(F&& f)
    {
        return std::apply(
            [&](auto&... lists) {
                return (... && [&](auto& list) {
                    for (auto& a : list)
                        if (!f(a))
                            return false;
                    return true;
                }(lists));
            },
            lists_);
    }

    template <class P>
    Result<void> map_one(const Attached<P>& a, const RegionActivation& act)
    {
        const auto gpa = checked_add(act.gpa.start(), a.offset);
        if (!gpa)
            return make_error(errc::out_of_range, "alias offset " + MemoryRange::hex(a.offset) +
                                                      " pushes " + act.gpa.to_string() +
                                                      " past the end of the address space");
        std::byte* host = options_.host_base + act.gpa.start();
        MEMBACKING_TRY(a.partition->map_range(host, *gpa, act.gpa.size(), act.params.writable,
                                              act.params.executable));
        if constexpr (partition_supports<PartitionFeatures::prefetch, P>) {
            // Prefetch is advice: a partition that cannot populate now will fault in later.
            if (act.params.prefetch)
                (void)a.partition->prefetch_range(*gpa, act.gpa.size());
        }
        if constexpr (partition_supports<PartitionFeatures::pin, P>) {
            if (a.pin) {
                if (auto r = a.partition->pin_range(*gpa, act.gpa.size()); !r) {
                    if (auto u = a.partition->unmap_range(*gpa, act.gpa.size()); !u)
                        fatal("a partition refused to unmap a range it just mapped: " +
                              u.error().full_message());
                    return std::move(r).error().context("failed to pin range to partition");
                }
            }
        }
        return {};
    }

    template <class P>
    Result<void> unmap_one(const Attached<P>& a, const MemoryRange& range)
    {
        const std::uint64_t gpa = range.start() + a.offset; // checked when it was mapped
        if constexpr (partition_supports<PartitionFeatures::pin, P>) {
            if (a.pin)
                MEMBACKING_TRY(a.partition->unpin_range(gpa, range.size()));
        }
        auto r = a.partition->unmap_range(gpa, range.size());
        if (!r) {
            if constexpr (partition_supports<PartitionFeatures::pin, P>) {
                if (a.pin && !a.partition->pin_range(gpa, range.size()))
                    fatal("could not re-pin a range after a failed unmap");
            }
            return r;
        }
        return {};
    }

    Options options_;
    std::tuple<std::vector<Attached<Ps>>...> lists_;
    std::uint64_t next_id_ = 1;
};

} // namespace membacking::detail
