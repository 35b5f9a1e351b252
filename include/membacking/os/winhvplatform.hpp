/**
 * @file os/winhvplatform.hpp
 * Layer: os (includes base/ and os/windows.hpp). The whole body is Windows-only.
 *
 * WinHvPlatform: the seam between the WHP partition policy and the Windows Hypervisor Platform.
 * It is a table of the WinHvPlatform.dll entry points the policy calls, resolved at run time
 * (LoadLibraryExW + GetProcAddress), never linked: a VMM built with WHP support still starts on a
 * Windows without the feature, and gets a clear error when it asks for a WHP partition.
 *
 * - system(): the process-wide table for "WinHvPlatform.dll", loaded once. The DLL is searched in
 *   the application's directory, then System32 (LOAD_LIBRARY_SEARCH_APPLICATION_DIR |
 *   LOAD_LIBRARY_SEARCH_SYSTEM32): never the current directory or PATH. The application
 *   directory comes first so that a test can place a stand-in beside its program, as the
 *   project's tests do (tests/windows/whp_standin.cpp); a real deployment has none there.
 * - load(name): a table from another DLL (tests: a missing one).
 * WHvMapGpaRange and WHvUnmapGpaRange are required; WHvAdviseGpaRange (Windows 10 2004 and later)
 * is optional: without it, prefetch and pin report errc::unsupported.
 *
 * The types are the documented WHP ABI (WinHvPlatformDefs.h), declared here because MinGW's
 * copy of the header varies between versions and the library never links against it.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_WINDOWS

#    include <membacking/base/result.hpp>
#    include <membacking/os/windows.hpp>

#    include <cstdint>
#    include <cstdio>
#    include <memory>
#    include <string>

namespace membacking::os {

namespace whp_abi {
using PartitionHandle = void*; // WHV_PARTITION_HANDLE

// WHV_MAP_GPA_RANGE_FLAGS
inline constexpr std::uint32_t map_read = 0x1;
inline constexpr std::uint32_t map_write = 0x2;
inline constexpr std::uint32_t map_execute = 0x4;

// WHV_ADVISE_GPA_RANGE_CODE
inline constexpr std::uint32_t advise_populate = 0x0;
inline constexpr std::uint32_t advise_pin = 0x1;
inline constexpr std::uint32_t advise_unpin = 0x2;

// WHV_MEMORY_ACCESS_TYPE
inline constexpr std::uint32_t access_read = 0;
inline constexpr std::uint32_t access_write = 1;

struct MemoryRangeEntry { // WHV_MEMORY_RANGE_ENTRY
    std::uint64_t guest_address;
    std::uint64_t size_in_bytes;
};
static_assert(sizeof(MemoryRangeEntry) == 16);

struct AdvisePopulate {   // WHV_ADVISE_GPA_RANGE_POPULATE
    std::uint32_t flags;  // bit 0 Prefetch, bit 1 AvoidHardFaults
    std::uint32_t access; // WHV_MEMORY_ACCESS_TYPE
};
static_assert(sizeof(AdvisePopulate) == 8);
inline constexpr std::uint32_t populate_prefetch = 0x1;

using MapGpaRangeFn = HRESULT(WINAPI*)(PartitionHandle, void*, std::uint64_t, std::uint64_t,
                                       std::uint32_t);
using UnmapGpaRangeFn = HRESULT(WINAPI*)(PartitionHandle, std::uint64_t, std::uint64_t);
using AdviseGpaRangeFn = HRESULT(WINAPI*)(PartitionHandle, const MemoryRangeEntry*, std::uint32_t,
                                          std::uint32_t, const void*, std::uint32_t);
} // namespace whp_abi

/// "HRESULT 0x80070057": HRESULTs are not Win32 error codes, and most WHP ones have no text.
[[nodiscard]] inline std::string hresult_text(HRESULT hr)
{
    char buf[32];
    (void)std::snprintf(buf, sizeof(buf), "HRESULT 0x%08lx",
                        static_cast<unsigned long>(static_cast<std::uint32_t>(hr)));
    return buf;
}

/// An Error for a failed WHP call; the code keeps the HRESULT in system_category.
[[nodiscard]] inline Error hresult_error(HRESULT hr, std::string message)
{
    const std::error_code code(static_cast<int>(hr), std::system_category());
    return {code, std::move(message), Error(code, hresult_text(hr))};
}

class WinHvPlatform {
public:
    /// The process-wide table for WinHvPlatform.dll, loaded on first use (thread-safe).
    [[nodiscard]] static const Result<std::shared_ptr<const WinHvPlatform>>& system()
    {
        static const Result<std::shared_ptr<const WinHvPlatform>> table =
            load(L"WinHvPlatform.dll");
        return table;
    }

    /// A table from the named DLL; an error names the DLL and the missing entry point.
    [[nodiscard]] static Result<std::shared_ptr<const WinHvPlatform>> load(const wchar_t* dll)
    {
        HMODULE m = ::LoadLibraryExW(
            dll, nullptr, LOAD_LIBRARY_SEARCH_APPLICATION_DIR | LOAD_LIBRARY_SEARCH_SYSTEM32);
        if (m == nullptr)
            return last_error([&] {
                return "cannot load " + narrow(dll) +
                       ": the Windows Hypervisor Platform is not installed (enable the "
                       "'Windows Hypervisor Platform' optional feature)";
            });
        auto t = std::shared_ptr<WinHvPlatform>(new WinHvPlatform(m));
        t->map_gpa_range = resolve<whp_abi::MapGpaRangeFn>(m, "WHvMapGpaRange");
        t->unmap_gpa_range = resolve<whp_abi::UnmapGpaRangeFn>(m, "WHvUnmapGpaRange");
        t->advise_gpa_range = resolve<whp_abi::AdviseGpaRangeFn>(m, "WHvAdviseGpaRange");
        if (t->map_gpa_range == nullptr || t->unmap_gpa_range == nullptr)
            return make_error(errc::unsupported,
                              narrow(dll) + " lacks WHvMapGpaRange or WHvUnmapGpaRange");
        return std::shared_ptr<const WinHvPlatform>(std::move(t));
    }

    WinHvPlatform(const WinHvPlatform&) = delete;
    WinHvPlatform& operator=(const WinHvPlatform&) = delete;
    ~WinHvPlatform()
    {
        if (module_ != nullptr)
            ::FreeLibrary(module_);
    }

    whp_abi::MapGpaRangeFn map_gpa_range = nullptr;
    whp_abi::UnmapGpaRangeFn unmap_gpa_range = nullptr;
    whp_abi::AdviseGpaRangeFn advise_gpa_range = nullptr; ///< null before Windows 10 2004

private:
    explicit WinHvPlatform(HMODULE m) noexcept : module_(m) {}

    template <class Fn>
    static Fn resolve(HMODULE m, const char* name) noexcept
    {
        return reinterpret_cast<Fn>(reinterpret_cast<void (*)()>(::GetProcAddress(m, name)));
    }

    static std::string narrow(const wchar_t* s)
    {
        std::string out;
        for (; *s != L'\0'; ++s)
            out.push_back(*s < 0x80 ? static_cast<char>(*s) : '?');
        return out;
    }

    HMODULE module_;
};

} // namespace membacking::os

#endif // MEMBACKING_OS_WINDOWS
