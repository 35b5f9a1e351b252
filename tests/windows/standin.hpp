// The test side of the stand-in WinHvPlatform.dll (whp_standin.cpp): its controls, reached
// through the very module the WHP policy loaded, and the fake partition handle it records.
#pragma once

#include <membacking/os/windows.hpp>

#include "whp_standin.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace membacking::test {

/// The stand-in's controls, from the very DLL the policy loaded (the same module).
struct Standin {
    Standin()
    {
        module =
            ::LoadLibraryExW(L"WinHvPlatform.dll", nullptr, LOAD_LIBRARY_SEARCH_APPLICATION_DIR);
        REQUIRE(module != nullptr);
        reset = get<void (*)()>("standin_reset");
        fail_nth_call = get<void (*)(std::uint64_t, HRESULT)>("standin_fail_nth_call");
        fail_from_nth_call = get<void (*)(std::uint64_t, HRESULT)>("standin_fail_from_nth_call");
        calls_fn = get<std::uint32_t (*)(StandinCall*, std::uint32_t)>("standin_calls");
        mapped_fn = get<std::uint32_t (*)(StandinCall*, std::uint32_t)>("standin_mapped");
        reset();
    }
    Standin(const Standin&) = delete;
    Standin& operator=(const Standin&) = delete;
    ~Standin() { ::FreeLibrary(module); }

    template <class Fn>
    Fn get(const char* name)
    {
        auto f = reinterpret_cast<Fn>(reinterpret_cast<void (*)()>(::GetProcAddress(module, name)));
        REQUIRE(f != nullptr);
        return f;
    }

    /// Calls recorded since the reset, failed ones included.
    std::uint32_t count() const { return calls_fn(nullptr, 0); }
    std::vector<StandinCall> calls() const
    {
        std::vector<StandinCall> out(256);
        out.resize(std::min<std::uint32_t>(calls_fn(out.data(), 256), 256));
        return out;
    }
    /// The GPA ranges the stand-in holds mapped: gpa, size, flags, pinned (in `advice`).
    std::vector<StandinCall> mapped() const
    {
        std::vector<StandinCall> out(256);
        out.resize(std::min<std::uint32_t>(mapped_fn(out.data(), 256), 256));
        return out;
    }

    HMODULE module = nullptr;
    void (*reset)() = nullptr;
    void (*fail_nth_call)(std::uint64_t, HRESULT) = nullptr;
    /// The n-th call from now and every later one fail (n = 0: stop).
    void (*fail_from_nth_call)(std::uint64_t, HRESULT) = nullptr;
    std::uint32_t (*calls_fn)(StandinCall*, std::uint32_t) = nullptr;
    std::uint32_t (*mapped_fn)(StandinCall*, std::uint32_t) = nullptr;
};

/// A fake partition handle: the stand-in only records it.
void* const handle = reinterpret_cast<void*>(std::uintptr_t{0x1234000}); // NOLINT

} // namespace membacking::test
