/**
 * RecordingSink: a RegionEventSink for region-manager tests.
 *
 * - The VA side is a per-page model of what a VA mapper would hold (which object, file offset,
 *   writability), updated with the sink's replace / split semantics.
 * - The partition side forwards to a real MockPartition, whose own strictness (no overlapping
 *   maps, no partial unmaps) checks the region manager's event stream.
 * - Every call is logged as a short string ("va+ 0x0-0x2000 rw", "part- 0x0-0x2000"), so ordering
 *   tests read like the reference's expected event lists.
 * - removals() lists the ranges remove_mappings took out, so make-before-break tests can check
 *   that no GPA both states map was ever absent.
 * - fail_call(n) makes the n-th sink call from now fail (VA or partition alike) without effect.
 */
#pragma once

#include <membacking/partition/mock.hpp>
#include <membacking/region/event_sink.hpp>
#include <membacking/region/mapping.hpp>

#include "pages.hpp"

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace membacking::test {

class RecordingSink {
public:
    /// What the VA side holds for one page.
    struct Page {
        std::uintptr_t object = 0; ///< Mappable identity; 0 = private memory
        std::uint64_t file_offset = 0;
        bool writable = false;
        RegionId region;
        friend bool operator==(const Page&, const Page&) noexcept = default;
    };

    static constexpr std::uint64_t fake_va_base = 0x7f0000000000;

    Result<void> add_mapping(const ActiveMapping& m)
    {
        log_.push_back("va+ " + m.gpa.to_string() + (m.writable ? " rw" : " ro"));
        if (auto e = maybe_fail())
            return *e;
        for (const std::uint64_t gpa : pages_of(m.gpa))
            pages_[gpa] =
                Page{m.backing.object.identity(),
                     m.backing.is_private() ? 0 : m.backing.file_offset + (gpa - m.gpa.start()),
                     m.writable, m.region};
        return {};
    }

    Result<void> remove_mappings(const MemoryRange& r)
    {
        log_.push_back("va- " + r.to_string());
        if (auto e = maybe_fail())
            return *e;
        for (const std::uint64_t gpa : pages_of(r))
            pages_.erase(gpa);
        removals_.push_back(r);
        return {};
    }

    Result<void> map_region(const RegionActivation& a)
    {
        log_.push_back("part+ " + a.gpa.to_string() + (a.params.writable ? " rw" : " ro"));
        if (auto e = maybe_fail())
            return *e;
        return partition.map_range(reinterpret_cast<void*>(fake_va_base + a.gpa.start()),
                                   a.gpa.start(), a.gpa.size(), a.params.writable,
                                   a.params.executable);
    }

    Result<void> unmap_region(const RegionActivation& a)
    {
        log_.push_back("part- " + a.gpa.to_string());
        if (auto e = maybe_fail())
            return *e;
        return partition.unmap_range(a.gpa.start(), a.gpa.size());
    }

    /// The n-th sink call from now (1 = next) fails with an injected error.
    void fail_call(std::size_t n) { fail_at_ = calls_ + n; }
    void clear_failure() { fail_at_.reset(); }
    [[nodiscard]] bool failure_pending() const { return fail_at_.has_value(); }

    [[nodiscard]] const std::vector<std::string>& log() const { return log_; }
    void clear_log()
    {
        log_.clear();
        removals_.clear();
    }
    /// The ranges remove_mappings removed (failed calls excluded) since the last clear_log().
    [[nodiscard]] const std::vector<MemoryRange>& removals() const { return removals_; }
    [[nodiscard]] std::size_t call_count() const { return calls_; }

    [[nodiscard]] std::optional<Page> page(std::uint64_t gpa) const
    {
        auto it = pages_.find(gpa);
        return it == pages_.end() ? std::nullopt : std::optional<Page>(it->second);
    }
    [[nodiscard]] const std::map<std::uint64_t, Page>& pages() const { return pages_; }

    MockPartition partition;

private:
    std::optional<Error> maybe_fail()
    {
        ++calls_;
        if (fail_at_ && *fail_at_ == calls_) {
            fail_at_.reset();
            log_.back() += " [injected failure]";
            return make_error(errc::resource_exhausted, "injected sink failure");
        }
        return std::nullopt;
    }

    std::map<std::uint64_t, Page> pages_;
    std::vector<std::string> log_;
    std::vector<MemoryRange> removals_;
    std::size_t calls_ = 0;
    std::optional<std::size_t> fail_at_;
};

static_assert(RegionEventSink<RecordingSink>);

} // namespace membacking::test
