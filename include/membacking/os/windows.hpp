/**
 * @file os/windows.hpp
 * Layer: os (includes base/ only). The whole body is Windows-only.
 *
 * WindowsSyscalls: the seam between the library and the Windows memory manager. Every Windows
 * policy that changes the address space takes a `Sys` template parameter defaulting to this
 * struct and calls `Sys::virtual_alloc2`, `Sys::map_view_of_file3`, ... instead of the Win32
 * function. Tests pass a struct that derives from this one and shadows a few members to fail the
 * n-th call, as tests/support/injecting_syscalls.hpp does for Linux.
 *
 * Conventions: each function behaves like the Win32 call it wraps (return value, and the error
 * in GetLastError()). Names are the Win32 names in snake case, so no member is hidden by a
 * <windows.h> macro (CreateFileMapping is one).
 *
 * Run-time resolution: VirtualAlloc2, MapViewOfFile3 and UnmapViewOfFile2 (Windows 10 1803 and
 * later) are missing from MinGW-w64's import libraries (Debian 12's and 13's alike), so they are
 * looked up once in kernelbase.dll, as OpenVMM does. Where they do not exist the wrappers fail
 * with ERROR_PROC_NOT_FOUND, so the policy reports "placeholders need Windows 10 1803" instead of
 * failing to load. The placeholder flags are defined here too: Debian 12's MinGW headers lack
 * them.
 *
 * <windows.h> is included with WIN32_LEAN_AND_MEAN and NOMINMAX unless the includer chose
 * otherwise (the library uses std::min/std::max, which the min/max macros would break).
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_WINDOWS

#    include <membacking/base/result.hpp>

#    ifndef WIN32_LEAN_AND_MEAN
#        define WIN32_LEAN_AND_MEAN
#        define MEMBACKING_UNDEF_LEAN_AND_MEAN
#    endif
#    ifndef NOMINMAX
#        define NOMINMAX
#        define MEMBACKING_UNDEF_NOMINMAX
#    endif
#    include <windows.h>
#    ifdef MEMBACKING_UNDEF_LEAN_AND_MEAN
#        undef WIN32_LEAN_AND_MEAN
#        undef MEMBACKING_UNDEF_LEAN_AND_MEAN
#    endif
#    ifdef MEMBACKING_UNDEF_NOMINMAX
#        undef NOMINMAX
#        undef MEMBACKING_UNDEF_NOMINMAX
#    endif

#    include <cstddef>
#    include <cstdint>
#    include <string>
#    include <system_error>
#    include <utility>

namespace membacking::os {

/// Placeholder flags (memoryapi.h of Windows SDK 10.0.17134 and later).
namespace windows_abi {
inline constexpr ULONG mem_reserve_placeholder = 0x00040000;   // MEM_RESERVE_PLACEHOLDER
inline constexpr ULONG mem_replace_placeholder = 0x00004000;   // MEM_REPLACE_PLACEHOLDER
inline constexpr ULONG mem_preserve_placeholder = 0x00000002;  // MEM_PRESERVE_PLACEHOLDER
inline constexpr ULONG mem_coalesce_placeholders = 0x00000001; // MEM_COALESCE_PLACEHOLDERS
/// Every reservation and section view starts on this boundary unless it replaces a placeholder.
inline constexpr std::uint64_t allocation_granularity = 0x10000;
} // namespace windows_abi

namespace detail {

/// The kernelbase.dll entry points MinGW cannot link against, looked up once per process.
struct Kernelbase {
    // MEM_EXTENDED_PARAMETER* is passed as void*: the library never passes extended parameters,
    // and older MinGW headers do not declare the type.
    using VirtualAlloc2Fn = PVOID(WINAPI*)(HANDLE, PVOID, SIZE_T, ULONG, ULONG, void*, ULONG);
    using MapViewOfFile3Fn = PVOID(WINAPI*)(HANDLE, HANDLE, PVOID, ULONG64, SIZE_T, ULONG, ULONG,
                                            void*, ULONG);
    using UnmapViewOfFile2Fn = BOOL(WINAPI*)(HANDLE, PVOID, ULONG);

    VirtualAlloc2Fn virtual_alloc2 = nullptr;
    MapViewOfFile3Fn map_view_of_file3 = nullptr;
    UnmapViewOfFile2Fn unmap_view_of_file2 = nullptr;

    static const Kernelbase& get() noexcept
    {
        static const Kernelbase k = [] {
            Kernelbase r;
            // kernelbase.dll is loaded in every Win32 process; GetModuleHandle takes no reference.
            HMODULE m = ::GetModuleHandleW(L"kernelbase.dll");
            if (m == nullptr)
                m = ::LoadLibraryExW(L"kernelbase.dll", nullptr, LOAD_LIBRARY_SEARCH_SYSTEM32);
            if (m != nullptr) {
                r.virtual_alloc2 = resolve<VirtualAlloc2Fn>(m, "VirtualAlloc2");
                r.map_view_of_file3 = resolve<MapViewOfFile3Fn>(m, "MapViewOfFile3");
                r.unmap_view_of_file2 = resolve<UnmapViewOfFile2Fn>(m, "UnmapViewOfFile2");
            }
            return r;
        }();
        return k;
    }

    [[nodiscard]] bool complete() const noexcept
    {
        return virtual_alloc2 != nullptr && map_view_of_file3 != nullptr &&
               unmap_view_of_file2 != nullptr;
    }

    template <class Fn>
    static Fn resolve(HMODULE m, const char* name) noexcept
    {
        // GetProcAddress returns a generic function pointer; the cast through void(*)() is the
        // sanctioned way to convert it to the real type.
        return reinterpret_cast<Fn>(reinterpret_cast<void (*)()>(::GetProcAddress(m, name)));
    }
};

/// The ntdll.dll entry points that tell a section's size (no Win32 function does), looked up
/// once per process.
struct Ntdll {
    /// SECTION_BASIC_INFORMATION (winternl.h of the DDK; MinGW's headers lack it).
    struct SectionBasicInformation {
        PVOID base_address;
        ULONG allocation_attributes;
        LARGE_INTEGER maximum_size;
    };
    static constexpr int section_basic_information = 0; // SectionBasicInformation
    using NtQuerySectionFn = LONG(NTAPI*)(HANDLE, int, PVOID, SIZE_T, SIZE_T*);
    using RtlNtStatusToDosErrorFn = ULONG(NTAPI*)(LONG);

    NtQuerySectionFn nt_query_section = nullptr;
    RtlNtStatusToDosErrorFn rtl_nt_status_to_dos_error = nullptr;

    static const Ntdll& get() noexcept
    {
        static const Ntdll n = [] {
            Ntdll r;
            // ntdll.dll is loaded in every process; GetModuleHandle takes no reference.
            if (HMODULE m = ::GetModuleHandleW(L"ntdll.dll"); m != nullptr) {
                r.nt_query_section = Kernelbase::resolve<NtQuerySectionFn>(m, "NtQuerySection");
                r.rtl_nt_status_to_dos_error =
                    Kernelbase::resolve<RtlNtStatusToDosErrorFn>(m, "RtlNtStatusToDosError");
            }
            return r;
        }();
        return n;
    }
};

} // namespace detail

struct WindowsSyscalls {
    /// True if this Windows has the placeholder API (Windows 10 1803, Wine 9 and later).
    static bool has_placeholders() noexcept { return detail::Kernelbase::get().complete(); }

    static PVOID virtual_alloc2(PVOID address, SIZE_T size, ULONG type, ULONG protect) noexcept
    {
        const auto& k = detail::Kernelbase::get();
        if (k.virtual_alloc2 == nullptr) {
            ::SetLastError(ERROR_PROC_NOT_FOUND);
            return nullptr;
        }
        return k.virtual_alloc2(::GetCurrentProcess(), address, size, type, protect, nullptr, 0);
    }
    static BOOL virtual_free(PVOID address, SIZE_T size, DWORD type) noexcept
    {
        return ::VirtualFree(address, size, type);
    }
    static PVOID map_view_of_file3(HANDLE section, PVOID address, ULONG64 offset, SIZE_T size,
                                   ULONG type, ULONG protect) noexcept
    {
        const auto& k = detail::Kernelbase::get();
        if (k.map_view_of_file3 == nullptr) {
            ::SetLastError(ERROR_PROC_NOT_FOUND);
            return nullptr;
        }
        return k.map_view_of_file3(section, ::GetCurrentProcess(), address, offset, size, type,
                                   protect, nullptr, 0);
    }
    static BOOL unmap_view_of_file2(PVOID address, ULONG flags) noexcept
    {
        const auto& k = detail::Kernelbase::get();
        if (k.unmap_view_of_file2 == nullptr) {
            ::SetLastError(ERROR_PROC_NOT_FOUND);
            return FALSE;
        }
        return k.unmap_view_of_file2(::GetCurrentProcess(), address, flags);
    }
    static BOOL virtual_protect(PVOID address, SIZE_T size, DWORD protect, DWORD* old) noexcept
    {
        return ::VirtualProtect(address, size, protect, old);
    }
    static SIZE_T virtual_query(LPCVOID address, MEMORY_BASIC_INFORMATION* info,
                                SIZE_T size) noexcept
    {
        return ::VirtualQuery(address, info, size);
    }
    /// A pagefile-backed section (CreateFileMappingW with INVALID_HANDLE_VALUE) of `size` bytes.
    static HANDLE create_pagefile_section(std::uint64_t size, DWORD protect) noexcept
    {
        return ::CreateFileMappingW(INVALID_HANDLE_VALUE, nullptr, protect,
                                    static_cast<DWORD>(size >> 32),
                                    static_cast<DWORD>(size & 0xffffffffU), nullptr);
    }
    static BOOL close_handle(HANDLE handle) noexcept { return ::CloseHandle(handle); }
    /// The section's maximum size (NtQuerySection, SectionBasicInformation) in *size. FALSE with
    /// the Win32 error in GetLastError() if the query fails.
    static BOOL query_section_size(HANDLE section, std::uint64_t* size) noexcept
    {
        const auto& n = detail::Ntdll::get();
        if (n.nt_query_section == nullptr || n.rtl_nt_status_to_dos_error == nullptr) {
            ::SetLastError(ERROR_PROC_NOT_FOUND);
            return FALSE;
        }
        detail::Ntdll::SectionBasicInformation info{};
        SIZE_T got = 0;
        const LONG status = n.nt_query_section(section, detail::Ntdll::section_basic_information,
                                               &info, sizeof info, &got);
        if (status < 0) { // NT_SUCCESS is status >= 0
            ::SetLastError(n.rtl_nt_status_to_dos_error(status));
            return FALSE;
        }
        *size = static_cast<std::uint64_t>(info.maximum_size.QuadPart);
        return TRUE;
    }
};

/// The Error for GetLastError() after the call that just failed. The error is read before
/// `message()` runs, because building the message may allocate, and allocation may change it.
template <class F>
[[nodiscard]] Error last_error(F&& message)
{
    const DWORD err = ::GetLastError();
    return os_error(static_cast<int>(err), std::forward<F>(message)());
}

} // namespace membacking::os

#endif // MEMBACKING_OS_WINDOWS
