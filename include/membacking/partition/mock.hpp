/**
 * @file partition/mock.hpp
 * Layer: partition (includes base/, detail/ and partition/partition_mapper.hpp).
 *
 * MockPartition: a first-class, portable partition policy that records every call in order,
 * keeps the view a real hypervisor would have (which GPA windows are mapped, from which host VA,
 * with which permissions), and can be told to fail a call with a given error: the next call of
 * one kind (fail_next(Op::unmap): a test need not know how many other calls come first), or the
 * N-th call of any kind from now (fail_nth_call).
 *
 * It is strict where real hypervisors are strict, so that it catches manager bugs: mapping over
 * an existing window fails (KVM and WHP reject overlapping slots), and unmapping part of a window
 * fails (KVM cannot shrink a memslot). A failing call changes nothing.
 *
 * It is quiesce-aware: every recorded call says whether the VMM's quiesce hook held the vCPUs
 * when it was made (Call::quiesced), so tests can check that a step ran inside the bracket.
 *
 * Thread-safe: calls and queries take one mutex.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/detail/interval_map.hpp>
#include <membacking/partition/partition_mapper.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace membacking {

class MockPartition {
public:
    static constexpr std::string_view name = "mock";
    static constexpr PartitionFeatures features =
        PartitionFeatures::prefetch | PartitionFeatures::pin | PartitionFeatures::dirty_log |
        PartitionFeatures::quiesce_aware;

    enum class Op : std::uint8_t {
        map,
        unmap,
        prefetch,
        pin,
        unpin,
        set_dirty_logging,
        take_dirty_log,
        set_quiesced
    };

    /// One recorded call. host_va, writable and executable are meaningful for map only;
    /// writable carries `enabled` for set_dirty_logging and `quiesced` for set_quiesced.
    struct Call {
        Op op = Op::map;
        std::uint64_t gpa = 0;
        std::uint64_t size = 0;
        const void* host_va = nullptr;
        bool writable = false;
        bool executable = false;
        bool failed = false;   ///< this call was made to fail
        bool quiesced = false; ///< the vCPUs were held (set_quiesced(true)) when it was made

        friend bool operator==(const Call&, const Call&) noexcept = default;
    };

    /// One mapped window, as the partition sees it.
    struct Window {
        std::uint64_t gpa = 0;
        std::uint64_t size = 0;
        const void* host_va = nullptr;
        bool writable = false;
        bool executable = false;
        bool pinned = false;
        friend bool operator==(const Window&, const Window&) noexcept = default;
    };

    MockPartition() = default;
    MockPartition(const MockPartition&) = delete;
    MockPartition& operator=(const MockPartition&) = delete;

    Result<void> map_range(void* host_va, std::uint64_t gpa, std::uint64_t size, bool writable,
                           bool executable)
    {
        std::lock_guard lock(mutex_);
        Call call{Op::map, gpa, size, host_va, writable, executable};
        if (auto e = next_failure(call))
            return *e;
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        if (!range || range->empty())
            return reject(call, errc::invalid_range,
                          "mock partition: invalid map of " + MemoryRange::hex(size) +
                              " bytes at " + MemoryRange::hex(gpa));
        if (const Window* w = windows_.first_overlap(*range))
            return reject(call, errc::overlap,
                          "mock partition: map of " + range->to_string() +
                              " overlaps mapped window " + window_range(*w).to_string());
        windows_.insert(Window{gpa, size, host_va, writable, executable});
        record(call);
        return {};
    }

    Result<void> unmap_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        Call call{Op::unmap, gpa, size};
        if (auto e = next_failure(call))
            return *e;
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        if (!range)
            return reject(call, errc::invalid_range, "mock partition: invalid unmap range");
        // Whole windows only: a window cut in half is an error, as in KVM.
        const auto cover = windows_.cover(*range);
        if (cover.cut != nullptr)
            return reject(call, errc::invalid_range,
                          "mock partition: unmap of " + range->to_string() +
                              " would split mapped window " + window_range(*cover.cut).to_string());
        for (const Window& w : cover.inside)
            windows_.erase(w.gpa);
        record(call);
        return {};
    }

    Result<void> prefetch_range(std::uint64_t gpa, std::uint64_t size)
    {
        return window_op(Op::prefetch, gpa, size, [](Window&) {});
    }
    Result<void> pin_range(std::uint64_t gpa, std::uint64_t size)
    {
        return window_op(Op::pin, gpa, size, [](Window& w) { w.pinned = true; });
    }
    Result<void> unpin_range(std::uint64_t gpa, std::uint64_t size)
    {
        return window_op(Op::unpin, gpa, size, [](Window& w) { w.pinned = false; });
    }
    /// Partition-wide: every window, including later ones, logs writes while it is on.
    Result<void> set_dirty_logging(bool enabled)
    {
        std::lock_guard lock(mutex_);
        Call call{Op::set_dirty_logging, 0, 0, nullptr, enabled, false};
        if (auto e = next_failure(call))
            return *e;
        dirty_logging_ = enabled;
        if (!enabled)
            dirty_.clear();
        record(call);
        return {};
    }
    /// The quiesce bracket's notice: recorded, and stamped on every call until it ends.
    void set_quiesced(bool quiesced) noexcept
    {
        std::lock_guard lock(mutex_);
        quiesced_ = quiesced;
        record(Call{Op::set_quiesced, 0, 0, nullptr, quiesced, false});
    }
    Result<std::vector<std::uint64_t>> take_dirty_log(std::uint64_t gpa, std::uint64_t size)
    {
        std::vector<std::uint64_t> bitmap((size / page_size + 63) / 64, 0);
        auto r = window_op(Op::take_dirty_log, gpa, size, [&](Window& w) {
            for (std::uint64_t off = 0; off < size; off += page_size) {
                if (dirty_.erase(w.gpa + off) != 0)
                    bitmap[(off / page_size) / 64] |= std::uint64_t{1} << ((off / page_size) % 64);
            }
        });
        if (!r)
            return std::move(r).error();
        return bitmap;
    }

    // ---- test controls ----

    /// The n-th call from now (1 = the next one), of any kind, fails with `error` and changes
    /// nothing.
    void fail_nth_call(std::size_t n, Error error)
    {
        std::lock_guard lock(mutex_);
        failure_ = Failure{calls_seen_ + n, std::move(error)};
    }
    /// The next call of kind `op` fails with `error` and changes nothing; calls of other kinds
    /// are not affected. One pending failure per kind: arming it again replaces it.
    void fail_next(Op op, Error error)
    {
        std::lock_guard lock(mutex_);
        op_failures_[static_cast<std::size_t>(op)] = std::move(error);
    }
    /// As above, with errc::resource_exhausted ("mock partition: injected <op> failure").
    void fail_next(Op op)
    {
        fail_next(op,
                  make_error(errc::resource_exhausted,
                             std::string("mock partition: injected ") + op_name(op) + " failure"));
    }
    /// Disarms every pending failure.
    void clear_failure()
    {
        std::lock_guard lock(mutex_);
        failure_.reset();
        for (auto& f : op_failures_)
            f.reset();
    }
    /// Simulates a guest write the hypervisor logged (only while logging is on, in a window).
    void mark_dirty(std::uint64_t gpa)
    {
        std::lock_guard lock(mutex_);
        if (dirty_logging_ && window_at(gpa) != nullptr)
            dirty_.emplace(align_down(gpa, page_size), true);
    }

    // ---- queries ----

    /// Whether dirty logging is on.
    [[nodiscard]] bool dirty_logging() const
    {
        std::lock_guard lock(mutex_);
        return dirty_logging_;
    }

    [[nodiscard]] std::vector<Call> calls() const
    {
        std::lock_guard lock(mutex_);
        return calls_;
    }
    void clear_calls()
    {
        std::lock_guard lock(mutex_);
        calls_.clear();
    }
    /// Turns the call log off (benchmarks: the log would grow without bound) or back on.
    void set_recording(bool on)
    {
        std::lock_guard lock(mutex_);
        recording_ = on;
        calls_.clear();
    }
    [[nodiscard]] std::vector<Window> windows() const
    {
        std::lock_guard lock(mutex_);
        std::vector<Window> out;
        for (const auto& [start, w] : windows_)
            out.push_back(w);
        return out;
    }
    /// The window mapping gpa, if any.
    [[nodiscard]] std::optional<Window> lookup(std::uint64_t gpa) const
    {
        std::lock_guard lock(mutex_);
        const Window* w = window_at(gpa);
        return w ? std::optional<Window>(*w) : std::nullopt;
    }

    [[nodiscard]] static constexpr const char* op_name(Op op) noexcept
    {
        constexpr const char* names[] = {"map",
                                         "unmap",
                                         "prefetch",
                                         "pin",
                                         "unpin",
                                         "set_dirty_logging",
                                         "take_dirty_log",
                                         "set_quiesced"};
        return names[static_cast<std::size_t>(op)];
    }

    friend std::ostream& operator<<(std::ostream& os, const Call& c)
    {
        os << op_name(c.op) << "(" << MemoryRange::hex(c.gpa) << "+" << MemoryRange::hex(c.size);
        if (c.op == Op::map)
            os << (c.writable ? ", rw" : ", ro") << (c.executable ? "x" : "");
        return os << ")" << (c.failed ? " [failed]" : "");
    }

private:
    struct Failure {
        std::size_t at_call = 0;
        Error error;
    };

    static MemoryRange window_range(const Window& w)
    {
        return MemoryRange::valid_or_abort(w.gpa, w.gpa + w.size);
    }
    struct WindowRange {
        MemoryRange operator()(const Window& w) const { return window_range(w); }
    };

    /// Counts the call; returns the injected error if this is the one to fail.
    std::optional<Error> next_failure(Call& call)
    {
        ++calls_seen_;
        std::optional<Error> e;
        if (failure_ && failure_->at_call == calls_seen_) {
            e = std::move(failure_->error);
            failure_.reset();
        } else if (auto& by_kind = op_failures_[static_cast<std::size_t>(call.op)]) {
            e = std::exchange(by_kind, std::nullopt);
        }
        if (e) {
            call.failed = true;
            record(call);
        }
        return e;
    }

    void record(Call call)
    {
        call.quiesced = quiesced_;
        if (recording_)
            calls_.push_back(call);
    }

    Error reject(Call& call, errc code, std::string message)
    {
        call.failed = true;
        record(call);
        return make_error(code, std::move(message));
    }

    const Window* window_at(std::uint64_t gpa) const { return windows_.containing(gpa); }

    /// An operation on exactly one mapped window [gpa, gpa+size).
    template <class F>
    Result<void> window_op(Op op, std::uint64_t gpa, std::uint64_t size, F&& f)
    {
        std::lock_guard lock(mutex_);
        Call call{op, gpa, size, nullptr, false, false};
        if (auto e = next_failure(call))
            return *e;
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        Window* w = range ? windows_.find_exact(*range) : nullptr;
        if (w == nullptr)
            return reject(call, errc::not_found,
                          "mock partition: no mapped window " + MemoryRange::hex(gpa) + "+" +
                              MemoryRange::hex(size));
        f(*w);
        record(call);
        return {};
    }

    mutable std::mutex mutex_;
    detail::IntervalMap<Window, WindowRange> windows_;
    std::map<std::uint64_t, bool> dirty_; ///< dirty page GPAs
    bool dirty_logging_ = false;
    bool quiesced_ = false;
    std::vector<Call> calls_;
    std::size_t calls_seen_ = 0;
    bool recording_ = true;
    std::optional<Failure> failure_;
    static constexpr std::size_t op_count = static_cast<std::size_t>(Op::set_quiesced) + 1;
    std::array<std::optional<Error>, op_count> op_failures_; ///< fail_next, by Op
};

static_assert(PartitionMapper<MockPartition>);

} // namespace membacking
