// The guarded primitives and their fault handler: success paths cost nothing visible, faults on
// unmapped, read-only and truncated-file memory are recovered with the exact address, and faults
// outside guarded code still crash the process exactly as before (checked in child processes).
#include <membacking/access/primitives.hpp>

#include "child_process.hpp"
#include "test_support.hpp"

#include <array>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

using namespace membacking;
using namespace membacking::access;

namespace {

constexpr std::size_t pg = 4096;

/// Three pages: [rw][PROT_NONE][rw]; the middle one faults.
struct Pages {
    std::byte* base = nullptr;
    Pages()
    {
        install_fault_handler();
        void* p =
            ::mmap(nullptr, 3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(p != MAP_FAILED);
        base = static_cast<std::byte*>(p);
        REQUIRE(::mprotect(base + pg, pg, PROT_NONE) == 0);
    }
    ~Pages() { ::munmap(base, 3 * pg); }
    std::byte* hole() const { return base + pg; }
    std::uintptr_t hole_addr() const { return reinterpret_cast<std::uintptr_t>(hole()); }
};

template <class T>
void check_sized_ops()
{
    Pages p;
    access::detail::last_fault = FaultRecord{~std::uintptr_t{0}, 0, 0, 0};
    T value{};
    std::memset(&value, 0x5a, sizeof(T));
    REQUIRE(try_store(p.base, value));
    T loaded{};
    REQUIRE(try_load(p.base, loaded));
    CHECK(std::memcmp(&loaded, &value, sizeof(T)) == 0);
    CHECK(last_fault().address == ~std::uintptr_t{0}); // success leaves the record alone

    CHECK_FALSE(try_load(p.hole(), loaded));
    CHECK(last_fault().address == p.hole_addr());
    CHECK(last_fault().signal == SIGSEGV);
    CHECK_FALSE(try_store(p.hole() + 8, value));
    CHECK(last_fault().address == p.hole_addr() + 8);
    bool swapped = true;
    T expected = value;
    CHECK_FALSE(try_compare_exchange(p.hole(), expected, value, swapped));
}

} // namespace

TEST_CASE_TEMPLATE("sized load, store and compare-exchange recover faults", T, std::uint8_t,
                   std::uint16_t, std::uint32_t, std::uint64_t, float, double)
{
    check_sized_ops<T>();
}

TEST_CASE("compare-exchange: success, mismatch, and the value found")
{
    std::uint64_t slot = 1;
    std::uint64_t expected = 1;
    bool swapped = false;
    REQUIRE(try_compare_exchange(&slot, expected, std::uint64_t{2}, swapped));
    CHECK(swapped);
    CHECK(slot == 2);
    expected = 7;
    REQUIRE(try_compare_exchange(&slot, expected, std::uint64_t{9}, swapped));
    CHECK_FALSE(swapped);
    CHECK(expected == 2);
    CHECK(slot == 2);
    std::uint8_t b = 0;
    std::uint8_t eb = 0;
    REQUIRE(try_compare_exchange(&b, eb, std::uint8_t{1}, swapped));
    CHECK(swapped);
    CHECK(b == 1);
}

TEST_CASE("fetch-add returns the old value and recovers faults")
{
    Pages p;
    std::uint32_t counter = 40;
    std::uint32_t old = 0;
    REQUIRE(try_fetch_add(&counter, std::uint32_t{2}, old));
    CHECK(old == 40);
    CHECK(counter == 42);
    std::uint64_t old64 = 0;
    CHECK_FALSE(try_fetch_add(p.hole(), std::uint64_t{1}, old64));
    CHECK(last_fault().address == p.hole_addr());
}

TEST_CASE("copy of every length up to 8000 bytes is exact")
{
    std::vector<std::uint8_t> src(8000), dst(8000);
    std::iota(src.begin(), src.end(), std::uint8_t{1});
    for (std::size_t n = 0; n <= src.size(); n += (n < 300 ? 1 : 97)) {
        std::fill(dst.begin(), dst.end(), std::uint8_t{0});
        REQUIRE(try_copy(dst.data(), src.data() + (src.size() - n), n));
        CHECK(std::memcmp(dst.data(), src.data() + (src.size() - n), n) == 0);
        if (n < dst.size())
            CHECK(dst[n] == 0);
    }
}

TEST_CASE("fill writes exactly n bytes")
{
    for (std::size_t n : {0UL, 1UL, 15UL, 16UL, 31UL, 255UL, 1942UL, 4097UL}) {
        std::vector<std::uint8_t> buf(n + 8, 0xee);
        REQUIRE(try_fill(buf.data(), 0x5f, n));
        for (std::size_t i = 0; i < n; ++i)
            REQUIRE(buf[i] == 0x5f);
        CHECK(buf[n] == 0xee);
    }
}

TEST_CASE("a copy from mapped into unmapped memory stops exactly at the boundary")
{
    Pages p;
    std::memset(p.base, 0xab, pg);
    std::vector<std::byte> dst(2 * pg, std::byte{0});
    const std::size_t start = 100;
    REQUIRE_FALSE(try_copy(dst.data(), p.base + start, 2 * pg - start));
    CHECK(last_fault().address == p.hole_addr());
    const std::size_t done =
        last_fault().address - reinterpret_cast<std::uintptr_t>(p.base + start);
    CHECK(done == pg - start);
    // RCX is the architectural progress: never past the fault, and everything before it copied.
    const std::size_t n = 2 * pg - start;
    const std::size_t progress = n - last_fault().remaining;
    CHECK(last_fault().remaining <= n);
    CHECK(progress <= done);
    for (std::size_t i = 0; i < progress; ++i)
        REQUIRE(dst[i] == std::byte{0xab});
    for (std::size_t i = 0; i < done; ++i)
        REQUIRE(dst[i] == std::byte{0xab});

    // And the other direction: writing into the hole.
    std::vector<std::byte> src(pg, std::byte{0x11});
    REQUIRE_FALSE(try_copy(p.hole() - 16, src.data(), 64));
    CHECK(last_fault().address == p.hole_addr());
    CHECK(p.hole()[-1] == std::byte{0x11});
    REQUIRE_FALSE(try_fill(p.hole() - 8, 0x22, 64));
    CHECK(last_fault().address == p.hole_addr());
    CHECK(p.hole()[-1] == std::byte{0x22});
    CHECK(last_fault().remaining >= 64 - 8);
    CHECK(last_fault().remaining <= 64);
}

TEST_CASE("a write to read-only memory is recovered as an access fault")
{
    Pages p;
    REQUIRE(::mprotect(p.base, pg, PROT_READ) == 0);
    std::uint64_t v = 0;
    CHECK(try_load(p.base, v));
    CHECK_FALSE(try_store(p.base, std::uint64_t{5}));
    CHECK(last_fault().code == SEGV_ACCERR);
    CHECK(last_fault().address == reinterpret_cast<std::uintptr_t>(p.base));
}

TEST_CASE("SIGBUS past the end of a file mapping is recovered")
{
    install_fault_handler();
    Mappable fd = test::make_memfd(pg); // one page of file behind two pages of mapping
    void* m = ::mmap(nullptr, 2 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd.native_handle(), 0);
    REQUIRE(m != MAP_FAILED);
    auto* b = static_cast<std::byte*>(m);
    std::uint32_t v = 0;
    CHECK(try_load(b, v));
    CHECK_FALSE(try_load(b + pg, v));
    CHECK(last_fault().signal == SIGBUS);
    CHECK(last_fault().address == reinterpret_cast<std::uintptr_t>(b + pg));
    ::munmap(m, 2 * pg);
}

// GCC names AddressSanitizer with a macro; clang 14 only through __has_feature.
#if defined(__SANITIZE_ADDRESS__)
#    define TEST_ASAN 1
#elif defined(__has_feature)
#    if __has_feature(address_sanitizer)
#        define TEST_ASAN 1
#    endif
#endif
#ifndef TEST_ASAN
#    define TEST_ASAN 0
#endif

namespace {
/// Runs f in a child process and returns its wait status.
template <class F>
int in_child(F&& f)
{
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        f();
        ::_exit(0);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    return status;
}

/// A plain (unguarded) store to address 0. The address goes through a volatile so the compiler
/// cannot see the null and turn the store into a trap instruction (SIGILL).
[[gnu::noinline]] void touch_null()
{
    volatile std::uintptr_t address = 0;
    *reinterpret_cast<volatile int*>(address) = 1;
}
} // namespace

TEST_CASE("a fault outside guarded code ends the process exactly as it would without us")
{
    // Baseline: the same stray store in a process that never installed the handler. Plainly it
    // dies of SIGSEGV; under a sanitizer, the sanitizer's own report ends it. Either way, the
    // process with our handler installed must end the same way.
    const int baseline = in_child([] {
        touch_null();
        ::_exit(4); // not reached
    });
    const int status = in_child([] {
        install_fault_handler();
        // A guarded fault first, so the handler is demonstrably live.
        std::uint8_t v = 0;
        if (try_load(nullptr, v))
            ::_exit(3);
        touch_null();
        ::_exit(4); // not reached
    });
    CHECK(status == baseline);
    CHECK_FALSE((WIFEXITED(status) && (WEXITSTATUS(status) == 3 || WEXITSTATUS(status) == 4)));
#if !MEMBACKING_TSAN && !TEST_ASAN
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGSEGV);
#endif
}

namespace {
/// The user's handler: exits 42 for the stray store to address 0, 41 for anything else (which
/// would mean it was handed the guarded fault, which is ours).
extern "C" void user_segv_handler(int, siginfo_t* info, void*)
{
    ::_exit(info->si_addr == nullptr ? 42 : 41);
}

/// Runs the child function `name` (MEMBACKING_CHILD) in a fresh process: this program exec'd
/// again, so none of the handlers this process installed is there. Returns its wait status.
int in_fresh_process(const char* name)
{
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        const char* args[] = {"/proc/self/exe", "--membacking-child", name, nullptr};
        ::execv(args[0], const_cast<char* const*>(args));
        ::_exit(127);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    return status;
}
} // namespace

// No handler of ours in this process yet: the user's goes first, then ours over it.
MEMBACKING_CHILD(user_handler_before_ours)
{
    struct sigaction sa {};
    sa.sa_sigaction = &user_segv_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGSEGV, &sa, nullptr);
    install_fault_handler();
    void* hole = ::mmap(nullptr, pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (hole == MAP_FAILED)
        ::_exit(6);
    std::uint8_t v = 0;
    if (try_load(hole, v)) // ours: recovered, the user's handler is not called
        ::_exit(3);
    if (last_fault().address != reinterpret_cast<std::uintptr_t>(hole))
        ::_exit(5);
    touch_null(); // not ours: the user's handler runs
    ::_exit(4);
}

TEST_CASE("a handler installed before ours still gets the faults that are not ours")
{
    const int status = in_fresh_process("user_handler_before_ours");
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 42);
}
