/**
 * What the portable tests need from the platform they run on: the platform's VA policy, objects
 * to map (a memfd on Linux, a pagefile-backed section on Windows), a way to write into one
 * without mapping it into a guest, and a page of the process's own that faults on any access.
 */
#pragma once

#include <membacking/fwd.hpp>
#include <membacking/va/mappable.hpp>

#include "test_support.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>

#if MEMBACKING_OS_LINUX
#    include <sys/mman.h>
#    include <unistd.h>
#endif

namespace membacking::test {

/// The platform's VA policy (LinuxMmap or WindowsPlaceholder).
using PlatformVa = DefaultVaPolicy;

/// A mappable object of `size` bytes, zero-filled.
inline Mappable make_object(std::uint64_t size = 0x10000)
{
#if MEMBACKING_OS_LINUX
    return make_memfd(size);
#else
    return must(PlatformVa::create_shared_memory(size, "membacking-test"));
#endif
}

/// Writes `len` bytes at `offset` of the object, as a file write would (not through a guest).
inline void write_object(const Mappable& object, std::uint64_t offset, const void* data,
                         std::size_t len)
{
#if MEMBACKING_OS_LINUX
    REQUIRE(::pwrite(object.native_handle(), data, len, static_cast<off_t>(offset)) ==
            static_cast<ssize_t>(len));
#else
    void* view = ::MapViewOfFile(object.native_handle(), FILE_MAP_WRITE, 0, 0,
                                 static_cast<SIZE_T>(offset + len));
    REQUIRE(view != nullptr);
    std::memcpy(static_cast<std::byte*>(view) + offset, data, len);
    REQUIRE(::UnmapViewOfFile(view));
#endif
}

/// One page of this process's address space that faults on any access, released on destruction.
class NoAccessPage {
public:
    NoAccessPage()
    {
#if MEMBACKING_OS_LINUX
        void* p = ::mmap(nullptr, page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(p != MAP_FAILED);
#else
        void* p = ::VirtualAlloc(nullptr, page_size, MEM_RESERVE, PAGE_NOACCESS);
        REQUIRE(p != nullptr);
#endif
        page_ = static_cast<std::byte*>(p);
    }
    NoAccessPage(const NoAccessPage&) = delete;
    NoAccessPage& operator=(const NoAccessPage&) = delete;
    ~NoAccessPage()
    {
#if MEMBACKING_OS_LINUX
        ::munmap(page_, page_size);
#else
        ::VirtualFree(page_, 0, MEM_RELEASE);
#endif
    }
    [[nodiscard]] std::byte* get() const noexcept
    {
        return page_;
    }

private:
    std::byte* page_ = nullptr;
};

} // namespace membacking::test

namespace membacking::test {

/// True when a Windows test program runs under Wine (ntdll exports wine_get_version there).
inline bool under_wine()
{
#if MEMBACKING_OS_WINDOWS
    HMODULE ntdll = ::GetModuleHandleW(L"ntdll.dll");
    return ntdll != nullptr && ::GetProcAddress(ntdll, "wine_get_version") != nullptr;
#else
    return false;
#endif
}

} // namespace membacking::test
