/**
 * @file access/access_result.hpp
 * Layer: access (includes base/ only).
 *
 * The access path's error model. It must not allocate, so an AccessError is a small plain value:
 * what went wrong (errc::out_of_range, errc::unmapped, errc::read_only, ...), the GPA where it
 * went wrong, whether it was a read or a write, and how many bytes were done before it. A
 * message is only built when asked for. AccessResult<T> carries a T or an AccessError.
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <system_error>
#include <type_traits>

namespace membacking {

enum class AccessKind : std::uint8_t { read, write };

struct AccessError {
    errc code = errc::unmapped;
    AccessKind kind = AccessKind::read;
    std::uint64_t gpa = 0;       ///< the first GPA that could not be accessed
    std::uint64_t completed = 0; ///< bytes done before it (0 for single-instruction accesses)

    [[nodiscard]] std::error_code error_code() const noexcept { return make_error_code(code); }

    /// "guest memory write at 0x1000 failed: no mapping (0x800 bytes done)". Allocates.
    [[nodiscard]] std::string message() const
    {
        std::string m = std::string("guest memory ") +
                        (kind == AccessKind::write ? "write" : "read") + " at " +
                        MemoryRange::hex(gpa) + " failed: " + error_code().message();
        if (completed != 0)
            m += " (" + MemoryRange::hex(completed) + " bytes done)";
        return m;
    }

    /// As a control-path Error (allocates).
    [[nodiscard]] Error to_error() const { return make_error(code, message()); }

    friend bool operator==(const AccessError&, const AccessError&) noexcept = default;
};

/// A T or an AccessError. Trivially copyable when T is; never allocates. The two share storage,
/// so a success writes only the value and the flag (this sits on the access path).
template <class T = void>
class [[nodiscard]] AccessResult {
    static_assert(std::is_trivially_copyable_v<T>, "guest values are trivially copyable");

public:
    AccessResult(const T& value) noexcept : ok_(true) // NOLINT: implicit by design
    {
        std::memcpy(&storage_.value, &value, sizeof(T));
    }
    AccessResult(const AccessError& error) noexcept : ok_(false) // NOLINT: implicit by design
    {
        storage_.error = error;
    }

    [[nodiscard]] bool has_value() const noexcept { return ok_; }
    explicit operator bool() const noexcept { return ok_; }

    /// The value; calling it on an error is a caller bug (fatal).
    [[nodiscard]] T value() const noexcept
    {
        if (!ok_) [[unlikely]]
            detail::fatal("AccessResult::value() called on an error");
        return std::bit_cast<T>(storage_.value);
    }
    [[nodiscard]] T operator*() const noexcept { return value(); }

    [[nodiscard]] const AccessError& error() const noexcept
    {
        if (ok_) [[unlikely]]
            detail::fatal("AccessResult::error() called on a value");
        return storage_.error;
    }

private:
    union Storage {
        Storage() noexcept {}
        alignas(T) unsigned char value[sizeof(T)];
        AccessError error;
    } storage_;
    bool ok_;
};

template <>
class [[nodiscard]] AccessResult<void> {
public:
    AccessResult() noexcept = default;
    AccessResult(const AccessError& error) noexcept : error_(error), ok_(false) {} // NOLINT

    [[nodiscard]] bool has_value() const noexcept { return ok_; }
    explicit operator bool() const noexcept { return ok_; }

    [[nodiscard]] const AccessError& error() const noexcept
    {
        if (ok_) [[unlikely]]
            detail::fatal("AccessResult::error() called on success");
        return error_;
    }

private:
    AccessError error_{};
    bool ok_ = true;
};

/// What compare_exchange found.
template <class T>
struct CompareExchangeOutcome {
    bool exchanged = false; ///< true if the value matched and was replaced
    T observed{};           ///< the value found (equals `expected` when exchanged)
};

} // namespace membacking
