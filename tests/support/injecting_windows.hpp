/**
 * InjectingWindows: the Windows syscall seam with failure injection. Derives from the real seam
 * and counts every call that changes the address space (VirtualAlloc2, VirtualFree,
 * MapViewOfFile3, UnmapViewOfFile2, VirtualProtect); the n-th one from now fails with a chosen
 * Win32 error and does nothing. It fires once, so the rollback that follows runs for real.
 *
 * State is static (the seam is a type, not an object); tests that use it run on one thread and
 * call reset() first.
 */
#pragma once

#include <membacking/os/windows.hpp>

#include <cstdint>

namespace membacking::test {

struct InjectingWindows : os::WindowsSyscalls {
    static inline std::int64_t countdown = -1; ///< calls to let through; -1 = never fail
    static inline DWORD error = ERROR_NOT_ENOUGH_MEMORY;
    static inline std::uint64_t calls = 0; ///< address-space calls since reset
    static inline bool fired = false;

    static void reset()
    {
        countdown = -1;
        error = ERROR_NOT_ENOUGH_MEMORY;
        calls = 0;
        fired = false;
    }
    /// The n-th address-space call from now (1 = the next) fails with err.
    static void fail_nth(std::int64_t n, DWORD err = ERROR_NOT_ENOUGH_MEMORY)
    {
        countdown = n - 1;
        error = err;
        fired = false;
    }

    static PVOID virtual_alloc2(PVOID address, SIZE_T size, ULONG type, ULONG protect) noexcept
    {
        if (fail_now())
            return nullptr;
        return os::WindowsSyscalls::virtual_alloc2(address, size, type, protect);
    }
    static BOOL virtual_free(PVOID address, SIZE_T size, DWORD type) noexcept
    {
        if (fail_now())
            return FALSE;
        return os::WindowsSyscalls::virtual_free(address, size, type);
    }
    static PVOID map_view_of_file3(HANDLE section, PVOID address, ULONG64 offset, SIZE_T size,
                                   ULONG type, ULONG protect) noexcept
    {
        if (fail_now())
            return nullptr;
        return os::WindowsSyscalls::map_view_of_file3(section, address, offset, size, type,
                                                      protect);
    }
    static BOOL unmap_view_of_file2(PVOID address, ULONG flags) noexcept
    {
        if (fail_now())
            return FALSE;
        return os::WindowsSyscalls::unmap_view_of_file2(address, flags);
    }
    static BOOL virtual_protect(PVOID address, SIZE_T size, DWORD protect, DWORD* old) noexcept
    {
        if (fail_now())
            return FALSE;
        return os::WindowsSyscalls::virtual_protect(address, size, protect, old);
    }

private:
    static bool fail_now() noexcept
    {
        ++calls;
        if (countdown < 0)
            return false;
        if (countdown-- == 0) {
            fired = true;
            ::SetLastError(error);
            return true;
        }
        return false;
    }
};

} // namespace membacking::test
