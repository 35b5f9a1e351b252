// The guarded primitives and the vectored exception handler under Wine: success paths work,
// faults on reserved, no-access and read-only memory are recovered with the exact address, a
// bulk copy reports its progress, and a fault outside the primitives is passed on: the process
// still dies of it with STATUS_ACCESS_VIOLATION (checked in a child process), and a vectored
// handler registered before ours still sees it.
#include <membacking/access/primitives.hpp>

#include "child_process.hpp"
#include "test_support.hpp"

#include <cstring>
#include <numeric>
#include <vector>

using namespace membacking;
using namespace membacking::access;

namespace {

constexpr std::size_t pg = 4096;

/// Three pages: [rw][no access][rw]; the middle one faults.
struct Pages {
    std::byte* base = nullptr;
    Pages()
    {
        install_fault_handler();
        base = static_cast<std::byte*>(
            ::VirtualAlloc(nullptr, 3 * pg, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE));
        REQUIRE(base != nullptr);
        DWORD old = 0;
        REQUIRE(::VirtualProtect(base + pg, pg, PAGE_NOACCESS, &old));
    }
    ~Pages() { ::VirtualFree(base, 0, MEM_RELEASE); }
    Pages(const Pages&) = delete;
    Pages& operator=(const Pages&) = delete;
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
    CHECK(last_fault().exception == EXCEPTION_ACCESS_VIOLATION);
    CHECK(last_fault().access == 0); // a read
    CHECK_FALSE(try_store(p.hole() + 8, value));
    CHECK(last_fault().address == p.hole_addr() + 8);
    CHECK(last_fault().access == 1); // a write
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

TEST_CASE("copy and fill of many lengths are exact")
{
    std::vector<std::uint8_t> src(5000), dst(5000);
    std::iota(src.begin(), src.end(), std::uint8_t{1});
    for (std::size_t n = 0; n <= src.size(); n += (n < 300 ? 1 : 97)) {
        std::fill(dst.begin(), dst.end(), std::uint8_t{0});
        REQUIRE(try_copy(dst.data(), src.data() + (src.size() - n), n));
        CHECK(std::memcmp(dst.data(), src.data() + (src.size() - n), n) == 0);
        if (n < dst.size())
            CHECK(dst[n] == 0);
        REQUIRE(try_fill(dst.data(), 0x5f, n));
        CHECK(std::count(dst.begin(), dst.end(), std::uint8_t{0x5f}) ==
              static_cast<std::ptrdiff_t>(n));
    }
}

TEST_CASE("a copy from mapped into no-access memory stops at the boundary and says how far")
{
    Pages p;
    std::memset(p.base, 0xab, pg);
    std::vector<std::byte> dst(2 * pg, std::byte{0});
    const std::size_t start = 100;
    const std::size_t n = 2 * pg - start;
    REQUIRE_FALSE(try_copy(dst.data(), p.base + start, n));
    CHECK(last_fault().address == p.hole_addr());
    const std::size_t progress = n - last_fault().remaining;
    CHECK(progress <= pg - start);
    for (std::size_t i = 0; i < progress; ++i)
        REQUIRE(dst[i] == std::byte{0xab});
    REQUIRE_FALSE(try_fill(p.hole() - 8, 0x22, 64));
    CHECK(last_fault().address == p.hole_addr());
    CHECK(p.hole()[-1] == std::byte{0x22});
    CHECK(last_fault().remaining >= 64 - 8);
}

TEST_CASE("a write to read-only memory, and a non-canonical address, are recovered")
{
    Pages p;
    DWORD old = 0;
    REQUIRE(::VirtualProtect(p.base, pg, PAGE_READONLY, &old));
    std::uint64_t v = 0;
    CHECK(try_load(p.base, v));
    CHECK_FALSE(try_store(p.base, std::uint64_t{5}));
    CHECK(last_fault().access == 1);
    CHECK(last_fault().address == reinterpret_cast<std::uintptr_t>(p.base));
    // #GP: Windows reports no address; the record says 0.
    // NOLINTNEXTLINE(performance-no-int-to-ptr)
    CHECK_FALSE(try_load(reinterpret_cast<const void*>(0x8000000000000000ULL), v));
    CHECK(last_fault().address == 0);
}

namespace {
/// A plain (unguarded) store to address 0; the volatile keeps the compiler from seeing the null.
[[gnu::noinline]] void touch_null()
{
    volatile std::uintptr_t address = 0;
    // NOLINTNEXTLINE(performance-no-int-to-ptr)
    *reinterpret_cast<volatile int*>(address) = 1;
}

/// No error dialog and no debugger for the crash we are about to cause.
void quiet_crash()
{
    ::SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);
}

long WINAPI user_handler(EXCEPTION_POINTERS* info)
{
    if (info->ExceptionRecord->ExceptionCode == EXCEPTION_ACCESS_VIOLATION)
        ::ExitProcess(42);
    return EXCEPTION_CONTINUE_SEARCH;
}
} // namespace

MEMBACKING_CHILD(crash_without_handler)
{
    quiet_crash();
    touch_null();
    ::ExitProcess(4); // not reached
}

MEMBACKING_CHILD(crash_outside_primitives)
{
    quiet_crash();
    install_fault_handler();
    std::uint8_t v = 0;
    if (try_load(nullptr, v)) // a guarded fault first: the handler is demonstrably live
        ::ExitProcess(3);
    touch_null();
    ::ExitProcess(4); // not reached
}

MEMBACKING_CHILD(user_handler_first)
{
    quiet_crash();
    ::AddVectoredExceptionHandler(1, &user_handler);
    install_fault_handler(); // ours now runs first
    std::uint8_t v = 0;
    if (try_load(nullptr, v)) // ours: recovered, the user's handler is not called
        ::ExitProcess(3);
    touch_null(); // not ours: passed on, the user's handler runs
    ::ExitProcess(4);
}

TEST_CASE("a fault outside the primitives still kills the process with an access violation")
{
    const auto baseline = test::run_in_child("crash_without_handler");
    REQUIRE(baseline.has_value());
    CHECK(*baseline == STATUS_ACCESS_VIOLATION);
    const auto status = test::run_in_child("crash_outside_primitives");
    REQUIRE(status.has_value());
    CHECK(*status == STATUS_ACCESS_VIOLATION);
}

TEST_CASE("a vectored handler registered before ours still gets the faults that are not ours")
{
    const auto status = test::run_in_child("user_handler_first");
    REQUIRE(status.has_value());
    CHECK(*status == 42);
}
