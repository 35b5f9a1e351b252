/**
 * @file partition/whp.hpp
 * Layer: partition (includes base/, detail/, os/winhvplatform.hpp, partition/partition_mapper.hpp).
 * The whole body is Windows-only.
 *
 * WhpPartition: the Windows Hypervisor Platform partition policy. It is given a WHP partition
 * handle (WHV_PARTITION_HANDLE) that the VMM created, set up and keeps; it never deletes it. Each
 * window the manager gives it is one GPA range mapped from the VA mapper's memory.
 *
 * - Map: WHvMapGpaRange(partition, host VA, GPA, size, Read | Write? | Execute?). WHP, unlike
 *   KVM, expresses "not executable": the executable flag is honoured.
 * - Unmap: WHvUnmapGpaRange of each whole window inside the range; unmapping part of a window is
 *   an error (errc::invalid_range), as with KVM and the mock, because the manager only ever
 *   unmaps what it mapped. Several windows at once are all or nothing: if one fails, the ones
 *   already unmapped are mapped again (and pinned again if they were). If WHP refuses that too
 *   (its resource keeps failing), the call fails with errc::quarantined, naming both failures,
 *   and windows() follows WHP: a window it will not map again is gone, one it will not pin
 *   again is unpinned (issue 10, defect 7: never fatal() for a host failure). The manager marks
 *   such a partition failed (manager/detail/partition_set.hpp).
 * - A change of permissions is, at the manager's level, an unmap and a map (WHP cannot change
 *   the flags of a mapped range in place).
 * - Prefetch: WHvAdviseGpaRange(WHvAdviseGpaRangeCodePopulate, Prefetch) over a range inside one
 *   window, for write access if the window is writable, so the hypervisor's second-level page
 *   tables are filled before the guest runs.
 * - Pin: WHvAdviseGpaRange(WHvAdviseGpaRangeCodePin / Unpin) of one exact window. A pinned
 *   window is unpinned before it is unmapped.
 * - WHvAdviseGpaRange exists from Windows 10 2004 on; without it prefetch and pin report
 *   errc::unsupported. Dirty-page tracking (WHvQueryGpaRangeDirtyBitmap) is not offered yet.
 *
 * Everything comes from WinHvPlatform.dll at run time (os/winhvplatform.hpp): without the DLL,
 * create() returns an error saying the Windows Hypervisor Platform is missing. Tests substitute a
 * stand-in DLL that records every call (tests/windows/whp_standin.cpp). Every call leaves the
 * partition as it was when it fails, but for the errc::quarantined case above. Thread-safe.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_WINDOWS

#    include <membacking/base/align.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/base/units.hpp>
#    include <membacking/detail/interval_map.hpp>
#    include <membacking/os/winhvplatform.hpp>
#    include <membacking/partition/partition_mapper.hpp>

#    include <cstdint>
#    include <memory>
#    include <mutex>
#    include <optional>
#    include <string>
#    include <string_view>
#    include <utility>
#    include <vector>

namespace membacking {

class WhpPartition {
public:
    static constexpr std::string_view name = "whp";
    static constexpr PartitionFeatures features =
        PartitionFeatures::prefetch | PartitionFeatures::pin;

    /// One mapped window, as the partition sees it.
    struct Window {
        std::uint64_t gpa = 0;
        std::uint64_t size = 0;
        void* host_va = nullptr;
        bool writable = false;
        bool executable = false;
        bool pinned = false;
        friend bool operator==(const Window&, const Window&) noexcept = default;
    };

    /// A partition over `partition` (a set-up WHV_PARTITION_HANDLE the caller keeps alive),
    /// calling WinHvPlatform.dll.
    [[nodiscard]] static Result<std::shared_ptr<WhpPartition>>
    create(os::whp_abi::PartitionHandle partition)
    {
        const auto& api = os::WinHvPlatform::system();
        if (!api)
            return api.error().context("cannot create a WHP partition mapper");
        return create(partition, *api);
    }

    /// The same, calling the given function table.
    [[nodiscard]] static Result<std::shared_ptr<WhpPartition>>
    create(os::whp_abi::PartitionHandle partition, std::shared_ptr<const os::WinHvPlatform> api)
    {
        if (partition == nullptr)
            return make_error(errc::invalid_argument, "no WHP partition handle");
        if (!api)
            return make_error(errc::invalid_argument, "no WinHvPlatform function table");
        return std::shared_ptr<WhpPartition>(new WhpPartition(partition, std::move(api)));
    }

    WhpPartition(const WhpPartition&) = delete;
    WhpPartition& operator=(const WhpPartition&) = delete;

    Result<void> map_range(void* host_va, std::uint64_t gpa, std::uint64_t size, bool writable,
                           bool executable)
    {
        std::lock_guard lock(mutex_);
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        if (!range || range->empty() || !is_page_aligned(size) || !is_page_aligned(gpa) ||
            !is_page_aligned(reinterpret_cast<std::uintptr_t>(host_va)))
            return make_error(errc::invalid_range,
                              "WHP: invalid window of " + MemoryRange::hex(size) + " bytes at " +
                                  MemoryRange::hex(gpa) + " (page aligned, non-empty)");
        if (const Window* other = windows_.first_overlap(*range))
            return make_error(errc::overlap, "WHP: window " + range->to_string() +
                                                 " overlaps mapped window " +
                                                 span_of(*other).to_string());
        const Window w{gpa, size, host_va, writable, executable, false};
        MEMBACKING_TRY(raw_map(w));
        windows_.insert(w);
        return {};
    }

    /// Unmaps every window inside [gpa, gpa+size), which must not cut a window in half.
    Result<void> unmap_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        if (!range)
            return std::move(range).error().context("WHP unmap");
        const auto cover = windows_.cover(*range);
        if (const Window* cut = cover.cut)
            return make_error(errc::invalid_range, "WHP: unmapping " + range->to_string() +
                                                       " would split mapped window " +
                                                       span_of(*cut).to_string());
        std::vector<Window> undone; // windows already unmapped (and unpinned)
        Restore restore;
        for (const Window& w : cover.inside) {
            if (w.pinned) {
                if (auto r = advise(w, os::whp_abi::advise_unpin, nullptr, 0); !r)
                    return roll_back(undone, restore, *range,
                                     std::move(r).error().context("WHP: unpinning before unmap"));
            }
            if (const HRESULT hr = api_->unmap_gpa_range(partition_, w.gpa, w.size); FAILED(hr)) {
                if (w.pinned)
                    repin(w, restore);
                return roll_back(undone, restore, *range,
                                 os::hresult_error(hr, "WHvUnmapGpaRange of " +
                                                           span_of(w).to_string() + " failed"));
            }
            undone.push_back(w);
        }
        for (const Window& w : undone)
            windows_.erase(w.gpa);
        return {};
    }

    /// Asks WHP to populate [gpa, gpa+size), which lies inside one mapped window.
    Result<void> prefetch_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        const Window* w = range ? windows_.containing(*range) : nullptr;
        if (w == nullptr)
            return make_error(errc::not_found, "WHP: no mapped window holds " +
                                                   MemoryRange::hex(gpa) + "+" +
                                                   MemoryRange::hex(size));
        const os::whp_abi::AdvisePopulate populate{os::whp_abi::populate_prefetch,
                                                   w->writable ? os::whp_abi::access_write
                                                               : os::whp_abi::access_read};
        return advise(Window{gpa, size, w->host_va, w->writable, w->executable, w->pinned},
                      os::whp_abi::advise_populate, &populate, sizeof(populate));
    }

    /// Pins one exact mapped window.
    Result<void> pin_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        Window* w = exact(gpa, size);
        if (w == nullptr)
            return no_window(gpa, size);
        if (w->pinned)
            return {};
        MEMBACKING_TRY(advise(*w, os::whp_abi::advise_pin, nullptr, 0));
        w->pinned = true;
        return {};
    }

    Result<void> unpin_range(std::uint64_t gpa, std::uint64_t size)
    {
        std::lock_guard lock(mutex_);
        Window* w = exact(gpa, size);
        if (w == nullptr)
            return no_window(gpa, size);
        if (!w->pinned)
            return {};
        MEMBACKING_TRY(advise(*w, os::whp_abi::advise_unpin, nullptr, 0));
        w->pinned = false;
        return {};
    }

    [[nodiscard]] std::vector<Window> windows() const
    {
        std::lock_guard lock(mutex_);
        std::vector<Window> out;
        for (const auto& [gpa, w] : windows_)
            out.push_back(w);
        return out;
    }
    [[nodiscard]] os::whp_abi::PartitionHandle handle() const noexcept { return partition_; }

private:
    WhpPartition(os::whp_abi::PartitionHandle partition,
                 std::shared_ptr<const os::WinHvPlatform> api)
        : partition_(partition), api_(std::move(api))
    {}

    /// What unmap_range's rollback could not put back.
    struct Restore {
        std::string lost;             ///< windows left unmapped or unpinned, for the message
        std::optional<Error> refused; ///< WHP's first refusal
    };

    /// Pins w again after a failed unmap; if WHP refuses, the books say it is unpinned.
    void repin(const Window& w, Restore& restore)
    {
        auto r = advise(w, os::whp_abi::advise_pin, nullptr, 0);
        if (r)
            return;
        if (Window* kept = exact(w.gpa, w.size); kept != nullptr)
            kept->pinned = false;
        restore.lost += (restore.lost.empty() ? "" : ", ") + span_of(w).to_string() + " unpinned";
        if (!restore.refused)
            restore.refused = std::move(r).error();
    }

    /// unmap_range's rollback: maps (and pins) the windows `undone` again, last first, after an
    /// unmap of `range` failed with `cause`. What WHP will not take back is reported
    /// (errc::quarantined) and left out of the books (see the file comment).
    Result<void> roll_back(const std::vector<Window>& undone, Restore& restore,
                           const MemoryRange& range, Error cause)
    {
        for (auto it = undone.rbegin(); it != undone.rend(); ++it) {
            if (auto r = raw_map(*it); !r) {
                windows_.erase(it->gpa);
                restore.lost +=
                    (restore.lost.empty() ? "" : ", ") + span_of(*it).to_string() + " unmapped";
                if (!restore.refused)
                    restore.refused = std::move(r).error();
                continue;
            }
            if (it->pinned)
                repin(*it, restore);
        }
        if (!restore.refused)
            return cause;
        return Error(make_error_code(errc::quarantined),
                     "WHP: unmapping " + range.to_string() + " failed (" + cause.full_message() +
                         "), and WHP would not put back windows " + restore.lost,
                     std::move(*restore.refused));
    }

    static MemoryRange span_of(const Window& w)
    {
        return MemoryRange::valid_or_abort(w.gpa, w.gpa + w.size);
    }
    struct WindowSpan {
        MemoryRange operator()(const Window& w) const { return span_of(w); }
    };

    static Error no_window(std::uint64_t gpa, std::uint64_t size)
    {
        return make_error(errc::not_found, "WHP: no window maps exactly " + MemoryRange::hex(gpa) +
                                               "+" + MemoryRange::hex(size));
    }

    Result<void> raw_map(const Window& w)
    {
        std::uint32_t flags = os::whp_abi::map_read;
        if (w.writable)
            flags |= os::whp_abi::map_write;
        if (w.executable)
            flags |= os::whp_abi::map_execute;
        if (const HRESULT hr = api_->map_gpa_range(partition_, w.host_va, w.gpa, w.size, flags);
            FAILED(hr))
            return os::hresult_error(hr, "WHvMapGpaRange of " + span_of(w).to_string() + " failed");
        return {};
    }

    Result<void> advise(const Window& w, std::uint32_t code, const void* buffer,
                        std::uint32_t buffer_size)
    {
        static constexpr const char* names[] = {"populate", "pin", "unpin"};
        if (api_->advise_gpa_range == nullptr)
            return make_error(errc::unsupported,
                              std::string("WHP cannot ") + names[code] +
                                  " guest memory: WHvAdviseGpaRange needs Windows 10 2004 or "
                                  "later");
        const os::whp_abi::MemoryRangeEntry entry{w.gpa, w.size};
        if (const HRESULT hr =
                api_->advise_gpa_range(partition_, &entry, 1, code, buffer, buffer_size);
            FAILED(hr))
            return os::hresult_error(hr, std::string("WHvAdviseGpaRange(") + names[code] + ") of " +
                                             span_of(w).to_string() + " failed");
        return {};
    }

    Window* exact(std::uint64_t gpa, std::uint64_t size)
    {
        auto range = MemoryRange::from(Gpa{gpa}, Length{size});
        return range ? windows_.find_exact(*range) : nullptr;
    }

    mutable std::mutex mutex_;
    const os::whp_abi::PartitionHandle partition_;
    const std::shared_ptr<const os::WinHvPlatform> api_;
    detail::IntervalMap<Window, WindowSpan> windows_; ///< by GPA
};

static_assert(detail::check_partition_mapper<WhpPartition>());

} // namespace membacking

#endif // MEMBACKING_OS_WINDOWS
