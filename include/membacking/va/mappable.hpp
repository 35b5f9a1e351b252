/**
 * @file va/mappable.hpp
 * Layer: va (includes base/ only).
 *
 * Mappable: a shared, owning handle to an OS object that can be mapped into a VA space — a file
 * descriptor on Linux (memfd, hugetlb memfd, file), a section handle on Windows. Copies share the
 * one handle (like the reference's Arc<OwnedFd>); the handle is closed when the last copy goes.
 * An empty Mappable stands for "no object" (private anonymous memory).
 *
 * On Linux the handle is a file descriptor, closed with close(). On Windows it is a section
 * handle (a HANDLE from CreateFileMapping), mapped with MapViewOfFile3 and closed with
 * CloseHandle; a section stays alive while a view of it is mapped, but the placeholder policy
 * keeps a copy of the Mappable for every view anyway, because re-mapping the head and tail of a
 * partially unmapped view needs it.
 *
 * Creating objects: create_memfd(name, size) (va/linux_mmap.hpp) or create_section(name, size)
 * (va/windows_placeholder.hpp) makes the shared memory a device maps; the VA policies make the RAM
 * objects. This header only owns.
 */
#pragma once

#include <membacking/base/config.hpp>

#include <cstdint>
#include <memory>

#if MEMBACKING_OS_LINUX
#    include <unistd.h>
#elif MEMBACKING_OS_WINDOWS
// The one Win32 call this header needs; the declaration matches <windows.h>'s exactly.
extern "C" __declspec(dllimport) int __stdcall CloseHandle(void* handle);
#endif

namespace membacking {

class Mappable {
public:
#if MEMBACKING_OS_WINDOWS
    using native_handle_type = void*; // HANDLE
#else
    using native_handle_type = int; // file descriptor
#endif

    /// The empty object (private memory has no backing object).
    Mappable() noexcept = default;

    /// Takes ownership of an open handle; it is closed with the last copy.
    [[nodiscard]] static Mappable adopt(native_handle_type handle)
    {
        Mappable m;
        m.owner_ = std::make_shared<const Owner>(handle);
        return m;
    }

    [[nodiscard]] native_handle_type native_handle() const noexcept
    {
        return owner_ ? owner_->handle : Owner::invalid;
    }
    [[nodiscard]] bool empty() const noexcept
    {
        return owner_ == nullptr;
    }
    explicit operator bool() const noexcept
    {
        return !empty();
    }

    /// A stable identity for this object, for dumps and tests (0 for the empty object).
    [[nodiscard]] std::uintptr_t identity() const noexcept
    {
        return reinterpret_cast<std::uintptr_t>(owner_.get());
    }

    /// Same underlying object (not merely an equal handle number).
    friend bool operator==(const Mappable& a, const Mappable& b) noexcept
    {
        return a.owner_ == b.owner_;
    }

private:
    struct Owner {
#if MEMBACKING_OS_WINDOWS
        static constexpr native_handle_type invalid = nullptr;
#else
        static constexpr native_handle_type invalid = -1;
#endif
        explicit Owner(native_handle_type h) noexcept : handle(h) {}
        Owner(const Owner&) = delete;
        Owner& operator=(const Owner&) = delete;
        ~Owner()
        {
            close_native(handle);
        }
        native_handle_type handle;
    };

    static void close_native(native_handle_type h) noexcept
    {
        // A close error is not actionable here: the handle is gone either way.
#if MEMBACKING_OS_LINUX
        if (h >= 0)
            ::close(h);
#elif MEMBACKING_OS_WINDOWS
        if (h != nullptr)
            ::CloseHandle(h);
#endif
    }

    std::shared_ptr<const Owner> owner_;
};

} // namespace membacking
