/**
 * @file mapping/detail/listener_set.hpp
 * Internal (namespace membacking::detail); layer: mapping (includes base/, detail/, mapping/).
 *
 * ListenerSet: the memory table (mapping/detail/memory_table.hpp) and the run-time listeners'
 * fan-out (mapping/memory_listener.hpp), the one home of both. The manager routes every VA event
 * of the region manager through it: add_mapping(m, va_step) / remove_mappings(range, va_step)
 * compute the table's diff, give it to every listener (all or nothing: a refusal gives the
 * listeners that accepted the inverse and returns the error), then run the VA step; if that
 * fails, the listeners get the inverse too. The table changes only when both succeeded.
 *
 * Listeners come first so that a device stops using a piece before the VMM's own view of it
 * goes, and so that a refusal costs no VA work. Two-phase listeners (AwaitsTableChanges: client
 * processes) are sent each change before any is awaited, so a step waits for its slowest client
 * once rather than for every client in turn. Events that arrive while an UndoLog rolls back
 * (UndoLog::rolling_back) are rollbacks: a listener that fails one is dropped, never fatal.
 *
 * Listeners are type-erased (std::function): they come and go at run time with different types,
 * and only control operations call them. Not thread-safe by itself: the manager calls it under
 * its control lock.
 */
#pragma once

#include <membacking/base/result.hpp>
#include <membacking/detail/undo_log.hpp>
#include <membacking/mapping/detail/memory_table.hpp>
#include <membacking/mapping/memory_listener.hpp>
#include <membacking/mapping/memory_piece.hpp>
#include <membacking/region/mapping.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace membacking::detail {

class ListenerSet {
public:
    /// One registered listener, for dumps and tests.
    struct Info {
        ListenerId id;
        std::string name;
    };

    /// Registers `listener` and gives it the whole table (Kind::initial). All or nothing: if it
    /// refuses, it is not registered and its error is returned.
    template <MemoryListener L>
    Result<ListenerId> add(std::shared_ptr<L> listener)
    {
        if (!listener)
            return make_error(errc::invalid_argument, "no memory listener given");
        Entry e{ListenerId{next_id_++}, std::string(std::as_const(*listener).name()),
                [l = listener.get()](const MemoryTableChange& c) { return l->apply(c); }, nullptr,
                std::move(listener)};
        if constexpr (AwaitsTableChanges<L>)
            e.await = [l = static_cast<L*>(e.owner.get())] { return l->await_applied(); };
        MemoryTableChange initial{MemoryTableChange::Kind::initial, {}, table_.pieces()};
        if (auto r = e.apply(initial); !r)
            return refused(e, initial, std::move(r).error());
        if (e.await) {
            if (auto r = e.await(); !r)
                return refused(e, initial, std::move(r).error());
        }
        listeners_.push_back(std::move(e));
        return listeners_.back().id;
    }

    /// Forgets a listener: it is not called again, and its reference is released.
    Result<void> remove(ListenerId id)
    {
        const auto n = std::erase_if(listeners_, [&](const Entry& e) { return e.id == id; });
        if (n == 0)
            return make_error(errc::not_found,
                              "no memory listener with id " + std::to_string(id.value) +
                                  " is registered (never was, removed, or cut off)");
        return {};
    }

    /// The VA event add_mapping(m); `va` is the VA side's step.
    template <class VaStep>
    Result<void> add_mapping(const ActiveMapping& m, VaStep&& va)
    {
        return step(table_.replace(m), std::forward<VaStep>(va));
    }

    /// The VA event remove_mappings(range); `va` is the VA side's step.
    template <class VaStep>
    Result<void> remove_mappings(const MemoryRange& range, VaStep&& va)
    {
        return step(table_.remove(range), std::forward<VaStep>(va));
    }

    /// The memory table: every piece of active guest memory, by GPA.
    [[nodiscard]] std::vector<MemoryPiece> pieces() const { return table_.pieces(); }

    [[nodiscard]] std::vector<Info> describe() const
    {
        std::vector<Info> out;
        for (const Entry& e : listeners_)
            out.push_back({e.id, e.name});
        return out;
    }

    [[nodiscard]] std::size_t size() const noexcept { return listeners_.size(); }

private:
    struct Entry {
        ListenerId id;
        std::string name;
        std::function<Result<void>(const MemoryTableChange&)> apply;
        std::function<Result<void>()> await; ///< empty unless AwaitsTableChanges
        std::shared_ptr<void> owner;         ///< keeps the listener alive while it is registered
        bool dropped = false;                ///< cut off during the current delivery
    };

    template <class VaStep>
    Result<void> step(const TableDiff& diff, VaStep&& va)
    {
        if (diff.empty())
            return std::forward<VaStep>(va)();
        const bool undoing = UndoLog::rolling_back();
        MEMBACKING_TRY(deliver(diff, undoing ? MemoryTableChange::Kind::rollback
                                             : MemoryTableChange::Kind::update));
        if (auto r = std::forward<VaStep>(va)(); !r) {
            (void)deliver(diff.inverse(), MemoryTableChange::Kind::rollback);
            return r;
        }
        table_.apply(diff);
        return {};
    }

    /// Gives one change to every listener, all or nothing. A refusal of an update gives the
    /// listeners that accepted it the inverse, newest first, and is returned. A cut-off, or any
    /// failure of a rollback, drops the listener and counts as accepted. Two-phase listeners
    /// are all sent the change first and awaited after (in parallel, in effect).
    Result<void> deliver(const TableDiff& diff, MemoryTableChange::Kind kind)
    {
        const MemoryTableChange change{kind, diff.removed, diff.added};
        std::vector<Entry*> accepted;
        Result<void> result;
        for (Entry& e : listeners_) {
            if (e.dropped)
                continue;
            auto r = e.apply(change);
            if (r) {
                accepted.push_back(&e);
                continue;
            }
            if (kind == MemoryTableChange::Kind::rollback ||
                r.error().code() == listener_errc::cut_off) {
                e.dropped = true;
                continue;
            }
            result = refused(e, change, std::move(r).error());
            break;
        }
        await_all(accepted);
        if (!result) {
            const MemoryTableChange inverse{MemoryTableChange::Kind::rollback, diff.added,
                                            diff.removed};
            std::vector<Entry*> undone;
            for (auto it = accepted.rbegin(); it != accepted.rend(); ++it) {
                if ((*it)->dropped)
                    continue;
                if ((*it)->apply(inverse))
                    undone.push_back(*it);
                else
                    (*it)->dropped = true;
            }
            await_all(undone);
        }
        std::erase_if(listeners_, [](const Entry& e) { return e.dropped; });
        return result;
    }

    /// The second phase of the two-phase listeners among `sent`: it cannot refuse; any error
    /// drops the listener (mapping/memory_listener.hpp).
    static void await_all(const std::vector<Entry*>& sent)
    {
        for (Entry* e : sent)
            if (e->await && !e->dropped && !e->await())
                e->dropped = true;
    }

    static Error refused(const Entry& e, const MemoryTableChange& change, Error cause)
    {
        const MemoryRange at = change.extent();
        return std::move(cause).context(
            "memory listener '" + e.name + "' (#" + std::to_string(e.id.value) + ") refused " +
            (change.kind == MemoryTableChange::Kind::initial
                 ? std::string("the initial table")
                 : "the change of " + (at.empty() ? std::string("nothing") : at.to_string())));
    }

    MemoryTable table_;
    std::vector<Entry> listeners_;
    std::uint64_t next_id_ = 1;
};

} // namespace membacking::detail
