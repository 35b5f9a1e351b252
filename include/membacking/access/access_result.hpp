/**
 * @file access/access_result.hpp
 * Layer: access (includes base/ only).
 *
 * The access path's error model. It must not allocate, so an AccessError is a small plain value:
 * what went wrong (errc::out_of_range, errc::unmapped, errc::read_only, ...), the GPA where it
 * went wrong, whether it was a read or a write, and how many bytes were done before it. A
 * message is only built when asked for. AccessResult<T> carries a T or an AccessError, with
 * std::expected's verbs (value_or, and_then, transform, or_else, transform_error, error_or).
 */
#pragma once

#include <membacking/base/fatal.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/result.hpp>
#include <membacking/base/units.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <new>
#include <string>
#include <system_error>
#include <type_traits>

namespace membacking {

enum class AccessKind : std::uint8_t { read, write };

struct AccessError {
    errc code = errc::unmapped;
    AccessKind kind = AccessKind::read;
    Gpa gpa;          ///< the first GPA that could not be accessed (absolute)
    Length completed; ///< bytes done before it (0 for single-instruction accesses)

    [[nodiscard]] std::error_code error_code() const noexcept { return make_error_code(code); }

    /// "guest memory write at 0x1000 failed: no mapping (0x800 bytes done)". Allocates.
    [[nodiscard]] std::string message() const
    {
        std::string m = std::string("guest memory ") +
                        (kind == AccessKind::write ? "write" : "read") + " at " + to_string(gpa) +
                        " failed: " + error_code().message();
        if (completed != Length{0})
            m += " (" + to_string(completed) + " bytes done)";
        return m;
    }

    /// As a control-path Error (allocates).
    [[nodiscard]] Error to_error() const { return make_error(code, message()); }

    friend bool operator==(const AccessError&, const AccessError&) noexcept = default;
};

template <class T = void>
class [[nodiscard]] AccessResult;

namespace detail {
/// The cold, out-of-line end of AccessResult::value() on an error.
[[noreturn]] MEMBACKING_NOINLINE MEMBACKING_COLD inline void
access_value_of_error(const AccessError& error) noexcept
{
    fatal("AccessResult::value() called on an error: " + error.message());
}
} // namespace detail

namespace detail {
template <class R>
inline constexpr bool is_access_result = false;
template <class T>
inline constexpr bool is_access_result<AccessResult<T>> = true;
} // namespace detail

/// A T or an AccessError. Trivially copyable when T is; never allocates. The two share storage,
/// so a success writes only the value and the flag (this sits on the access path).
///
/// READ THIS before `*mem.read_plain<T>(gpa)`: value() and operator* on an error ABORT THE
/// PROCESS (the library's fatal path). The GPA usually comes from the guest, so a guest that
/// points a device at a hole would take the VMM down. Handle the error instead:
///     const auto v = mem.read_plain<std::uint64_t>(gpa).value_or(~std::uint64_t{0});
///     if (auto v = mem.read_plain<std::uint64_t>(gpa)) use(*v); else log(v.error().message());
/// or the other std::expected verbs: and_then, transform, or_else, transform_error, error_or.
/// Every verb is noexcept when the function it calls is.
template <class T>
class [[nodiscard]] AccessResult {
    static_assert(std::is_trivially_copyable_v<T>, "guest values are trivially copyable");

public:
    using value_type = T;
    using error_type = AccessError;

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

    /// The value. On an error THE PROCESS ABORTS (see the class comment): test first, or use
    /// value_or.
    [[nodiscard]] T value() const noexcept
    {
        if (!ok_) [[unlikely]]
            detail::access_value_of_error(storage_.error);
        return std::bit_cast<T>(storage_.value);
    }
    /// value(): on an error THE PROCESS ABORTS.
    [[nodiscard]] T operator*() const noexcept { return value(); }

    [[nodiscard]] const AccessError& error() const noexcept
    {
        if (ok_) [[unlikely]]
            detail::fatal("AccessResult::error() called on a value");
        return storage_.error;
    }

    /// The value, or `fallback` converted to T if the access failed.
    template <class U>
    [[nodiscard]] T value_or(U&& fallback) const noexcept(std::is_nothrow_constructible_v<T, U>)
    {
        return ok_ ? std::bit_cast<T>(storage_.value) : static_cast<T>(std::forward<U>(fallback));
    }
    /// The error, or `fallback` if the access succeeded.
    [[nodiscard]] AccessError error_or(const AccessError& fallback) const noexcept
    {
        return ok_ ? fallback : storage_.error;
    }

    /// f(value), which returns an AccessResult<U>, or this error as an AccessResult<U>.
    template <class F>
    auto and_then(F&& f) const noexcept(std::is_nothrow_invocable_v<F, T>)
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F, T>>;
        static_assert(detail::is_access_result<R>,
                      "and_then: the function must return an AccessResult");
        if (ok_)
            return std::invoke(std::forward<F>(f), std::bit_cast<T>(storage_.value));
        return R(storage_.error);
    }
    /// AccessResult<U>(f(value)) (AccessResult<> if f returns nothing), or this error. U must be
    /// trivially copyable, as every AccessResult value is.
    template <class F>
    auto transform(F&& f) const noexcept(std::is_nothrow_invocable_v<F, T>)
    {
        using U = std::remove_cv_t<std::invoke_result_t<F, T>>;
        if (!ok_)
            return AccessResult<U>(storage_.error);
        if constexpr (std::is_void_v<U>) {
            std::invoke(std::forward<F>(f), std::bit_cast<T>(storage_.value));
            return AccessResult<U>();
        } else {
            return AccessResult<U>(
                std::invoke(std::forward<F>(f), std::bit_cast<T>(storage_.value)));
        }
    }
    /// This value, or f(error), which returns an AccessResult<T> (e.g. a fallback read).
    template <class F>
    AccessResult or_else(F&& f) const noexcept(std::is_nothrow_invocable_v<F, const AccessError&>)
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F, const AccessError&>>;
        static_assert(std::is_same_v<R, AccessResult>,
                      "or_else: the function must return an AccessResult<T>");
        if (ok_)
            return *this;
        return std::invoke(std::forward<F>(f), storage_.error);
    }
    /// This value, or f(error): an AccessError (AccessResult<T>), or a control-path Error
    /// (Result<T>: `r.transform_error(&AccessError::to_error)` hands an access failure to code
    /// that reports Results).
    template <class F>
    auto transform_error(F&& f) const noexcept(std::is_nothrow_invocable_v<F, const AccessError&>)
    {
        using G = std::remove_cvref_t<std::invoke_result_t<F, const AccessError&>>;
        static_assert(std::is_same_v<G, AccessError> || std::is_same_v<G, Error>,
                      "transform_error: the function must return an AccessError or an Error");
        using R = std::conditional_t<std::is_same_v<G, Error>, Result<T>, AccessResult>;
        if (ok_)
            return R(std::bit_cast<T>(storage_.value));
        return R(std::invoke(std::forward<F>(f), storage_.error));
    }

private:
    union Storage {
        Storage() noexcept {}
        alignas(T) unsigned char value[sizeof(T)];
        AccessError error;
    } storage_;
    bool ok_;
};

/// Success or an AccessError. The verbs are std::expected<void, E>'s.
template <>
class [[nodiscard]] AccessResult<void> {
public:
    using value_type = void;
    using error_type = AccessError;

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
    /// The error, or `fallback` on success.
    [[nodiscard]] AccessError error_or(const AccessError& fallback) const noexcept
    {
        return ok_ ? fallback : error_;
    }

    /// f(), which returns an AccessResult<U>, or this error as an AccessResult<U>.
    template <class F>
    auto and_then(F&& f) const noexcept(std::is_nothrow_invocable_v<F>)
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F>>;
        static_assert(detail::is_access_result<R>,
                      "and_then: the function must return an AccessResult");
        if (ok_)
            return std::invoke(std::forward<F>(f));
        return R(error_);
    }
    /// AccessResult<U>(f()) (AccessResult<> if f returns nothing), or this error.
    template <class F>
    auto transform(F&& f) const noexcept(std::is_nothrow_invocable_v<F>)
    {
        using U = std::remove_cv_t<std::invoke_result_t<F>>;
        if (!ok_)
            return AccessResult<U>(error_);
        if constexpr (std::is_void_v<U>) {
            std::invoke(std::forward<F>(f));
            return AccessResult<U>();
        } else {
            return AccessResult<U>(std::invoke(std::forward<F>(f)));
        }
    }
    /// Success, or f(error), which returns an AccessResult<>.
    template <class F>
    AccessResult or_else(F&& f) const noexcept(std::is_nothrow_invocable_v<F, const AccessError&>)
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F, const AccessError&>>;
        static_assert(std::is_same_v<R, AccessResult>,
                      "or_else: the function must return an AccessResult<>");
        if (ok_)
            return *this;
        return std::invoke(std::forward<F>(f), error_);
    }
    /// Success, or f(error): an AccessError (AccessResult<>) or an Error (Result<void>).
    template <class F>
    auto transform_error(F&& f) const noexcept(std::is_nothrow_invocable_v<F, const AccessError&>)
    {
        using G = std::remove_cvref_t<std::invoke_result_t<F, const AccessError&>>;
        static_assert(std::is_same_v<G, AccessError> || std::is_same_v<G, Error>,
                      "transform_error: the function must return an AccessError or an Error");
        using R = std::conditional_t<std::is_same_v<G, Error>, Result<void>, AccessResult>;
        if (ok_)
            return R();
        return R(std::invoke(std::forward<F>(f), error_));
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
