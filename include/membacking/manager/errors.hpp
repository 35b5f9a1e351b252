/**
 * @file manager/errors.hpp
 * Layer: manager (includes base/ only).
 *
 * The builder's validation errors, as an error category so that callers can test
 * `code() == kind` while the message keeps the reference's exact wording (inventory §2.4):
 * build_errc ("membacking.build"), why GuestMemoryBuilder::build refused its input
 * (MemoryBuildError in the reference).
 *
 * Failures that wrap a cause (an allocation, the VA mapper, a RAM region, a partition attach) keep
 * the cause's code, as base/result.hpp's rule says: the reference's wording ("failed to allocate
 * memory", "failed to attach partition to memory manager", ...) is the Error's message() and the
 * cause is its source(). So callers test the root code (errc::x, or an errno in
 * std::system_category()) and read message() for which step failed. The build_errc values marked
 * "not returned" below are kept so that code naming them still compiles; nothing returns them.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>

#include <string>
#include <system_error>
#include <type_traits>
#include <utility>

namespace membacking {

enum class build_errc : int {
    ram_too_large = 1,
    allocation_failed,          ///< not returned: the cause's code, with this text as message()
    hugepage_allocation_failed, ///< not returned: the cause's code, with this text as message()
    va_mapper,                  ///< not returned: the cause's code, with this text as message()
    ram_mapping,                ///< not returned: the cause's code, with this text as message()
    ram_region_enable,          ///< not returned: the cause's code, with this text as message()
    alias_map_wont_fit,
    invalid_ram_for_x86,
    private_memory_with_legacy,
    private_memory_with_existing_backing,
    hugepage_size_too_large,
    hugepages_unsupported_platform,
    host_numa_node_unsupported_platform,
    hugepages_with_private_memory,
    hugepages_with_existing_backing,
    hugepages_with_legacy,
    invalid_hugepage_size,
    hugepage_ram_size_unaligned,
    hugepage_ram_range_unaligned,
    /// Not in the reference (it panics): RAM ranges that overlap or leave the address space.
    invalid_ram_layout,
    /// Not in the reference: a restored backing (RamBackingRequest::existing_mappable with a
    /// SharedMemoryBacking) asked to back other GPA ranges than the ones it holds.
    restore_layout_mismatch,
};

namespace detail {
class BuildCategory final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "membacking.build"; }
    [[nodiscard]] std::string message(int v) const override
    {
        switch (static_cast<build_errc>(v)) {
        case build_errc::ram_too_large: return "ram size is too large";
        case build_errc::allocation_failed: return "failed to allocate memory";
        case build_errc::hugepage_allocation_failed: return "failed to reserve hugetlb pages";
        case build_errc::va_mapper: return "failed to create VA mapper";
        case build_errc::ram_mapping: return "failed to map RAM range";
        case build_errc::ram_region_enable: return "failed to enable RAM region";
        case build_errc::alias_map_wont_fit:
            return "not enough guest address space available for the vtl0 alias map";
        case build_errc::invalid_ram_for_x86:
            return "x86 support requires RAM to start at 0 and contain at least 1MB";
        case build_errc::private_memory_with_legacy:
            return "private memory is incompatible with x86 legacy support";
        case build_errc::private_memory_with_existing_backing:
            return "private memory is incompatible with an existing memory backing";
        case build_errc::hugepage_size_too_large: return "hugepage size is too large";
        case build_errc::hugepages_unsupported_platform:
            return "hugepages are only supported on Linux and Windows";
        case build_errc::host_numa_node_unsupported_platform:
            return "host NUMA node binding is only supported on Linux and Windows";
        case build_errc::hugepages_with_private_memory:
            return "hugepages require shared memory mode";
        case build_errc::hugepages_with_existing_backing:
            return "hugepages are incompatible with existing memory backing";
        case build_errc::hugepages_with_legacy:
            return "hugepages are incompatible with x86 legacy RAM splitting";
        case build_errc::invalid_hugepage_size: return "invalid hugepage size";
        case build_errc::hugepage_ram_size_unaligned:
            return "RAM size is not aligned to the hugepage size";
        case build_errc::hugepage_ram_range_unaligned:
            return "RAM range is not aligned to the hugepage size";
        case build_errc::invalid_ram_layout: return "invalid RAM layout";
        case build_errc::restore_layout_mismatch:
            return "the RAM ranges do not match the restored backing's";
        }
        return "unknown build error";
    }
};

} // namespace detail

inline const std::error_category& build_category() noexcept
{
    static const detail::BuildCategory category;
    return category;
}
inline std::error_code make_error_code(build_errc e) noexcept
{
    return {static_cast<int>(e), build_category()};
}

/// A build error with the category's own text as its message.
[[nodiscard]] inline Error build_error(build_errc kind)
{
    const std::error_code code = make_error_code(kind);
    return {code, code.message()};
}
/// A build error with a specific message (and optionally the error it wraps).
[[nodiscard]] inline Error build_error(build_errc kind, std::string message)
{
    return {make_error_code(kind), std::move(message)};
}
[[nodiscard]] inline Error build_error(build_errc kind, std::string message, Error source)
{
    return {make_error_code(kind), std::move(message), std::move(source)};
}

namespace detail {
/// errc::out_of_range: "range 0x...-0x... lies outside the guest address space of 0x... bytes".
[[nodiscard]] inline Error outside_address_space(const MemoryRange& range, std::uint64_t max_addr)
{
    return make_error(errc::out_of_range, "range " + range.to_string() +
                                              " lies outside the guest address space of " +
                                              MemoryRange::hex(max_addr) + " bytes");
}
} // namespace detail

} // namespace membacking

template <>
struct std::is_error_code_enum<membacking::build_errc> : std::true_type {};
