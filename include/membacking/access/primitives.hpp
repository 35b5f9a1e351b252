/**
 * @file access/primitives.hpp
 * Layer: access (includes base/ and access/fault_handler.hpp). The body is x86-64 Linux and
 * Windows (MinGW) only: see MEMBACKING_HAS_GUARDED_ACCESS.
 *
 * Guarded memory primitives: copy, fill, 1/2/4/8-byte load and store, compare-exchange and
 * fetch-add. Each returns true on success, or false after a fault inside it (SIGSEGV/SIGBUS on
 * Linux, an access violation or in-page error on Windows), with the fault described by
 * access::last_fault(). On success they cost what the plain instruction costs: one instruction
 * (loads, stores, atomics) or one `rep movsb`/`rep stosb` (bulk), plus a branch; on Windows one
 * 8-byte no-op before it as well (the recovery marker).
 *
 * Why these instructions:
 * - `rep movsb` on CPUs with ERMS/FSRM matches or beats glibc's memcpy from a few hundred bytes
 *   up (measured on this project's EPYC: 4 KiB and 64 KiB equal, 1 MiB 16% faster), and on a
 *   fault the architecture leaves the copy precise: every byte before the faulting address has
 *   been copied, so the fault address alone tells how far the copy got.
 * - Loads and stores are a single access of the natural width, so a guest observes no tearing
 *   for aligned 1/2/4/8-byte values, as with a plain pointer.
 * - Atomics use `lock`-prefixed instructions: sequentially consistent, and a compiler barrier.
 *
 * Preconditions (caller's, not checked here): the pointers lie in memory the caller may touch or
 * in a reserved guest range; for copies, dst and src do not overlap. The address of a fault in
 * the caller's own buffer is reported like any other: callers must tell the two apart.
 *
 * All functions are `noexcept`, allocate nothing, take no lock and make no system call.
 */
#pragma once

#include <membacking/access/fault_handler.hpp>
#include <membacking/base/config.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS

#    include <cstddef>
#    include <cstdint>
#    include <cstring>
#    include <type_traits>

// How a guarded instruction is bracketed, per OS (access/fault_handler.hpp). In each asm block,
// MEMBACKING_GUARD_BEGIN comes right before the one instruction that may fault and
// MEMBACKING_GUARD_END right after it; the asm-goto label `fault` is where a fault resumes.
#    if MEMBACKING_OS_LINUX
// A recovery-table entry for the instructions between .Lmb_start%= and .Lmb_end%=. See
// access/signal_handler.hpp for why the section is "ao".
#        define MEMBACKING_GUARD_BEGIN ".Lmb_start%=:\n\t"
#        define MEMBACKING_GUARD_END                                                               \
            ".Lmb_end%=:\n\t"                                                                      \
            ".pushsection mb_fixups,\"ao\",@progbits,.Lmb_start%=\n\t"                             \
            ".balign 4\n\t"                                                                        \
            ".long .Lmb_start%= - .\n\t"                                                           \
            ".long .Lmb_end%= - .\n\t"                                                             \
            ".long %l[fault] - .\n\t"                                                              \
            ".popsection\n\t"
#    else
// The marker no-op `ds nopl fault(%rip)` right before the instruction: its displacement is the
// recovery address relative to the guarded instruction. See access/veh_handler.hpp.
#        define MEMBACKING_GUARD_BEGIN                                                             \
            ".byte 0x3e\n\t"                                                                       \
            "nopl %l[fault](%%rip)\n\t"
#        define MEMBACKING_GUARD_END ""
#    endif

namespace membacking::access {

/// The unsigned integer of the same size as T (T must be 1, 2, 4 or 8 bytes).
template <class T>
using bits_of = std::conditional_t<
    sizeof(T) == 1, std::uint8_t,
    std::conditional_t<sizeof(T) == 2, std::uint16_t,
                       std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>>;

/// A trivially copyable type of 1, 2, 4 or 8 bytes: what one load or store instruction moves.
template <class T>
concept AtomicSized = std::is_trivially_copyable_v<T> &&
    (sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);

/// An unsigned integer of 1, 2, 4 or 8 bytes.
template <class U>
concept AtomicUnsigned = std::is_unsigned_v<U> && AtomicSized<U>;

/// Copies n bytes from src to dst. On a fault, the first n - last_fault().remaining bytes
/// have been copied (bytes after them may or may not have been); last_fault().address is the
/// byte, in whichever buffer, that could not be accessed.
MEMBACKING_ALWAYS_INLINE bool try_copy(void* dst, const void* src, std::size_t n) noexcept
{
    asm volatile goto(MEMBACKING_GUARD_BEGIN "rep movsb\n\t" MEMBACKING_GUARD_END
                      : "+D"(dst), "+S"(src), "+c"(n)
                      :
                      : "memory"
                      : fault);
    return true;
fault:
    return false;
}

/// Sets n bytes at dst to value. On a fault, the first n - last_fault().remaining bytes are set.
MEMBACKING_ALWAYS_INLINE bool try_fill(void* dst, std::uint8_t value, std::size_t n) noexcept
{
    asm volatile goto(MEMBACKING_GUARD_BEGIN "rep stosb\n\t" MEMBACKING_GUARD_END
                      : "+D"(dst), "+c"(n)
                      : "a"(value)
                      : "memory"
                      : fault);
    return true;
fault:
    return false;
}

/// One load of sizeof(T) bytes.
template <AtomicSized T>
MEMBACKING_ALWAYS_INLINE bool try_load(const void* src, T& out) noexcept
{
    using U = bits_of<T>;
    const U* p = static_cast<const U*>(src);
    U v;
    asm volatile goto(MEMBACKING_GUARD_BEGIN "mov %[mem], %[v]\n\t" MEMBACKING_GUARD_END
                      : [v] "=r"(v)
                      : [mem] "m"(*p)
                      :
                      : fault);
    std::memcpy(&out, &v, sizeof(T));
    return true;
fault:
    return false;
}

/// One store of sizeof(T) bytes.
template <AtomicSized T>
MEMBACKING_ALWAYS_INLINE bool try_store(void* dst, const T& value) noexcept
{
    using U = bits_of<T>;
    U* p = static_cast<U*>(dst);
    U v;
    std::memcpy(&v, &value, sizeof(T));
    asm volatile goto(MEMBACKING_GUARD_BEGIN "mov %[v], %[mem]\n\t" MEMBACKING_GUARD_END
                      : [mem] "=m"(*p)
                      : [v] "r"(v)
                      :
                      : fault);
    return true;
fault:
    return false;
}

/// Sequentially consistent compare-exchange. On success (*dst == expected) stores desired and
/// sets swapped; otherwise sets swapped = false and expected to the value found.
template <AtomicSized T>
MEMBACKING_ALWAYS_INLINE bool try_compare_exchange(void* dst, T& expected, const T& desired,
                                                   bool& swapped) noexcept
{
    using U = bits_of<T>;
    U* p = static_cast<U*>(dst);
    U want;
    U next;
    std::memcpy(&want, &expected, sizeof(T));
    std::memcpy(&next, &desired, sizeof(T));
    U seen = want;
    asm volatile goto(MEMBACKING_GUARD_BEGIN "lock cmpxchg %[next], %[mem]\n\t" MEMBACKING_GUARD_END
                      : [mem] "+m"(*p), "+a"(seen)
                      : [next] "r"(next)
                      : "cc", "memory"
                      : fault);
    swapped = seen == want;
    std::memcpy(&expected, &seen, sizeof(T));
    return true;
fault:
    return false;
}

/// Sequentially consistent fetch-add on an unsigned integer; `old` receives the previous value.
template <AtomicUnsigned U>
MEMBACKING_ALWAYS_INLINE bool try_fetch_add(void* dst, U addend, U& old) noexcept
{
    U* p = static_cast<U*>(dst);
    U v = addend;
    asm volatile goto(MEMBACKING_GUARD_BEGIN "lock xadd %[v], %[mem]\n\t" MEMBACKING_GUARD_END
                      : [mem] "+m"(*p), [v] "+r"(v)
                      :
                      : "cc", "memory"
                      : fault);
    old = v;
    return true;
fault:
    return false;
}

} // namespace membacking::access

#endif // MEMBACKING_HAS_GUARDED_ACCESS
