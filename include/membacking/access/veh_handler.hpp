/**
 * @file access/veh_handler.hpp
 * Layer: access (includes base/ only). The body is Windows x86-64 with a GCC-compatible compiler
 * (MinGW) only; include access/fault_handler.hpp, which picks this header or the Linux one.
 *
 * The vectored exception handler behind the guarded primitives (access/primitives.hpp).
 *
 * What recovery needs is the same as on Linux: for the instruction that faulted, is it one of
 * ours, and where does it resume? On Linux the answer is a table in a section of its own whose
 * entries follow their code through COMDAT folding because the section is SHF_LINK_ORDER. PE/COFF
 * has no SHF_LINK_ORDER, and its counterpart, an associative COMDAT section, names the section it
 * belongs to: inline assembly in an inline function cannot name the COMDAT group GCC will put the
 * function in (`.text$<mangled caller>` after inlining), and GNU as has no "the section that
 * holds this label" form. A table in an ordinary section would keep entries whose code the
 * linker discarded with a duplicate COMDAT copy, pointing at nothing or at unrelated code.
 *
 * So the table entry travels inside the code it describes. Every guarded instruction is preceded
 * by one 8-byte no-op that carries its recovery address:
 *
 *     3e 0f 1f 05 <rel32>     ds nopl <recover>(%rip)
 *     <the guarded instruction>
 *
 * A RIP-relative operand is relative to the end of the no-op, which is the address of the
 * guarded instruction: on a fault at IP, the recovery point is IP + rel32. The no-op never
 * touches memory (NOP ignores its operand), costs one decode slot on the success path, and is
 * an encoding no compiler or assembler emits on its own (alignment padding uses other ModRM
 * forms, and never a segment prefix with a RIP-relative NOP). Because the marker lives in the
 * very bytes of each inlined copy, a COMDAT copy the linker discards takes its marker with it,
 * and the copy it keeps carries its own: there is nothing for the linker to get wrong, with or
 * without --gc-sections, LTO or DLLs. The handler reads the 8 bytes before IP only after
 * VirtualQuery confirms they are committed and readable, so a fault at an arbitrary address
 * (a wild jump) cannot make the handler itself fault.
 *
 * The handler is registered first in the vectored chain (AddVectoredExceptionHandler(1, ...)) and
 * handles only EXCEPTION_ACCESS_VIOLATION and EXCEPTION_IN_PAGE_ERROR (the SIGBUS of a mapped
 * file whose page cannot be read). If the instruction is a guarded one it records the fault in a
 * thread-local, points RIP at the recovery label, clears DF and returns
 * EXCEPTION_CONTINUE_EXECUTION. Everything else gets EXCEPTION_CONTINUE_SEARCH: other vectored
 * handlers, frame-based SEH and finally the unhandled-exception path see the fault exactly as if
 * the library were not there. A fault is never swallowed.
 *
 * Each module (EXE or DLL) that uses the library registers its own handler once (the flag is a
 * function-local static, one per module on Windows); a handler recovers any module's guarded
 * instructions, since the marker is self-describing.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_WINDOWS

#    include <membacking/os/windows.hpp>

#    include <cstdint>
#    include <cstring>
#    include <type_traits>

namespace membacking::access {

/// What the handler recorded about the last fault it recovered on this thread.
struct FaultRecord {
    /// The first byte that could not be accessed (ExceptionInformation[1]); 0 when Windows gives
    /// no address (a non-canonical address raises #GP, reported as an access violation at ~0).
    std::uintptr_t address = 0;
    /// EXCEPTION_ACCESS_VIOLATION, or EXCEPTION_IN_PAGE_ERROR (the page of a mapped file could
    /// not be read in: Windows' SIGBUS).
    std::uint32_t exception = 0;
    /// ExceptionInformation[0]: 0 read, 1 write, 8 execute (DEP).
    std::uint32_t access = 0;
    /// RCX at the fault: for rep movsb/stosb, the bytes not yet done (see the Linux header).
    std::uint64_t remaining = 0;
};

namespace detail {

/// The marker before every guarded instruction: `ds nopl rel32(%rip)`.
inline constexpr unsigned char marker_opcode[4] = {0x3e, 0x0f, 0x1f, 0x05};
inline constexpr std::uintptr_t marker_size = sizeof(marker_opcode) + sizeof(std::int32_t);

// Trivially destructible on purpose: MinGW-w64 (emulated TLS on winpthreads) frees a thread's
// thread_local block before libstdc++ runs the destructors of the objects in it (GCC bug 80816),
// so a thread_local with a destructor would write into freed memory as its thread ends.
static_assert(std::is_trivially_destructible_v<FaultRecord>);
inline thread_local FaultRecord last_fault{};

/// True if the byte at `address` is committed and readable.
inline bool readable(std::uintptr_t address) noexcept
{
    MEMORY_BASIC_INFORMATION info{};
    // NOLINTNEXTLINE(performance-no-int-to-ptr): the address comes from the exception record
    if (::VirtualQuery(reinterpret_cast<const void*>(address), &info, sizeof(info)) == 0)
        return false;
    if (info.State != MEM_COMMIT || (info.Protect & (PAGE_GUARD | PAGE_NOACCESS)) != 0)
        return false;
    constexpr DWORD readable_protections = PAGE_READONLY | PAGE_READWRITE | PAGE_WRITECOPY |
                                           PAGE_EXECUTE_READ | PAGE_EXECUTE_READWRITE |
                                           PAGE_EXECUTE_WRITECOPY;
    return (info.Protect & readable_protections) != 0;
}

/// The recovery address for a faulting instruction at `ip`, or 0 if it is not a guarded one.
inline std::uintptr_t find_recovery(std::uintptr_t ip) noexcept
{
    if (ip < marker_size)
        return 0;
    const std::uintptr_t marker = ip - marker_size;
    if (!readable(marker) || !readable(ip - 1))
        return 0;
    unsigned char bytes[marker_size];
    // NOLINTNEXTLINE(performance-no-int-to-ptr): reading our own code bytes
    std::memcpy(bytes, reinterpret_cast<const void*>(marker), marker_size);
    if (std::memcmp(bytes, marker_opcode, sizeof(marker_opcode)) != 0)
        return 0;
    std::int32_t rel = 0;
    std::memcpy(&rel, bytes + sizeof(marker_opcode), sizeof(rel));
    return ip + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(rel));
}

inline LONG CALLBACK on_exception(EXCEPTION_POINTERS* info) noexcept
{
    const EXCEPTION_RECORD* rec = info->ExceptionRecord;
    if (rec->ExceptionCode != EXCEPTION_ACCESS_VIOLATION &&
        rec->ExceptionCode != EXCEPTION_IN_PAGE_ERROR)
        return EXCEPTION_CONTINUE_SEARCH;
    CONTEXT* ctx = info->ContextRecord;
    const std::uintptr_t recover = find_recovery(static_cast<std::uintptr_t>(ctx->Rip));
    if (recover == 0)
        return EXCEPTION_CONTINUE_SEARCH; // not ours: whoever is next decides, as without us
    FaultRecord f;
    f.exception = static_cast<std::uint32_t>(rec->ExceptionCode);
    if (rec->NumberParameters >= 2) {
        f.access = static_cast<std::uint32_t>(rec->ExceptionInformation[0]);
        f.address = static_cast<std::uintptr_t>(rec->ExceptionInformation[1]);
        if (f.address == ~std::uintptr_t{0})
            f.address = 0; // #GP: no address
    }
    f.remaining = ctx->Rcx;
    last_fault = f;
    ctx->Rip = recover;
    ctx->EFlags &= ~DWORD{0x400}; // DF clear, as the ABI expects
    return EXCEPTION_CONTINUE_EXECUTION;
}

} // namespace detail

/// Registers the handler once per module, first in the vectored chain. Idempotent and
/// thread-safe; every library entry point that creates guarded memory calls it.
inline void install_fault_handler() noexcept
{
    static const bool installed = [] {
        return ::AddVectoredExceptionHandler(1, &detail::on_exception) != nullptr;
    }();
    (void)installed;
}

/// The last fault recovered on this thread (valid right after a primitive returned false).
[[nodiscard]] inline const FaultRecord& last_fault() noexcept
{
    return detail::last_fault;
}

} // namespace membacking::access

#endif // MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_WINDOWS
