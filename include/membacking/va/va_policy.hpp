/**
 * @file va/va_policy.hpp
 * Layer: va (includes base/ and va/mappable.hpp).
 *
 * The VaPolicy concept: one linear virtual address reservation in which GPA g lives at base + g.
 * An object of a VaPolicy type *is* a reservation (moved, never copied; its destructor releases
 * the VA). Everything in it is at page-aligned offsets from base().
 *
 * Sub-concepts (a failed check names the missing piece):
 * - VaPolicy_reserve:  static Result<V> reserve(uint64_t size, uint64_t min_alignment);
 *                      size() is the usable size (the requested one, page-rounded), base() the
 * start.
 * - VaPolicy_map:      map_file(off, len, object, file_offset, writable) and commit_private(off,
 * len) *replace* whatever is at [off, off+len); unmap(off, len) returns the range to
 *                      reserved-and-inaccessible, keeping the reservation (never a hole another
 *                      allocation could take).
 * - VaPolicy_protect:  protect(off, len, writable).
 * - VaPolicy_hints:    advise_hugepages, bind_numa, set_name: placement hints.
 * - VaPolicy_objects:  static create_shared_memory(size, name) and
 *                      create_hugetlb_memory(size, name, page_size) make Mappable objects.
 * - VaPolicy_object_size: static object_size(object), the object's size in bytes as the OS
 *                      knows it now (Linux: fstat; Windows: the section's maximum size). The
 *                      manager checks with it that a mapping's file range lies inside its
 *                      object when the mapping is added (detail::check_object_covers).
 * Every member returns Result and leaves the range as it was when it fails.
 *
 * Capabilities (VaFeatures): `atomic_replace` means map over an existing mapping has no window in
 * which the range is unmapped (Linux MAP_FIXED); without it a concurrent access may fault
 * transiently during a replacement and must retry (Windows placeholders).
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/va/mappable.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace membacking {

enum class VaFeatures : std::uint32_t {
    none = 0,
    atomic_replace = 1U << 0, ///< replacing a mapping leaves no unmapped window
    hugepages = 1U << 1,      ///< transparent huge pages and hugetlb objects
    numa = 1U << 2,           ///< bind_numa does something
    names = 1U << 3,          ///< set_name is visible to tools (/proc/self/maps)
};

[[nodiscard]] constexpr VaFeatures operator|(VaFeatures a, VaFeatures b) noexcept
{
    return static_cast<VaFeatures>(static_cast<std::uint32_t>(a) | static_cast<std::uint32_t>(b));
}

template <VaFeatures F, class V>
inline constexpr bool va_supports = (static_cast<std::uint32_t>(V::features) &
                                     static_cast<std::uint32_t>(F)) != 0;

// clang-format off
template <class V>
concept VaPolicy_reserve = std::movable<V> && requires(const V& cv, std::uint64_t n) {
    { V::reserve(n, n) } -> std::same_as<Result<V>>;
    { cv.base() } -> std::same_as<std::byte*>;
    { cv.size() } -> std::same_as<std::uint64_t>;
    { V::features } -> std::convertible_to<VaFeatures>;
};

template <class V>
concept VaPolicy_map = requires(V& v, std::uint64_t off, std::uint64_t len, const Mappable& object,
                                bool writable) {
    { v.map_file(off, len, object, off, writable) } -> std::same_as<Result<void>>;
    { v.commit_private(off, len) } -> std::same_as<Result<void>>;
    { v.unmap(off, len) } -> std::same_as<Result<void>>;
};

template <class V>
concept VaPolicy_protect = requires(V& v, std::uint64_t off, std::uint64_t len, bool writable) {
    { v.protect(off, len, writable) } -> std::same_as<Result<void>>;
};

template <class V>
concept VaPolicy_hints = requires(V& v, std::uint64_t off, std::uint64_t len, std::uint32_t node,
                                  const char* name) {
    { v.advise_hugepages(off, len) } -> std::same_as<Result<void>>;
    { v.bind_numa(off, len, node) } -> std::same_as<Result<void>>;
    { v.set_name(off, len, name) } -> std::same_as<Result<void>>;
};

template <class V>
concept VaPolicy_objects = requires(std::uint64_t size, const char* name) {
    { V::create_shared_memory(size, name) } -> std::same_as<Result<Mappable>>;
    { V::create_hugetlb_memory(size, name, size) } -> std::same_as<Result<Mappable>>;
};

template <class V>
concept VaPolicy_object_size = requires(const Mappable& object) {
    { V::object_size(object) } -> std::same_as<Result<std::uint64_t>>;
};

template <class V>
concept VaPolicy = VaPolicy_reserve<V> && VaPolicy_map<V> && VaPolicy_protect<V> &&
    VaPolicy_hints<V> && VaPolicy_objects<V> && VaPolicy_object_size<V>;
// clang-format on

namespace detail {
/// VaPolicy<V>, checked one sub-concept at a time with messages that give the members' exact
/// declarations (GCC 12 reports only that the whole concept "evaluated to false"). The manager
/// static_asserts this for its VA policy.
template <class V>
consteval bool check_va_policy()
{
    static_assert(VaPolicy_reserve<V>,
                  "VA policy: needs to be movable, with `static Result<V> reserve(std::uint64_t "
                  "size, std::uint64_t min_alignment)`, `std::byte* base() const`, "
                  "`std::uint64_t size() const` and `static constexpr VaFeatures features`");
    static_assert(VaPolicy_map<V>,
                  "VA policy: needs `Result<void> map_file(std::uint64_t off, std::uint64_t len, "
                  "const Mappable& object, std::uint64_t file_offset, bool writable)`, "
                  "`Result<void> commit_private(std::uint64_t off, std::uint64_t len)` and "
                  "`Result<void> unmap(std::uint64_t off, std::uint64_t len)`");
    static_assert(VaPolicy_protect<V>,
                  "VA policy: needs `Result<void> protect(std::uint64_t off, std::uint64_t len, "
                  "bool writable)`");
    static_assert(VaPolicy_hints<V>,
                  "VA policy: needs `Result<void> advise_hugepages(std::uint64_t off, "
                  "std::uint64_t len)`, `Result<void> bind_numa(std::uint64_t off, std::uint64_t "
                  "len, std::uint32_t node)` and `Result<void> set_name(std::uint64_t off, "
                  "std::uint64_t len, const char* name)`");
    static_assert(VaPolicy_objects<V>,
                  "VA policy: needs `static Result<Mappable> create_shared_memory(std::uint64_t "
                  "size, const char* name)` and `static Result<Mappable> "
                  "create_hugetlb_memory(std::uint64_t size, const char* name, std::uint64_t "
                  "page_size)`");
    static_assert(VaPolicy_object_size<V>,
                  "VA policy: needs `static Result<std::uint64_t> object_size(const Mappable& "
                  "object)`");
    return VaPolicy<V>;
}

/// errc::invalid_range unless `object` (V::object_size) covers [file_offset, file_offset + len):
/// "object range 0x...-0x... lies beyond the end of the object (0x... bytes)". A failure to learn
/// the size is returned as it is. The caller adds which mapping it was as context.
template <class V>
[[nodiscard]] Result<void> check_object_covers(const Mappable& object, std::uint64_t file_offset,
                                               std::uint64_t len)
{
    auto size = V::object_size(object);
    if (!size)
        return std::move(size).error();
    const bool overflows = len > ~std::uint64_t{0} - file_offset;
    if (!overflows && file_offset + len <= *size)
        return {};
    const std::string range =
        overflows ? MemoryRange::hex(file_offset) + "+" + MemoryRange::hex(len) + " (beyond 2^64)"
                  : MemoryRange::hex(file_offset) + "-" + MemoryRange::hex(file_offset + len);
    return make_error(errc::invalid_range, "object range " + range +
                                               " lies beyond the end of the object (" +
                                               MemoryRange::hex(*size) + " bytes)");
}
} // namespace detail

} // namespace membacking
