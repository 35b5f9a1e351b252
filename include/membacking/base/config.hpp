/**
 * @file base/config.hpp
 * Layer: base (includes nothing from the library).
 *
 * The one place that reads platform, architecture and compiler macros. Every other header tests the
 * MEMBACKING_* macros defined here, so porting the library means reading this file first.
 */
#pragma once

#if defined(__linux__)
#    define MEMBACKING_OS_LINUX 1
#else
#    define MEMBACKING_OS_LINUX 0
#endif

#if defined(_WIN32)
#    define MEMBACKING_OS_WINDOWS 1
#else
#    define MEMBACKING_OS_WINDOWS 0
#endif

#if defined(__x86_64__) || defined(_M_X64)
#    define MEMBACKING_ARCH_X86_64 1
#else
#    define MEMBACKING_ARCH_X86_64 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#    define MEMBACKING_GNU_COMPATIBLE 1
#else
#    define MEMBACKING_GNU_COMPATIBLE 0
#endif

// MSVC, or clang in MSVC mode (clang-cl): GNU inline assembly and attributes are not to be relied
// on there.
#if defined(_MSC_VER)
#    define MEMBACKING_MSVC_MODE 1
#else
#    define MEMBACKING_MSVC_MODE 0
#endif

// MinGW-w64 (GCC or clang targeting the GNU Windows runtime).
#if defined(__MINGW32__)
#    define MEMBACKING_MINGW 1
#else
#    define MEMBACKING_MINGW 0
#endif

// The fault-recovering access primitives are x86-64 inline assembly in the GNU dialect. How a
// fault finds its recovery point is per OS (access/fault_handler.hpp): an ELF section with
// SHF_LINK_ORDER and a signal handler on Linux, a marker in the instruction stream and a vectored
// exception handler on Windows with a GCC-compatible compiler (MinGW). Other combinations have no
// access layer yet.
#if MEMBACKING_ARCH_X86_64 && MEMBACKING_GNU_COMPATIBLE && !MEMBACKING_MSVC_MODE &&                \
    (MEMBACKING_OS_LINUX || MEMBACKING_OS_WINDOWS)
#    define MEMBACKING_HAS_GUARDED_ACCESS 1
#else
#    define MEMBACKING_HAS_GUARDED_ACCESS 0
#endif

// ThreadSanitizer does not understand faults resumed at another instruction by a signal handler
// that rewrites the context, nor the inline-asm accesses; the build tells us so we can say so.
#if defined(__SANITIZE_THREAD__)
#    define MEMBACKING_TSAN 1
#elif defined(__has_feature)
#    if __has_feature(thread_sanitizer)
#        define MEMBACKING_TSAN 1
#    endif
#endif
#ifndef MEMBACKING_TSAN
#    define MEMBACKING_TSAN 0
#endif

#if MEMBACKING_GNU_COMPATIBLE
#    define MEMBACKING_ALWAYS_INLINE inline __attribute__((always_inline))
#    define MEMBACKING_NOINLINE __attribute__((noinline))
#    define MEMBACKING_COLD __attribute__((cold))
#else
#    define MEMBACKING_ALWAYS_INLINE inline
#    define MEMBACKING_NOINLINE
#    define MEMBACKING_COLD
#endif

// consteval where the compiler evaluates it everywhere. clang before 15 does not evaluate a
// consteval call written inside a template: it leaves the call to the linker, which finds no
// definition (an undefined reference in any user template that writes 0x1000_gpa, 4_KiB or
// MemoryRange::constant). There these are constexpr: still folded wherever a constant is needed,
// and their checks stop the program through detail::fatal if a call is evaluated at run time.
#if defined(__clang__) && __clang_major__ < 15
#    define MEMBACKING_CONSTEVAL constexpr
#else
#    define MEMBACKING_CONSTEVAL consteval
#endif

// [[clang::lifetimebound]] where the compiler has it (clang): the result refers into the object
// (or argument) it is attached to, so binding it past that object's life is diagnosed. GCC has no
// equivalent; there the deleted rvalue overloads next to each use are what catch the mistake.
#if defined(__clang__)
#    define MEMBACKING_LIFETIMEBOUND [[clang::lifetimebound]]
#else
#    define MEMBACKING_LIFETIMEBOUND
#endif
