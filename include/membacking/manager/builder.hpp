/**
 * @file manager/builder.hpp
 * Layer: manager.
 *
 * GuestMemoryBuilder<Manager>: validates the RAM layout, allocates the backings, reserves the
 * primary VA mapper and creates the RAM regions. Validation order and error messages are the
 * reference's (inventory §2.4), so that tools matching on them keep working. Validation errors
 * carry build_errc codes; a failure of an allocation, the VA mapper or a RAM region keeps its root
 * cause's code (an errno in std::system_category(), or an errc) and adds the reference's text as
 * the Error's message (Error::context), as base/result.hpp's rule says. Fixed from the reference:
 * - overlapping RAM ranges (build_errc::invalid_ram_layout), or RAM past the address space
 *   (errc::out_of_range under "invalid RAM range ..."), are an error, not a panic;
 * - with x86 legacy support, RAM that ends exactly at 1 MiB does not create an empty region;
 * - a failure part way leaves nothing behind (the half-built manager is destroyed);
 * - an existing mappable smaller than the RAM it backs is refused before anything is allocated
 *   (errc::invalid_range, naming the backing's ranges and both sizes).
 *
 * x86 legacy support splits the RAM range that starts at 0 into 16 separately controllable
 * regions: low 640K, the VGA window, twelve 16K PAM segments (0xc0000-0xf0000), the 64K F
 * segment (x86_legacy::ranges, which also names them), and the rest above 1 MiB.
 *
 * Layout and names, fixed from the reference:
 * - each backing's ranges are laid out in its object in ascending GPA order, whatever order the
 *   request lists them in (the reference uses list order, so a restore that lists them in
 *   another order silently permutes guest memory);
 * - each RAM range gets its own region name: over all backings, in ascending GPA order, the
 *   first RAM range is "ram" and the i-th after it "ram-<i>" ("ram-1", "ram-2", ...); with x86
 *   legacy support, the range at 0 is named so for its part above 1 MiB, and its legacy pieces
 *   have the names of x86_legacy::ranges. (The reference calls every range "ram".)
 */
#pragma once

#include <membacking/base/align.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/memory_size.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>
#include <membacking/manager/errors.hpp>
#include <membacking/manager/ram_backing_request.hpp>
#include <membacking/manager/shared_backing.hpp>
#include <membacking/manager/x86_legacy.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/va/va_policy.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace membacking {

namespace detail {
// The reference's validation helpers and its allocation error, as the builder uses them (tests
// check their messages directly).

/// The reference's validate_hugepage_size.
[[nodiscard]] inline Result<std::uint64_t> validate_hugepage_size(std::uint64_t size)
{
    if (!is_power_of_two(size) || size < page_size)
        return build_error(build_errc::invalid_hugepage_size,
                           "hugepage size " + MemorySize{size}.to_string() +
                               " must be a power of two and at least the host page size");
    if (size > std::numeric_limits<std::size_t>::max())
        return build_error(build_errc::hugepage_size_too_large,
                           "hugepage size " + MemorySize{size}.to_string() + " is too large");
    return size;
}

/// The reference's validate_hugepage_ram_alignment.
[[nodiscard]] inline Result<void>
validate_hugepage_ram_alignment(std::uint64_t total, const std::vector<MemoryRange>& ranges,
                                std::uint64_t hugepage)
{
    if (total % hugepage != 0)
        return build_error(build_errc::hugepage_ram_size_unaligned,
                           "RAM size " + MemorySize{total}.to_string() + " is not aligned to " +
                               MemorySize{hugepage}.to_string() +
                               " hugepages; choose a memory size that is a multiple of the "
                               "hugepage size");
    for (const MemoryRange& r : ranges)
        if (r.start() % hugepage != 0 || r.size() % hugepage != 0)
            return build_error(build_errc::hugepage_ram_range_unaligned,
                               "RAM range " + r.to_string() + " (" +
                                   MemorySize{r.size()}.to_string() + ") is not aligned to " +
                                   MemorySize{hugepage}.to_string() +
                                   " hugepages; range start and size must both be multiples "
                                   "of the hugepage size");
    return {};
}

/// The reference's HugepageAllocationFailed text, as context over the OS error (whose code the
/// result keeps).
[[nodiscard]] inline Error hugepage_allocation_failed(std::uint64_t size, std::uint64_t hugepage,
                                                      const std::error_code& os_code)
{
    return Error(os_code, os_code.message())
        .context("failed to reserve " + std::to_string(size / hugepage) + " hugetlb pages of " +
                 MemorySize{hugepage}.to_string() + " each (" + MemorySize{size}.to_string() +
                 " total); increase the hugetlb pool or reduce guest memory size");
}

} // namespace detail

template <class Manager>
class GuestMemoryBuilder {
    using Core = typename Manager::Core;
    using Va = typename Manager::VaPolicyType;

public:
    static constexpr std::uint64_t legacy_low_ram_end = x86_legacy::end;

    /// VTL2 partitions also get all of memory at gpa + offset (std::nullopt: no alias map).
    GuestMemoryBuilder& vtl0_alias_map(std::optional<Length> offset)
    {
        vtl0_alias_map_ = offset ? std::optional<std::uint64_t>(offset->value()) : std::nullopt;
        return *this;
    }
    /// Pin each range in every partition after mapping it (device assignment).
    GuestMemoryBuilder& pin_mappings(bool on)
    {
        pin_mappings_ = on;
        return *this;
    }
    /// Split low RAM into the x86 legacy regions (PAM, VGA) so they can be controlled.
    GuestMemoryBuilder& x86_legacy_support(bool on)
    {
        x86_legacy_ = on;
        return *this;
    }
    GuestMemoryBuilder& add_backing(RamBackingRequest request)
    {
        backings_.push_back(std::move(request));
        return *this;
    }

    /// Builds a manager for a guest physical address space of `address_space` bytes: GPAs
    /// [0, address_space), which is what manager.max_address() then returns.
    [[nodiscard]] Result<Manager> build(Length address_space) const
    {
        const std::uint64_t max_addr = address_space.value();
        // 1. Each request on its own.
        for (const RamBackingRequest& req : backings_) {
            if (req.private_memory() && x86_legacy_)
                return build_error(build_errc::private_memory_with_legacy);
            if (req.private_memory() && !req.existing_mappable().empty())
                return build_error(build_errc::private_memory_with_existing_backing);
            if (req.hugepages()) {
                if (req.private_memory())
                    return build_error(build_errc::hugepages_with_private_memory);
                if (!req.existing_mappable().empty())
                    return build_error(build_errc::hugepages_with_existing_backing);
                if (x86_legacy_)
                    return build_error(build_errc::hugepages_with_legacy);
            }
        }
        // 2. x86 needs RAM at 0..1 MiB.
        if (x86_legacy_ && std::none_of(backings_.begin(), backings_.end(), [](const auto& req) {
                return std::any_of(req.ranges().begin(), req.ranges().end(), [](const auto& r) {
                    return r.start() == 0 && r.end() >= legacy_low_ram_end;
                });
            }))
            return build_error(build_errc::invalid_ram_for_x86);
        // Not in the reference (it panics, or silently shadows identical ranges): RAM ranges may
        // not overlap one another, within a backing or across backings.
        std::vector<MemoryRange> all;
        for (const RamBackingRequest& req : backings_)
            all.insert(all.end(), req.ranges().begin(), req.ranges().end());
        std::sort(all.begin(), all.end());
        for (std::size_t i = 1; i < all.size(); ++i)
            if (all[i - 1].overlaps(all[i]))
                return build_error(build_errc::invalid_ram_layout,
                                   "RAM range " + all[i].to_string() + " overlaps RAM range " +
                                       all[i - 1].to_string());
        // Not in the reference: a restored backing must back the ranges it was saved with.
        for (std::size_t i = 0; i < backings_.size(); ++i) {
            const auto& saved = backings_[i].restored_layout();
            if (!saved)
                continue;
            const auto asked = detail::canonical_ram_ranges(backings_[i].ranges());
            if (asked != *saved)
                return build_error(build_errc::restore_layout_mismatch,
                                   "backing " + std::to_string(i) + ": RAM ranges " +
                                       describe(asked) + " do not match the restored backing's " +
                                       describe(*saved));
        }
        // Not in the reference: an existing object must hold all the RAM it backs (its ranges
        // lie in it one after another from offset 0), checked before anything is allocated or
        // mapped; the reference maps it anyway and reads past its end fail later.
        for (std::size_t i = 0; i < backings_.size(); ++i) {
            const RamBackingRequest& req = backings_[i];
            if (req.existing_mappable().empty())
                continue;
            std::uint64_t total = 0;
            for (const MemoryRange& r : req.ranges()) {
                const auto sum = checked_add(total, r.size());
                if (!sum)
                    return build_error(build_errc::ram_too_large,
                                       "backing " + std::to_string(i) + ": RAM ranges " +
                                           describe(req.ranges()) + " exceed 2^64 bytes");
                total = *sum;
            }
            MEMBACKING_TRY_CONTEXT(
                detail::check_object_covers<Va>(req.existing_mappable(), 0, total),
                "backing " + std::to_string(i) + ": the existing mappable for RAM ranges " +
                    describe(detail::canonical_ram_ranges(req.ranges())) + " (" +
                    MemoryRange::hex(total) + " bytes)");
        }
        // 3. The largest hugetlb page size is the VA alignment every mapper needs.
        std::uint64_t min_alignment = page_size;
        for (const RamBackingRequest& req : backings_)
            if (req.hugepages()) {
                auto hp = detail::validate_hugepage_size(req.hugepages()->value());
                if (!hp)
                    return std::move(hp).error();
                min_alignment = std::max(min_alignment, *hp);
            }
        // 4. The alias map must fit in the address space, above guest memory, on a page
        // boundary, and end below 2^64: otherwise every VTL2 attach would fail later.
        if (vtl0_alias_map_) {
            const std::uint64_t alias = *vtl0_alias_map_;
            if (!is_page_aligned(alias))
                return make_error(errc::invalid_range, "vtl0 alias map offset " +
                                                           MemoryRange::hex(alias) +
                                                           " is not page aligned");
            if (max_addr > alias)
                return build_error(build_errc::alias_map_wont_fit);
            if (max_addr > ~std::uint64_t{0} - alias)
                return build_error(build_errc::alias_map_wont_fit,
                                   "the vtl0 alias map at " + MemoryRange::hex(alias) + " of " +
                                       MemoryRange::hex(max_addr) + " bytes would end beyond 2^64");
        }
        // 5. Allocate the backings.
        std::vector<Mappable> objects;
        for (std::size_t i = 0; i < backings_.size(); ++i) {
            auto object = allocate(backings_[i], i);
            if (!object)
                return std::move(object).error();
            objects.push_back(std::move(*object));
        }
        // 6. The manager, with its primary VA mapper.
        typename Core::Config config;
        config.max_addr = max_addr;
        config.min_va_alignment = min_alignment;
        config.vtl0_alias_map = vtl0_alias_map_;
        config.pin_mappings = pin_mappings_;
        auto core = Core::create(config);
        if (!core)
            return std::move(core).error();
        // 7. The RAM regions, each backing's ranges in canonical (ascending GPA) order.
        for (std::size_t i = 0; i < backings_.size(); ++i) {
            const RamBackingRequest& req = backings_[i];
            std::vector<MemoryRange> ranges = req.ranges();
            std::sort(ranges.begin(), ranges.end());
            (*core)->control([&](auto& c) {
                c.ram.backings.push_back({objects[i], detail::canonical_ram_ranges(ranges)});
            });
            std::uint64_t file_offset = 0;
            for (const MemoryRange& range : ranges) {
                for (const auto& [sub, name] : split(range, ram_name(all, range))) {
                    MEMBACKING_TRY(add_ram(**core, req, objects[i], sub, name, file_offset));
                    file_offset += sub.size();
                }
            }
        }
        return Manager(std::move(*core));
    }

private:
    struct Piece {
        MemoryRange range;
        std::string name;
    };

    /// The region name of one RAM range: "ram" for the lowest of all (`all`, sorted), "ram-<i>"
    /// for the i-th after it.
    [[nodiscard]] static std::string ram_name(const std::vector<MemoryRange>& all,
                                              const MemoryRange& range)
    {
        const auto index =
            static_cast<std::size_t>(std::lower_bound(all.begin(), all.end(), range) - all.begin());
        return index == 0 ? std::string("ram") : "ram-" + std::to_string(index);
    }

    [[nodiscard]] static std::string describe(const std::vector<MemoryRange>& ranges)
    {
        std::string out = "[";
        for (const MemoryRange& r : ranges)
            out += (out.size() > 1 ? ", " : "") + r.to_string();
        return out + "]";
    }

    /// The regions one RAM range becomes: itself, or the x86 legacy split of low RAM.
    [[nodiscard]] std::vector<Piece> split(const MemoryRange& range, const std::string& name) const
    {
        if (!(x86_legacy_ && range.start() == 0 && range.end() >= legacy_low_ram_end))
            return {{range, name}};
        std::vector<Piece> out;
        for (const x86_legacy::Range& legacy : x86_legacy::ranges)
            out.push_back({legacy.range, std::string(legacy.name)});
        if (range.end() > legacy_low_ram_end) // RAM ending exactly at 1 MiB: no empty region
            out.push_back({MemoryRange::valid_or_abort(legacy_low_ram_end, range.end()), name});
        return out;
    }

    /// The object behind one backing (empty for private memory).
    [[nodiscard]] static Result<Mappable> allocate(const RamBackingRequest& req, std::size_t i)
    {
        if (req.private_memory())
            return Mappable();
        if (!req.existing_mappable().empty())
            return req.existing_mappable();
        std::uint64_t size = 0;
        for (const MemoryRange& r : req.ranges()) {
            const auto sum = checked_add(size, r.size());
            if (!sum || *sum > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                return build_error(build_errc::ram_too_large, "ram size " + std::to_string(size) +
                                                                  "+" + std::to_string(r.size()) +
                                                                  " is too large");
            size = *sum;
        }
        const std::string name = i == 0 ? "guest-ram" : "guest-ram-" + std::to_string(i);
        if (req.hugepages()) {
            const std::uint64_t hp = req.hugepages()->value();
            MEMBACKING_TRY(detail::validate_hugepage_size(hp));
            MEMBACKING_TRY(detail::validate_hugepage_ram_alignment(size, req.ranges(), hp));
            auto object = Va::create_hugetlb_memory(size, name.c_str(), hp);
            if (!object)
                return detail::hugepage_allocation_failed(size, hp, object.error().code());
            return object;
        }
        auto object = Va::create_shared_memory(size, name.c_str());
        if (!object)
            return std::move(object).error().context("failed to allocate memory");
        return object;
    }

    Result<void> add_ram(Core& core, const RamBackingRequest& req, const Mappable& object,
                         const MemoryRange& range, const std::string& name,
                         std::uint64_t file_offset) const
    {
        auto id = core.add_region(name, range, 255, MappingType::Ram);
        if (!id)
            return std::move(id).error().context("invalid RAM range " + range.to_string());
        const MemoryPolicy policy{req.host_numa_node(),
                                  req.transparent_hugepages() && !req.hugepages(), req.prefetch()};
        const MappingBacking backing = req.private_memory()
                                           ? MappingBacking::private_memory()
                                           : MappingBacking::file(object, Offset{file_offset});
        if (auto r = core.add_mapping(
                *id, {MemoryRange::valid_or_abort(0, range.size()), backing, true, policy});
            !r)
            return std::move(r).error().context("failed to map RAM range " + range.to_string());
        if (auto r = core.map_region(*id, {true, true, req.prefetch()}); !r)
            return std::move(r).error().context("failed to enable RAM region " + range.to_string());
        core.control([&](auto& c) { c.ram.regions.push_back({range, *id, req.prefetch()}); });
        return {};
    }

    std::optional<std::uint64_t> vtl0_alias_map_;
    bool pin_mappings_ = false;
    bool x86_legacy_ = false;
    std::vector<RamBackingRequest> backings_;
};

} // namespace membacking
