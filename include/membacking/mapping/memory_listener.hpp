/**
 * @file mapping/memory_listener.hpp
 * Layer: mapping (includes base/ and mapping/memory_piece.hpp).
 *
 * The MemoryListener concept: a consumer of the memory table that comes and goes at run time (a
 * vhost-user backend, a VFIO container, a client process), registered on the manager with
 * GuestMemoryManager::add_memory_listener and removed with remove_memory_listener.
 *
 * What a listener implements:
 *   std::string name() const;                               // names it in error messages
 *   Result<void> apply(const MemoryTableChange& change);    // all or nothing
 *
 * When apply is called:
 * - once at registration with Kind::initial and the whole table, atomically with respect to
 *   control calls (none runs between the snapshot and the listener's registration);
 * - then inside every control operation that changes the table, once per step of it (an
 *   operation may take several steps), with Kind::update, before the operation returns;
 * - with Kind::rollback when a later step of the same operation fails (another listener's refusal,
 *   a VA mapper, a partition): the inverse of a change it accepted, newest first.
 * After every control call, the listener's view (what it accepted) is exactly memory_table().
 *
 * The all-or-nothing contract: apply either applies the whole change and returns success, or
 * applies none of it and returns an error. A refusal (any error but listener_errc::cut_off) of an
 * update rolls the whole control operation back: VA mappers, partitions and the listeners that
 * accepted the step are restored, and the caller gets the listener's error wrapped in a message
 * naming the listener and the GPA range (the root error code is the listener's). Registering fails
 * the same way if the initial change is refused.
 *
 * A listener whose consumer is gone or does not answer in time (a dead or stuck client process)
 * decides what that means: refuse (the operation fails), or cut itself off by returning an error
 * with listener_errc::cut_off: the manager then drops it (no more calls) and the operation goes on
 * as if it had accepted. A listener that fails a rollback is dropped the same way (a rollback
 * cannot be refused). A listener must bound its own time: the control call waits for it.
 *
 * Two-phase listeners (optional, the AwaitsTableChanges sub-concept): a listener whose consumer
 * acknowledges asynchronously (a client process) may also implement
 *   Result<void> await_applied();   // waits for the consumer of the last apply()
 * Then apply() only decides (it may refuse, as above) and sends, and the manager gives each step
 * to every listener first and then awaits them all, so that N client processes cost one
 * round trip and at most one deadline per step, not N in a row. await_applied() cannot refuse:
 * any error drops the listener, as a cut-off does. It is called exactly once after every apply()
 * that succeeded, before the next apply().
 *
 * Threads and locks: apply runs on the thread of the control call, under the manager's control
 * lock; calls to one manager's listeners never overlap. It must not call back into that manager
 * (every control call, memory_table() and memory_map() take the same lock: a deadlock), nor
 * access guest memory through it. remove_memory_listener may be called from any other thread at
 * any time: it waits for a running control call, and once it returns the listener is never
 * called again and the manager holds no reference to it.
 */
#pragma once

#include <membacking/base/result.hpp>
#include <membacking/mapping/memory_piece.hpp>

#include <compare>
#include <concepts>
#include <cstdint>
#include <ostream>
#include <string>
#include <system_error>
#include <type_traits>

namespace membacking {

/// Identifies one registered listener.
struct ListenerId {
    std::uint64_t value = 0;
    friend constexpr auto operator<=>(const ListenerId&, const ListenerId&) noexcept = default;
    friend std::ostream& operator<<(std::ostream& os, ListenerId id) { return os << id.value; }
};

enum class listener_errc : int {
    /// Returned by a listener: "my consumer is gone, drop me" (not a refusal).
    cut_off = 1,
};

namespace detail {
class ListenerCategory final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "membacking.listener"; }
    [[nodiscard]] std::string message(int v) const override
    {
        switch (static_cast<listener_errc>(v)) {
        case listener_errc::cut_off: return "the memory listener has cut itself off";
        }
        return "unknown memory listener error";
    }
};
} // namespace detail

inline const std::error_category& listener_category() noexcept
{
    static const detail::ListenerCategory category;
    return category;
}

inline std::error_code make_error_code(listener_errc e) noexcept
{
    return {static_cast<int>(e), listener_category()};
}

} // namespace membacking

template <>
struct std::is_error_code_enum<membacking::listener_errc> : std::true_type {};

namespace membacking {

// clang-format off
/// Has a name for messages.
template <class L>
concept NamedListener = requires(const L& listener) {
    { listener.name() } -> std::convertible_to<std::string>;
};

/// Takes one change of the memory table, all or nothing.
template <class L>
concept AppliesTableChanges = requires(L& listener, const MemoryTableChange& change) {
    { listener.apply(change) } -> std::same_as<Result<void>>;
};

template <class L>
concept MemoryListener = NamedListener<L> && AppliesTableChanges<L>;

/// Optional: apply() sends, await_applied() waits for the consumer (see the file comment).
template <class L>
concept AwaitsTableChanges = MemoryListener<L> && requires(L& listener) {
    { listener.await_applied() } -> std::same_as<Result<void>>;
};
// clang-format on

} // namespace membacking
