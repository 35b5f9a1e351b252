/**
 * @file va/detail/va_arguments.hpp
 * Internal (namespace membacking::detail); layer: va (includes base/ and va/mappable.hpp).
 *
 * The argument checks every VA policy makes before it touches its address space (LinuxMmap,
 * WindowsPlaceholder): a range page aligned, non-empty and inside the reservation, and map_file's
 * object present and file offset page aligned. One home, so both platforms refuse the same
 * inputs with the same codes and messages; what only one platform needs (Linux's largest file
 * offset) stays in its policy.
 */
#pragma once

#include <membacking/base/align.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/va/mappable.hpp>

#include <cstdint>
#include <string>

namespace membacking::detail {

/// "guest range START-END", the name every VA policy's messages give a range.
inline std::string describe_va_range(std::uint64_t off, std::uint64_t len)
{
    // Piece by piece: GCC 12's -O3 -Wrestrict misfires on "literal" + std::string.
    std::string range = "guest range ";
    range += MemoryRange::hex(off);
    range += '-';
    range += MemoryRange::hex(off + len);
    return range;
}

/// Page aligned, non-empty, and inside a reservation of `reserved` bytes.
inline Result<void> check_va_range(std::uint64_t off, std::uint64_t len, std::uint64_t reserved)
{
    if (!is_page_aligned(off) || !is_page_aligned(len) || len == 0) {
        std::string message = "guest range at ";
        message += MemoryRange::hex(off);
        message += " of ";
        message += MemoryRange::hex(len);
        message += " bytes is empty or not page aligned";
        return make_error(errc::invalid_range, message);
    }
    if (off > reserved || len > reserved - off) {
        std::string message = describe_va_range(off, len);
        message += " lies outside the reservation of ";
        message += MemoryRange::hex(reserved);
        message += " bytes";
        return make_error(errc::out_of_range, message);
    }
    return {};
}

/// map_file's arguments: the range (check_va_range), an object, a page-aligned file offset.
inline Result<void> check_map_file(std::uint64_t off, std::uint64_t len, const Mappable& object,
                                   std::uint64_t file_offset, std::uint64_t reserved)
{
    MEMBACKING_TRY(check_va_range(off, len, reserved));
    if (object.empty()) {
        std::string message = "map_file of ";
        message += describe_va_range(off, len);
        message += " given no object";
        return make_error(errc::invalid_argument, message);
    }
    if (!is_page_aligned(file_offset)) {
        std::string message = "file offset ";
        message += MemoryRange::hex(file_offset);
        message += " for ";
        message += describe_va_range(off, len);
        message += " is not a page-aligned file offset";
        return make_error(errc::invalid_argument, message);
    }
    return {};
}

} // namespace membacking::detail
