/**
 * @file base/result.hpp
 * Layer: base.
 *
 * The control path's error model. GCC 12 has no std::expected in C++20, so this is a small
 * Result<T> over a value or an Error. An Error is a std::error_code (library codes in the
 * "membacking" category, OS codes in std::system_category()) plus a message that names the region
 * or range involved, plus an optional source: the lower-level error it wraps.
 *
 * Rules the library follows:
 * - Bad input returns an Error and leaves state unchanged.
 * - Wrapping an error with context keeps the root's code, so callers can test code() == errc::x
 *   however deep the failure was.
 * - value() on an error, or error() on a value, is a caller bug and goes to detail::fatal.
 * - Nothing here throws.
 *
 * Result has std::expected's verbs, with its names and semantics: value_or, and_then, transform,
 * or_else, transform_error and error_or (the error type is always Error, so transform_error
 * maps an Error to an Error, typically adding context).
 */
#pragma once

#include <membacking/base/fatal.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace membacking {

/// Library error codes. OS failures keep their errno in std::system_category() instead.
enum class errc : int {
    invalid_range = 1,  ///< unaligned, reversed or overflowing range
    invalid_argument,   ///< a parameter out of its domain
    overlap,            ///< a region or mapping overlap rule was violated
    not_found,          ///< no such region, partition or controllable range
    out_of_range,       ///< a GPA or offset outside the space it must lie in
    unmapped,           ///< an access hit a GPA with no mapping behind it
    read_only,          ///< a write hit read-only memory
    unsupported,        ///< a policy or platform lacks the capability
    resource_exhausted, ///< memslots, address space or similar ran out
    conflict,           ///< the request contradicts current state (e.g. the private-memory rules)
    quarantined,        ///< a VA mapper or partition the host could not restore after a failure
};

namespace detail {
class ErrcCategory final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "membacking"; }
    [[nodiscard]] std::string message(int value) const override
    {
        switch (static_cast<errc>(value)) {
        case errc::invalid_range: return "invalid memory range";
        case errc::invalid_argument: return "invalid argument";
        case errc::overlap: return "overlapping ranges";
        case errc::not_found: return "not found";
        case errc::out_of_range: return "out of range";
        case errc::unmapped: return "no mapping";
        case errc::read_only: return "read-only memory";
        case errc::unsupported: return "unsupported";
        case errc::resource_exhausted: return "resource exhausted";
        case errc::conflict: return "conflicts with current state";
        case errc::quarantined: return "quarantined after a host failure";
        }
        return "unknown membacking error";
    }
};
} // namespace detail

/// The category of errc values. One instance per program (an inline function's static).
inline const std::error_category& error_category() noexcept
{
    static const detail::ErrcCategory category;
    return category;
}

inline std::error_code make_error_code(errc e) noexcept
{
    return {static_cast<int>(e), error_category()};
}

} // namespace membacking

template <>
struct std::is_error_code_enum<membacking::errc> : std::true_type {};

namespace membacking {

/// An error: a code, a message naming what failed, and optionally the error it wraps.
class Error {
public:
    Error(std::error_code code, std::string message) : code_(code), message_(std::move(message)) {}
    Error(std::error_code code, std::string message, Error source)
        : code_(code), message_(std::move(message)),
          source_(std::make_shared<const Error>(std::move(source)))
    {}

    /// The root cause's code (context wrapping keeps it).
    [[nodiscard]] const std::error_code& code() const noexcept { return code_; }
    /// This level's message only, e.g. "failed to enable RAM region 0x0-0xa0000".
    [[nodiscard]] const std::string& message() const noexcept { return message_; }
    /// The wrapped lower-level error, or nullptr.
    [[nodiscard]] const Error* source() const noexcept { return source_.get(); }

    /// Every level joined with ": ", outermost first.
    [[nodiscard]] std::string full_message() const
    {
        std::string out = message_;
        for (const Error* e = source(); e != nullptr; e = e->source())
            out.append(": ").append(e->message());
        return out;
    }

    /// Wraps this error under an outer message; the code stays the root's.
    [[nodiscard]] Error context(std::string outer) const&
    {
        return Error(code_, std::move(outer), *this);
    }
    [[nodiscard]] Error context(std::string outer) &&
    {
        const std::error_code code = code_;
        return Error(code, std::move(outer), std::move(*this));
    }

    friend std::ostream& operator<<(std::ostream& os, const Error& e)
    {
        return os << e.full_message();
    }

private:
    std::error_code code_;
    std::string message_;
    std::shared_ptr<const Error> source_; // shared so that Error copies stay cheap
};

/// A library error with a message.
[[nodiscard]] inline Error make_error(errc code, std::string message)
{
    return {make_error_code(code), std::move(message)};
}

/// An OS error (errno value) with a message; the OS's own text becomes the source.
[[nodiscard]] inline Error os_error(int errno_value, std::string message)
{
    const std::error_code code(errno_value, std::system_category());
    return {code, std::move(message), Error(code, code.message())};
}

template <class T>
class [[nodiscard]] Result;

namespace detail {
template <class R>
inline constexpr bool is_result = false;
template <class T>
inline constexpr bool is_result<Result<T>> = true;

/// *p as an lvalue or an xvalue, following Self (std::forward_like, which C++20 lacks).
template <class Self, class V>
constexpr decltype(auto) forward_stored(V* p) noexcept
{
    if constexpr (std::is_lvalue_reference_v<Self>)
        return *p;
    else
        return std::move(*p);
}
} // namespace detail

/// A value that hands out non-owning views into memory it keeps alive (GuestMemory::view()). On
/// a temporary Result of such a value, `->` is deleted: `make()->view()` would return a view that
/// dangles at the end of the statement. (Take the value out first: `auto m = make();`.)
template <class T>
concept OwnerOfViews = requires
{
    typename T::owner_of_views;
};

/// A value of T or an Error. Implicitly constructible from either.
///
/// value() and operator* on an error are a caller bug: the process aborts with the error's
/// message (the library's fatal path). Test first (`if (r)`, `if (!r) return ...`), or use
/// value_or or the other verbs.
template <class T>
class [[nodiscard]] Result {
    static_assert(!std::is_same_v<std::remove_cv_t<T>, Error>, "Result<Error> is meaningless");

public:
    using value_type = T;
    using error_type = Error;

    Result(T value) : state_(std::in_place_index<0>, std::move(value)) {}     // NOLINT: implicit
    Result(Error error) : state_(std::in_place_index<1>, std::move(error)) {} // NOLINT: implicit
    /// A value built in place from `args` (no move of a T that is costly to move).
    template <class... Args>
    explicit Result(std::in_place_t /*tag*/, Args&&... args)
        : state_(std::in_place_index<0>, std::forward<Args>(args)...)
    {}

    [[nodiscard]] bool has_value() const noexcept { return state_.index() == 0; }
    explicit operator bool() const noexcept { return has_value(); }

    /// The value; on an error the process aborts (see the class comment).
    [[nodiscard]] T& value() &
    {
        check_value();
        return *std::get_if<0>(&state_);
    }
    [[nodiscard]] const T& value() const&
    {
        check_value();
        return *std::get_if<0>(&state_);
    }
    [[nodiscard]] T&& value() &&
    {
        check_value();
        return std::move(*std::get_if<0>(&state_));
    }
    T& operator*() & { return value(); }
    const T& operator*() const& { return value(); }
    T&& operator*() && { return std::move(*this).value(); }
    T* operator->() & { return &value(); }
    const T* operator->() const& { return &value(); }
    T* operator->() && requires(!OwnerOfViews<T>) { return &value(); }
    const T* operator->() const&& requires(!OwnerOfViews<T>) { return &value(); }
    T* operator->() && requires OwnerOfViews<T>
    = delete;
    const T* operator->() const&& requires OwnerOfViews<T>
    = delete;

    [[nodiscard]] const Error& error() const&
    {
        MEMBACKING_CHECK(!has_value(), "Result::error() called on a value");
        return *std::get_if<1>(&state_);
    }
    [[nodiscard]] Error&& error() &&
    {
        MEMBACKING_CHECK(!has_value(), "Result::error() called on a value");
        return std::move(*std::get_if<1>(&state_));
    }

    /// The value, or `fallback` converted to T if this is an error.
    template <class U>
    [[nodiscard]] T value_or(U&& fallback) const&
    {
        return has_value() ? *std::get_if<0>(&state_) : static_cast<T>(std::forward<U>(fallback));
    }
    template <class U>
    [[nodiscard]] T value_or(U&& fallback) &&
    {
        return has_value() ? std::move(*std::get_if<0>(&state_))
                           : static_cast<T>(std::forward<U>(fallback));
    }
    /// The error, or `fallback` if this holds a value.
    template <class G>
    [[nodiscard]] Error error_or(G&& fallback) const&
    {
        return has_value() ? static_cast<Error>(std::forward<G>(fallback)) : error();
    }

    /// f(value), which returns a Result<U>, or this error as a Result<U>.
    template <class F>
    auto and_then(F&& f) &
    {
        return and_then_impl(*this, std::forward<F>(f));
    }
    template <class F>
    auto and_then(F&& f) const&
    {
        return and_then_impl(*this, std::forward<F>(f));
    }
    template <class F>
    auto and_then(F&& f) &&
    {
        return and_then_impl(std::move(*this), std::forward<F>(f));
    }
    /// Result<U>(f(value)) (Result<void> if f returns nothing), or this error.
    template <class F>
    auto transform(F&& f) &
    {
        return transform_impl(*this, std::forward<F>(f));
    }
    template <class F>
    auto transform(F&& f) const&
    {
        return transform_impl(*this, std::forward<F>(f));
    }
    template <class F>
    auto transform(F&& f) &&
    {
        return transform_impl(std::move(*this), std::forward<F>(f));
    }
    /// This value, or f(error), which returns a Result<T>.
    template <class F>
    Result or_else(F&& f) const&
    {
        return or_else_impl(*this, std::forward<F>(f));
    }
    template <class F>
    Result or_else(F&& f) &&
    {
        return or_else_impl(std::move(*this), std::forward<F>(f));
    }
    /// This value, or the Error f(error) returns (e.g. the error with context).
    template <class F>
    Result transform_error(F&& f) const&
    {
        return transform_error_impl(*this, std::forward<F>(f));
    }
    template <class F>
    Result transform_error(F&& f) &&
    {
        return transform_error_impl(std::move(*this), std::forward<F>(f));
    }

private:
    template <class Self, class F>
    static auto and_then_impl(Self&& self, F&& f)
    {
        using R = std::remove_cvref_t<decltype(std::invoke(
            std::forward<F>(f), detail::forward_stored<Self>(std::get_if<0>(&self.state_))))>;
        static_assert(detail::is_result<R>, "and_then: the function must return a Result");
        if (self.has_value())
            return std::invoke(std::forward<F>(f),
                               detail::forward_stored<Self>(std::get_if<0>(&self.state_)));
        return R(detail::forward_stored<Self>(std::get_if<1>(&self.state_)));
    }
    template <class Self, class F>
    static auto transform_impl(Self&& self, F&& f)
    {
        using U = std::remove_cv_t<decltype(std::invoke(
            std::forward<F>(f), detail::forward_stored<Self>(std::get_if<0>(&self.state_))))>;
        if (!self.has_value())
            return Result<U>(detail::forward_stored<Self>(std::get_if<1>(&self.state_)));
        if constexpr (std::is_void_v<U>) {
            std::invoke(std::forward<F>(f),
                        detail::forward_stored<Self>(std::get_if<0>(&self.state_)));
            return Result<U>();
        } else {
            return Result<U>(std::invoke(
                std::forward<F>(f), detail::forward_stored<Self>(std::get_if<0>(&self.state_))));
        }
    }
    template <class Self, class F>
    static Result or_else_impl(Self&& self, F&& f)
    {
        using R = std::remove_cvref_t<decltype(std::invoke(
            std::forward<F>(f), detail::forward_stored<Self>(std::get_if<1>(&self.state_))))>;
        static_assert(std::is_same_v<R, Result>, "or_else: the function must return a Result<T>");
        if (self.has_value())
            return Result(detail::forward_stored<Self>(std::get_if<0>(&self.state_)));
        return std::invoke(std::forward<F>(f),
                           detail::forward_stored<Self>(std::get_if<1>(&self.state_)));
    }
    template <class Self, class F>
    static Result transform_error_impl(Self&& self, F&& f)
    {
        using G = std::remove_cvref_t<decltype(std::invoke(
            std::forward<F>(f), detail::forward_stored<Self>(std::get_if<1>(&self.state_))))>;
        static_assert(std::is_same_v<G, Error>,
                      "transform_error: the function must return an Error");
        if (self.has_value())
            return Result(detail::forward_stored<Self>(std::get_if<0>(&self.state_)));
        return Result(std::invoke(std::forward<F>(f),
                                  detail::forward_stored<Self>(std::get_if<1>(&self.state_))));
    }

    void check_value() const
    {
        if (!has_value()) [[unlikely]]
            detail::fatal("Result::value() called on an error: " +
                          std::get_if<1>(&state_)->full_message());
    }

    std::variant<T, Error> state_;
};

/// Success or an Error. value() on an error aborts (see Result<T>).
template <>
class [[nodiscard]] Result<void> {
public:
    using value_type = void;
    using error_type = Error;

    Result() = default;
    Result(Error error) : error_(std::move(error)) {} // NOLINT: implicit by design

    [[nodiscard]] bool has_value() const noexcept { return !error_.has_value(); }
    explicit operator bool() const noexcept { return has_value(); }

    /// Checks success; calling it on an error is a caller bug (the process aborts).
    void value() const
    {
        if (error_) [[unlikely]]
            detail::fatal("Result::value() called on an error: " + error_->full_message());
    }

    [[nodiscard]] const Error& error() const&
    {
        MEMBACKING_CHECK(error_.has_value(), "Result::error() called on success");
        return *error_;
    }
    [[nodiscard]] Error&& error() &&
    {
        MEMBACKING_CHECK(error_.has_value(), "Result::error() called on success");
        return std::move(*error_);
    }

    /// The error, or `fallback` on success.
    template <class G>
    [[nodiscard]] Error error_or(G&& fallback) const&
    {
        return has_value() ? static_cast<Error>(std::forward<G>(fallback)) : *error_;
    }

    /// f(), which returns a Result<U>, or this error as a Result<U>.
    template <class F>
    auto and_then(F&& f) const&
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F>>;
        static_assert(detail::is_result<R>, "and_then: the function must return a Result");
        if (has_value())
            return std::invoke(std::forward<F>(f));
        return R(*error_);
    }
    template <class F>
    auto and_then(F&& f) &&
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F>>;
        static_assert(detail::is_result<R>, "and_then: the function must return a Result");
        if (has_value())
            return std::invoke(std::forward<F>(f));
        return R(std::move(*error_));
    }
    /// Result<U>(f()) (Result<void> if f returns nothing), or this error.
    template <class F>
    auto transform(F&& f) const&
    {
        return Result(*this).transform_owned(std::forward<F>(f));
    }
    template <class F>
    auto transform(F&& f) &&
    {
        return std::move(*this).transform_owned(std::forward<F>(f));
    }
    /// Success, or f(error), which returns a Result<void>.
    template <class F>
    Result or_else(F&& f) const&
    {
        return Result(*this).or_else(std::forward<F>(f));
    }
    template <class F>
    Result or_else(F&& f) &&
    {
        using R = std::remove_cvref_t<std::invoke_result_t<F, Error&&>>;
        static_assert(std::is_same_v<R, Result>,
                      "or_else: the function must return a Result<void>");
        if (has_value())
            return {};
        return std::invoke(std::forward<F>(f), std::move(*error_));
    }
    /// Success, or the Error f(error) returns (e.g. the error with context).
    template <class F>
    Result transform_error(F&& f) const&
    {
        return Result(*this).transform_error(std::forward<F>(f));
    }
    template <class F>
    Result transform_error(F&& f) &&
    {
        using G = std::remove_cvref_t<std::invoke_result_t<F, Error&&>>;
        static_assert(std::is_same_v<G, Error>,
                      "transform_error: the function must return an Error");
        if (has_value())
            return {};
        return Result(std::invoke(std::forward<F>(f), std::move(*error_)));
    }

private:
    template <class F>
    auto transform_owned(F&& f) &&
    {
        using U = std::remove_cv_t<std::invoke_result_t<F>>;
        if (!has_value())
            return Result<U>(std::move(*error_));
        if constexpr (std::is_void_v<U>) {
            std::invoke(std::forward<F>(f));
            return Result<U>();
        } else {
            return Result<U>(std::invoke(std::forward<F>(f)));
        }
    }

    std::optional<Error> error_;
};

} // namespace membacking

/// Evaluates a Result-returning expression and returns its Error from the enclosing function.
#define MEMBACKING_TRY(...)                                                                        \
    do {                                                                                           \
        if (auto membacking_try_result_ = (__VA_ARGS__); !membacking_try_result_)                  \
            return std::move(membacking_try_result_).error();                                      \
    } while (false)

/// As MEMBACKING_TRY, wrapping the error in context; the message is built only on failure.
#define MEMBACKING_TRY_CONTEXT(expr, ...)                                                          \
    do {                                                                                           \
        if (auto membacking_try_result_ = (expr); !membacking_try_result_)                         \
            return std::move(membacking_try_result_).error().context(__VA_ARGS__);                 \
    } while (false)
