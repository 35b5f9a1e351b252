/**
 * @file manager/detail/partition_set.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/, detail/, region/
 * mapping.hpp, partition/, manager/types.hpp, manager/errors.hpp, manager/memory_map.hpp).
 *
 * PartitionSet<Ps...>: the partitions' fan-out. It owns the attached partitions, one list per
 * partition policy in a std::tuple (fold expressions, no virtual call), and does everything that
 * goes to them: attach (replaying what is visible), detach, map and unmap one visible window in
 * every partition, pin, prefetch, the quiesce bracket, and the dirty-log dispatch. It knows
 * nothing of regions or VA mappers: the manager gives it the visible windows (RegionActivation)
 * and the host VA base of the VA mapper partitions map from.
 *
 * The quiesce bracket (manager/quiesce_hook.hpp): an Operation (operation()) spans one control
 * operation. The first step in it that is not atomic for a running guest, in a partition that has
 * a hook, calls the hook's begin() (hold()); end() is called when the outermost Operation ends,
 * after any rollback. Each public call here is an Operation of its own too, nested in the
 * manager's when there is one, so the set keeps the rule when driven alone (tests).
 *
 * Prefetch is advice, and KVM's is a vCPU ioctl that waits for that vCPU to leave KVM_RUN: it is
 * never issued during an operation. map() queues it; whoever runs the operation takes the queue
 * (take_deferred()) and runs it once its lock is released.
 *
 * Every operation is all or nothing (detail::UndoLog). An undo step never fails: a partition
 * that refuses one (its host resource keeps failing: KVM memslots, WHP mappings) is marked
 * failed instead (mark_failed): from then on no operation sends it anything, the memory map and
 * health() report it with the root error, set_dirty_logging/take_dirty_log on it and the
 * all-partition dirty-log calls fail with errc::quarantined, and detach() drops it (unmapping
 * what it can). Its windows stay as they were when it failed: the VMM should stop its vCPUs.
 * A rollback run by an outer UndoLog (the manager's) is handled the same way. A partition call
 * that fails with errc::quarantined is the policy's own report that it could not undo its part
 * of the call (KVM: a memslot the kernel will not take back; WHP: a window it will not map
 * again; see partition/partition_mapper.hpp): that partition is marked failed too (watched()). Not
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
#include <membacking/manager/quiesce_hook.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/mapping.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
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

    /// The quiesce state of one attached partition with a hook (shared by its mappings).
    struct Quiesce {
        QuiesceHook hook;
        std::function<void(bool)> notify; ///< set_quiesced, for quiesce-aware policies
        bool held = false;
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
        std::shared_ptr<Quiesce> quiesce; ///< null: no hook
    };

    /// One control operation: the quiesce bracket of every partition held during it ends when
    /// the outermost one does.
    class [[nodiscard]] Operation {
    public:
        Operation(const Operation&) = delete;
        Operation& operator=(const Operation&) = delete;
        ~Operation()
        {
            if (--set_.depth_ == 0)
                set_.release_all();
        }

    private:
        friend class PartitionSet;
        explicit Operation(PartitionSet& set) : set_(set) { ++set_.depth_; }
        PartitionSet& set_;
    };

    /// An attached partition that refused to undo a step (see the file comment).
    using FailedPartition = MemoryMap::FailedPartition;

    /// Advice to give once the operation's lock is released (prefetch).
    using Deferred = std::vector<std::function<void()>>;

    explicit PartitionSet(const Options& options) : options_(options) {}
    PartitionSet(const PartitionSet&) = delete;
    PartitionSet& operator=(const PartitionSet&) = delete;

    /// Opens a control operation (see Operation).
    Operation operation() { return Operation(*this); }

    /// The prefetches queued so far; run them without holding the lock the set is used under.
    [[nodiscard]] Deferred take_deferred() { return std::exchange(deferred_, {}); }

    /// Whether a partition attached now logs dirty pages from the start (a migration is on).
    enum class DirtyLogging : bool { off, on };

    /// Adds a partition and maps every window of `visible` into it; `hook` (optional) is its
    /// quiesce bracket; with DirtyLogging::on, its logging is turned on before the first window
    /// (a policy that cannot log fails: its guest's writes would be lost). All or nothing: on
    /// failure the partition is left with nothing mapped and logging off, and no id is taken
    /// (the cause's code, with "failed to attach partition to memory manager" as context).
    template <class P>
    Result<PartitionId> attach(Vtl vtl, std::shared_ptr<P> partition,
                               const std::vector<RegionActivation>& visible, QuiesceHook hook = {},
                               DirtyLogging logging = DirtyLogging::off)
    {
        static_assert(occurs_once<P, Ps...>,
                      "this partition policy is not one of the manager's partition policies");
        const Operation op = operation();
        if (!partition)
            return attach_error(make_error(errc::invalid_argument, "no partition given"));
        if (!hook && (hook.begin || hook.end))
            return attach_error(
                make_error(errc::invalid_argument, "a quiesce hook needs both begin and end"));
        if constexpr (!partition_supports<PartitionFeatures::pin, P>) {
            if (options_.pin)
                return attach_error(
                    make_error(errc::unsupported, std::string(P::name) +
                                                      " partitions cannot pin mappings, and the "
                                                      "manager was built with pin_mappings"));
        }
        std::shared_ptr<Quiesce> quiesce;
        if (hook) {
            quiesce = std::make_shared<Quiesce>(Quiesce{std::move(hook), {}, false});
            if constexpr (partition_supports<PartitionFeatures::quiesce_aware, P>)
                quiesce->notify = [partition](bool held) { partition->set_quiesced(held); };
        }
        // The id is taken only when the attach succeeds: a failed one consumes none.
        const PartitionId id{next_id_};
        std::vector<Attached<P>> entries;
        // VTL2 also sees all of memory at the alias offset; that mapping goes first.
        if (vtl == Vtl::vtl2 && options_.vtl0_alias_map)
            entries.push_back(
                {id, partition, vtl, *options_.vtl0_alias_map, options_.pin, quiesce});
        entries.push_back({id, partition, vtl, 0, options_.pin, quiesce});

        // Replay what is visible now; any failure takes everything of this attach back out
        // (the reference keeps the alias mapping when the second registration fails).
        // If that fails too, the partition keeps what could not be taken out: it is attached
        // anyway, marked failed (its id is taken), so that it is reported and can be detached.
        std::optional<Error> stuck;
        UndoLog undo;
        const auto fail = [&](Error cause) -> Result<PartitionId> {
            undo.rollback();
            if (stuck || is_failed(id)) { // is_failed: the policy reported itself
                auto& list = std::get<std::vector<Attached<P>>>(lists_);
                list.insert(list.end(), entries.begin(), entries.end());
                ++next_id_;
                mark_failed(id, cause, stuck ? *stuck : cause);
            }
            return attach_error(std::move(cause));
        };
        if (logging == DirtyLogging::on) {
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>) {
                // Before any window: a memslot is created logging, not switched later.
                hold(entries.back());
                // Not watched(): a policy that reports its log out of service is refused, not
                // kept attached as failed (nothing of it is mapped yet).
                if (auto r = partition->set_dirty_logging(true); !r)
                    return fail(std::move(r).error());
                undo.push([partition, &stuck]() -> Result<void> {
                    if (auto u = partition->set_dirty_logging(false); !u && !stuck)
                        stuck = std::move(u).error();
                    return {};
                });
            } else
                return attach_error(no_dirty_log<P>());
        }
        for (const Attached<P>& e : entries)
            for (const RegionActivation& act : visible) {
                if (auto r = map_one(e, act); !r)
                    return fail(std::move(r).error());
                undo.push([this, e, range = act.gpa, &stuck]() -> Result<void> {
                    if (auto u = unmap_one(e, range); !u && !stuck)
                        stuck = std::move(u).error();
                    return {};
                });
            }
        undo.commit();
        auto& list = std::get<std::vector<Attached<P>>>(lists_);
        list.insert(list.end(), entries.begin(), entries.end());
        ++next_id_;
        return id;
    }

    /// Unmaps every window of `visible` from partition `id` and forgets it. All or nothing.
    Result<void> detach(PartitionId id, const std::vector<RegionActivation>& visible)
    {
        const Operation op = operation();
        if (is_failed(id)) {
            // Nothing to keep consistent: take out what the host lets us, and forget it.
            for_each(
                [&](auto& a) {
                    if (a.id == id)
                        for (const RegionActivation& act : visible)
                            (void)unmap_one(a, act.gpa, Hold::no);
                    return true;
                },
                Failed::include);
            forget(id);
            return {};
        }
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
                undo.push([this, a, act] { return or_fail(a, map_one(a, act)); });
            }
            return true;
        });
        if (!found)
            return not_attached(id);
        if (!result)
            return result;
        undo.commit();
        forget(id);
        return {};
    }

    /// Marks partition `id` failed: `cause` is the operation's error, `stuck` what could not be
    /// undone. Idempotent (the first cause stays).
    void mark_failed(PartitionId id, const Error& cause, const Error& stuck)
    {
        if (is_failed(id))
            return;
        std::string what = cause.full_message();
        what += "; undoing it failed: ";
        what += stuck.full_message();
        failed_.push_back({id, std::move(what)});
    }

    /// Marks partition `id` failed on its policy's own report (errc::quarantined: it could not
    /// undo its part of a call; the report names both). Idempotent (the first cause stays).
    void mark_failed(PartitionId id, const Error& reported)
    {
        if (!is_failed(id))
            failed_.push_back({id, reported.full_message()});
    }

    /// The partitions marked failed, in the order they failed.
    [[nodiscard]] const std::vector<FailedPartition>& failed() const noexcept { return failed_; }

    /// Maps one newly visible window into every partition. All or nothing.
    Result<void> map(const RegionActivation& act)
    {
        return fan_out([&](auto& a) { return map_one(a, act); },
                       [this, range = act.gpa](auto& a) { return this->unmap_one(a, range); });
    }

    /// Unmaps one window that stops being visible from every partition. All or nothing.
    Result<void> unmap(const RegionActivation& act)
    {
        return fan_out([&](auto& a) { return unmap_one(a, act.gpa); },
                       [this, act](auto& a) { return this->map_one(a, act); });
    }

    /// Takes every window of `visible` out of every partition, ignoring failures: for teardown,
    /// where nothing can be reported. No quiesce hook is called: the VMM stops its vCPUs before
    /// it destroys the manager (a hook might reach a VMM object that is already gone).
    void unmap_all(const std::vector<RegionActivation>& visible) noexcept
    {
        for_each(
            [&](auto& a) {
                for (const RegionActivation& act : visible)
                    (void)unmap_one(a, act.gpa, Hold::no);
                return true;
            },
            Failed::include);
    }

    /// Partition-wide dirty-page logging, for partitions whose policy can do it.
    Result<void> set_dirty_logging(PartitionId id, bool enabled)
    {
        const Operation op = operation();
        if (is_failed(id))
            return failed_error(id);
        bool found = false;
        Result<void> result;
        for_each([&](auto& a) {
            if (a.id != id)
                return true;
            found = true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>) {
                hold(a); // one slot after the other: not atomic for a running guest
                result = watched(a, a.partition->set_dirty_logging(enabled));
            } else
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
        if (is_failed(id))
            return failed_error(id);
        bool found = false;
        Result<std::vector<std::uint64_t>> result = std::vector<std::uint64_t>{};
        for_each([&](auto& a) {
            if (a.id != id || a.offset != 0)
                return true;
            found = true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>)
                result = watched(a, a.partition->take_dirty_log(window.start(), window.size()));
            else
                result = no_dirty_log<P>();
            return false;
        });
        if (!found)
            return not_attached(id);
        return result;
    }

    /// Turns dirty-page logging on or off in every attached partition (aliases once), all or
    /// nothing: a partition whose policy cannot log fails the whole call (errc::unsupported),
    /// since its guest's writes would be lost; on a failure the ones already switched are
    /// switched back.
    Result<void> set_dirty_logging_all(bool enabled)
    {
        const Operation op = operation();
        if (!failed_.empty()) // its guest writes would go unlogged
            return failed_error(failed_.front().id);
        UndoLog undo;
        Result<void> result;
        for_each([&](auto& a) {
            if (a.offset != 0)
                return true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>) {
                hold(a);
                result = watched(a, a.partition->set_dirty_logging(enabled));
                if (result)
                    undo.push([this, &a, enabled] {
                        return or_fail(a, a.partition->set_dirty_logging(!enabled));
                    });
            } else
                result = no_dirty_log<P>();
            return static_cast<bool>(result);
        });
        if (!result)
            return result;
        undo.commit();
        return {};
    }

    /// Reads and clears every attached partition's log of the visible windows that intersect
    /// `range`, and hands each to sink(window start, bits) (bit i = page i of the window).
    template <class Sink>
    Result<void> take_dirty_logs(const std::vector<RegionActivation>& visible,
                                 const MemoryRange& range, Sink&& sink)
    {
        if (!failed_.empty())
            return failed_error(failed_.front().id);
        Result<void> result;
        for_each([&](auto& a) {
            if (a.offset != 0)
                return true;
            using P = std::remove_cvref_t<decltype(*a.partition)>;
            if constexpr (partition_supports<PartitionFeatures::dirty_log, P>) {
                for (const RegionActivation& w : visible) {
                    if (w.gpa.end() <= range.start() || range.end() <= w.gpa.start())
                        continue;
                    // Only the part in range where the partition can (the rest of the
                    // window keeps its log); else the whole window, whose bits outside
                    // range the sink keeps for a later take.
                    const MemoryRange part =
                        PartitionMapper_dirty_log_part<P> ? w.gpa.intersection(range) : w.gpa;
                    auto bits = watched(a, [&] {
                        if constexpr (PartitionMapper_dirty_log_part<P>)
                            return a.partition->take_dirty_log(part);
                        else
                            return a.partition->take_dirty_log(w.gpa.start(), w.gpa.size());
                    }());
                    if (!bits) {
                        result = std::move(bits).error();
                        return false;
                    }
                    sink(part.start(), *bits);
                }
            }
            return true;
        });
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

    /// Holds partition `id`'s vCPUs out of guest mode (its quiesce hook's begin) until the
    /// current operation ends; false if it has no hook (its vCPUs may run meanwhile). Call
    /// inside an operation().
    bool hold_vcpus(PartitionId id)
    {
        bool held = false;
        for_each(
            [&](auto& a) {
                if (a.id != id)
                    return true;
                if (a.quiesce) {
                    hold(a);
                    held = true;
                }
                return false;
            },
            Failed::include);
        return held;
    }

    /// Whether partition `id` is attached (failed or not).
    [[nodiscard]] bool attached(PartitionId id) const noexcept
    {
        return std::apply(
            [&](const auto&... lists) {
                return (... ||
                        std::ranges::any_of(lists, [&](const auto& a) { return a.id == id; }));
            },
            lists_);
    }

private:
    /// The reference's PartitionAttachError text, as context: the cause's code stays.
    static Error attach_error(Error cause)
    {
        return std::move(cause).context("failed to attach partition to memory manager");
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

    /// Whether for_each visits failed partitions (only teardown and detach do).
    enum class Failed : std::uint8_t { skip, include };

    /// Calls f(attached) for every attached mapping of every policy, in policy order, until f
    /// returns false. Returns whether it ran to the end.
    template <class F>
    bool for_each(F&& f, Failed failed = Failed::skip)
    {
        return std::apply(
            [&](auto&... lists) {
                return (... && [&](auto& list) {
                    for (auto& a : list)
                        if ((failed == Failed::include || !is_failed(a.id)) && !f(a))
                            return false;
                    return true;
                }(lists));
            },
            lists_);
    }

    [[nodiscard]] bool is_failed(PartitionId id) const noexcept
    {
        return std::ranges::any_of(failed_, [&](const FailedPartition& f) { return f.id == id; });
    }

    Error failed_error(PartitionId id) const
    {
        std::string what = "partition ";
        what += std::to_string(id.value);
        what += " failed and is out of service: ";
        for (const FailedPartition& f : failed_)
            if (f.id == id)
                what += f.cause;
        return make_error(errc::quarantined, what);
    }

    /// An undo step's result: a partition that refused it is marked failed, and the rollback
    /// goes on (see the file comment).
    template <class P>
    Result<void> or_fail(const Attached<P>& a, const Result<void>& r)
    {
        if (!r)
            mark_failed(a.id, make_error(errc::quarantined, "a control operation failed"),
                        r.error());
        return {};
    }

    /// A partition call's result, passed on; errc::quarantined is the policy's report that it
    /// could not undo its part (see the file comment), and marks the partition failed.
    template <class P, class T>
    Result<T> watched(const Attached<P>& a, Result<T> r)
    {
        if (!r && r.error().code() == errc::quarantined)
            mark_failed(a.id, r.error());
        return r;
    }

    /// Forgets partition `id` (every mapping of it, and its failure).
    void forget(PartitionId id)
    {
        std::apply(
            [&](auto&... lists) {
                (std::erase_if(lists, [&](const auto& a) { return a.id == id; }), ...);
            },
            lists_);
        std::erase_if(failed_, [&](const FailedPartition& f) { return f.id == id; });
    }

    /// The fan-out of map and unmap: `step(a)` into every partition, all or nothing; each
    /// partition done pushes `inverse(a)` on the undo log, so a later failure takes it back.
    /// Called to undo (UndoLog::rolling_back(), see the file comment), a partition whose step
    /// fails is marked failed and the others still follow.
    template <class Step, class Inverse>
    Result<void> fan_out(Step&& step, const Inverse& inverse)
    {
        const Operation op = operation();
        UndoLog undo;
        Result<void> result;
        const bool must_follow = UndoLog::rolling_back();
        for_each([&](auto& a) {
            if (auto r = step(a); !r) {
                if (must_follow) {
                    (void)or_fail(a, r);
                    return true;
                }
                result = std::move(r).error();
                return false;
            }
            undo.push([this, &a, inverse] { return or_fail(a, inverse(a)); });
            return true;
        });
        if (!result)
            return result;
        undo.commit();
        return {};
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
        MEMBACKING_TRY(
            watched(a, a.partition->map_range(host, *gpa, act.gpa.size(), act.params.writable,
                                              act.params.executable)));
        if constexpr (partition_supports<PartitionFeatures::prefetch, P>) {
            // Advice, given after the operation (see the file comment): a partition that cannot
            // populate then, or whose window is gone by then, faults in later.
            if (act.params.prefetch)
                deferred_.push_back([p = a.partition, at = *gpa, size = act.gpa.size()] {
                    (void)p->prefetch_range(at, size);
                });
        }
        if constexpr (partition_supports<PartitionFeatures::pin, P>) {
            if (a.pin) {
                if (auto r = watched(a, a.partition->pin_range(*gpa, act.gpa.size())); !r) {
                    if (auto u = watched(a, a.partition->unmap_range(*gpa, act.gpa.size())); !u)
                        mark_failed(a.id, r.error(), u.error());
                    return std::move(r).error().context("failed to pin range to partition");
                }
            }
        }
        return {};
    }

    /// Whether a step opens the quiesce bracket (teardown does not).
    enum class Hold : std::uint8_t { no, yes };

    template <class P>
    Result<void> unmap_one(const Attached<P>& a, const MemoryRange& range, Hold h = Hold::yes)
    {
        if (h == Hold::yes)
            hold(a); // the window goes before anything takes its place: no guest may run now
        const std::uint64_t gpa = range.start() + a.offset; // checked when it was mapped
        if constexpr (partition_supports<PartitionFeatures::pin, P>) {
            if (a.pin)
                MEMBACKING_TRY(watched(a, a.partition->unpin_range(gpa, range.size())));
        }
        auto r = watched(a, a.partition->unmap_range(gpa, range.size()));
        if (!r) {
            if constexpr (partition_supports<PartitionFeatures::pin, P>) {
                if (a.pin) {
                    if (auto p = watched(a, a.partition->pin_range(gpa, range.size())); !p)
                        mark_failed(a.id, r.error(), p.error());
                }
            }
            return r;
        }
        return {};
    }

    /// Opens a's quiesce bracket for the rest of the operation, if it has a hook and it is not
    /// open yet.
    template <class P>
    void hold(const Attached<P>& a)
    {
        if (!a.quiesce || a.quiesce->held)
            return;
        MEMBACKING_CHECK(depth_ > 0, "PartitionSet: a partition step outside an operation");
        a.quiesce->hook.begin();
        a.quiesce->held = true;
        if (a.quiesce->notify)
            a.quiesce->notify(true);
        held_.push_back(a.quiesce);
    }

    /// Ends every bracket opened in the operation that just ended.
    void release_all() noexcept
    {
        for (const std::shared_ptr<Quiesce>& q : held_) {
            if (q->notify)
                q->notify(false);
            q->held = false;
            q->hook.end();
        }
        held_.clear();
    }

    Options options_;
    std::tuple<std::vector<Attached<Ps>>...> lists_;
    std::vector<FailedPartition> failed_; ///< attached partitions marked failed
    std::uint64_t next_id_ = 1;
    unsigned depth_ = 0;                         ///< open Operations
    std::vector<std::shared_ptr<Quiesce>> held_; ///< brackets open in this operation
    Deferred deferred_;                          ///< prefetches to run after the operation
};

} // namespace membacking::detail
