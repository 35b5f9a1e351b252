/**
 * @file detail/undo_log.hpp
 * Internal (namespace membacking::detail); includes base/ only.
 *
 * The mechanism behind "every control operation is all-or-nothing": each step that changed the
 * outside world pushes the step that reverses it; a failure runs the list backwards. An undo step
 * must not fail for a host reason: the steps that touch the host (the mapping manager's and the
 * partition set's) check rolling_back() and, when the host refuses, quarantine the VA mapper or
 * mark the partition failed, and report success (issue 10, defect 7: a host whose resource keeps
 * failing must not kill the VMM). A step that still fails is a library bug: the guest's view and
 * the books would disagree with no way back, so that is fatal (base/fatal.hpp), never silent.
 *
 * rolling_back() tells a step's callee that it is being called to undo (on this thread, by any
 * UndoLog): a run-time listener (mapping/memory_listener.hpp) cannot refuse such a call, and one
 * that fails it is cut off instead of making the rollback fatal.
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/result.hpp>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace membacking::detail {

class UndoLog {
public:
    UndoLog() = default;
    UndoLog(const UndoLog&) = delete;
    UndoLog& operator=(const UndoLog&) = delete;

    /// Rolls back whatever was not committed (the error path of an early return).
    ~UndoLog() { rollback(); }

    /// Records how to reverse a step that just succeeded.
    void push(std::function<Result<void>()> undo) { steps_.push_back(std::move(undo)); }

    /// The operation succeeded: forget the undo steps.
    void commit() noexcept { steps_.clear(); }

    /// Moves the other log's steps to the end of this one (a sub-operation joining its caller).
    void absorb(UndoLog&& other)
    {
        for (auto& s : other.steps_)
            steps_.push_back(std::move(s));
        other.steps_.clear();
    }

    /// Reverses every recorded step, newest first.
    void rollback() noexcept
    {
        if (steps_.empty())
            return;
        ++depth(); // int: trivially destructible, as MinGW's emulated TLS needs (veh_handler.hpp)
        while (!steps_.empty()) {
            auto step = std::move(steps_.back());
            steps_.pop_back();
            if (auto r = step(); !r)
                fatal("rollback step failed, guest memory state is now inconsistent: " +
                      r.error().full_message());
        }
        --depth();
    }

    /// Whether an UndoLog on this thread is running its steps.
    [[nodiscard]] static bool rolling_back() noexcept { return depth() > 0; }

    [[nodiscard]] bool empty() const noexcept { return steps_.empty(); }

private:
    static int& depth() noexcept
    {
        static thread_local int rollbacks = 0;
        return rollbacks;
    }

    std::vector<std::function<Result<void>()>> steps_;
};

} // namespace membacking::detail
