// Test threads end without destroying their thread_local objects in freed memory. With MinGW's
// emulated TLS, a thread's thread_local block used to be freed before libstdc++ ran the
// destructors of the objects in it, so every test thread that touched doctest's thread_local
// streams (any assertion with a message, e.g. test::must) wrote into freed heap blocks as it ended,
// and the heap crashed later, at random: win_manager's intermittent access violation.
// doctest_main.cpp orders the two (see there); this checks it.
//
// The check runs in a child process with Wine's heap checking on (WINEDEBUG=warn+heap), which
// fills freed blocks with 0xfeeefeee: a destructor that runs in freed storage then sees the fill
// instead of its canary, deterministically, and doctest's string stream destructor crashes on it.
// Without heap checking the freed block usually still holds the old bytes, so nothing shows.
#include <doctest/doctest.h>

#include "child_process.hpp"
#include "platform.hpp"

#include <atomic>
#include <cstdint>
#include <thread>

using namespace membacking;

namespace {

constexpr std::uint64_t alive = 0x5ca1ab1e0ddba11;

std::atomic<int> destroyed_intact{0};
std::atomic<int> destroyed_freed{0};

/// A thread_local whose destructor reports whether its storage still holds what it wrote.
struct Canary {
    std::uint64_t words[4] = {alive, alive, alive, alive};
    Canary() = default;
    Canary(const Canary&) = delete;
    Canary& operator=(const Canary&) = delete;
    ~Canary()
    {
        bool intact = true;
        for (const std::uint64_t w : words)
            intact = intact && w == alive;
        (intact ? destroyed_intact : destroyed_freed).fetch_add(1);
    }
};
thread_local Canary canary;

} // namespace

MEMBACKING_CHILD(thread_locals_destroyed_before_freed)
{
    for (int i = 0; i < 4; ++i)
        std::thread([] {
            canary.words[0] = alive; // constructs this thread's Canary
            // doctest's own thread_locals (its string streams), as an assertion's message builds
            doctest::detail::tlssPush();
            (void)doctest::detail::tlssPop();
        }).join();
    if (destroyed_freed.load() != 0)
        ::ExitProcess(3);
    if (destroyed_intact.load() != 4)
        ::ExitProcess(4);
}

TEST_CASE("a test thread's thread_locals are destroyed before their storage is freed")
{
    // On Windows itself the child runs without heap checking, and the check is weaker.
    const auto status =
        test::run_in_child("thread_locals_destroyed_before_freed",
                           test::under_wine() ? L"WINEDEBUG=-all,warn+heap" : nullptr);
    REQUIRE(status.has_value());
    CHECK(*status == 0); // 3: a destructor saw freed storage; an NTSTATUS: the heap crashed
}
