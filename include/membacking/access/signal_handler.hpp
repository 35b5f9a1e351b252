/**
 * @file access/signal_handler.hpp
 * Layer: access (includes base/ only). The body is Linux x86-64 only; include
 * access/fault_handler.hpp, which picks this header or the Windows one.
 *
 * The SIGSEGV/SIGBUS handler behind the guarded primitives (access/primitives.hpp).
 *
 * How recovery works: every faulting instruction of a primitive is bracketed by two local labels,
 * and the asm also emits a FixupEntry {start, end, recover} (three self-relative 32-bit offsets)
 * into the section `mb_fixups`. On a fault, the handler looks the interrupted instruction pointer
 * up in [__start_mb_fixups, __stop_mb_fixups); if it lies inside an entry, it records the fault
 * (address, signal, si_code, RCX) in a thread-local and resumes at the entry's recovery label,
 * where the primitive returns false. No setjmp, no unwinding.
 *
 * Header-only and COMDAT: each inlined copy of a primitive carries its own entry. The section is
 * SHF_LINK_ORDER ("ao") linked to the instruction's text section, so when the linker discards a
 * duplicate copy of an inline function it discards that copy's entry too (a plain "a" section
 * keeps entries pointing into discarded sections and the link fails).
 *
 * Faults that are not ours are chained to the handler that was installed before us: a
 * SA_SIGINFO handler is called with the same arguments, a plain handler with the signal number;
 * SIG_DFL and SIG_IGN restore the default action and return, so the faulting instruction runs
 * again and the process dies exactly as it would have without us. We never abort a process for
 * a fault that is not ours.
 *
 * Each shared object that uses the library has its own table and installs its own handler
 * (the state below has hidden visibility); the handlers chain through each other, so a fault in
 * any of them is recovered.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_LINUX

#    include <csignal>
#    include <cstdint>
#    include <cstring>
#    include <ucontext.h>

namespace membacking::access {

/// What the handler recorded about the last fault it recovered on this thread.
struct FaultRecord {
    std::uintptr_t address = 0; ///< si_addr: the first byte that could not be accessed
    int signal = 0;             ///< SIGSEGV or SIGBUS
    int code = 0;               ///< si_code (SEGV_MAPERR, SEGV_ACCERR, BUS_ADRERR, ...)
    /// RCX at the fault. For the bulk primitives (rep movsb/stosb) this is the architectural
    /// progress: the bytes not yet done. It is what a retry resumes from, not `address`: with
    /// fast strings the CPU may fault on a later line while earlier bytes are still undone, and
    /// only RCX/RSI/RDI say where the completed prefix ends. Meaningless for other primitives.
    std::uint64_t remaining = 0;
};

namespace detail {

/// One recovery-table entry; each field is an offset from the field's own address.
struct FixupEntry {
    std::int32_t start;
    std::int32_t end;
    std::int32_t recover;
};

// Initial-exec TLS: the handler must not go through __tls_get_addr, which may allocate.
[[gnu::tls_model("initial-exec")]] inline thread_local FaultRecord last_fault{};

extern "C" {
// Provided by the linker for the section; weak so that a program with no primitive links.
// The names are the linker's (__start_/__stop_ + section name), hence reserved identifiers.
extern const FixupEntry __start_mb_fixups[] // NOLINT(bugprone-reserved-identifier)
    __attribute__((weak, visibility("hidden")));
extern const FixupEntry __stop_mb_fixups[] // NOLINT(bugprone-reserved-identifier)
    __attribute__((weak, visibility("hidden")));
}

inline std::uintptr_t fixup_target(const std::int32_t& field) noexcept
{
    return reinterpret_cast<std::uintptr_t>(&field) +
           static_cast<std::uintptr_t>(static_cast<std::intptr_t>(field));
}

/// The recovery address for an instruction pointer, or 0 if it is not inside a primitive.
inline std::uintptr_t find_recovery(std::uintptr_t ip) noexcept
{
    for (const FixupEntry* e = __start_mb_fixups; e != __stop_mb_fixups; ++e) {
        if (ip >= fixup_target(e->start) && ip < fixup_target(e->end))
            return fixup_target(e->recover);
    }
    return 0;
}

/// Handlers that were in place before ours (hidden: one per shared object).
struct __attribute__((visibility("hidden"))) PreviousHandlers {
    static struct sigaction& for_signal(int sig) noexcept
    {
        static struct sigaction segv {};
        static struct sigaction bus {};
        return sig == SIGBUS ? bus : segv;
    }
};

inline void chain_to_previous(int sig, siginfo_t* info, void* context) noexcept
{
    const struct sigaction& prev = PreviousHandlers::for_signal(sig);
    if ((prev.sa_flags & SA_SIGINFO) != 0 && prev.sa_sigaction != nullptr) {
        prev.sa_sigaction(sig, info, context);
        return;
    }
    if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
        // Put the default action back; the faulting instruction runs again on return and the
        // kernel delivers the default action (core dump) exactly as without us. A signal sent by
        // kill() or raise() is not re-executed, so send it again.
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        ::sigaction(sig, &dfl, nullptr);
        if (info == nullptr || info->si_code <= 0)
            (void)::raise(sig);
        return;
    }
    prev.sa_handler(sig);
}

inline void on_fault(int sig, siginfo_t* info, void* context) noexcept
{
    auto* uc = static_cast<ucontext_t*>(context);
    // Only kernel-generated faults (si_code > 0) interrupt an instruction we can resume from.
    if (uc != nullptr && info != nullptr && info->si_code > 0) {
        const auto ip = static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
        if (const std::uintptr_t recover = find_recovery(ip); recover != 0) {
            last_fault =
                FaultRecord{reinterpret_cast<std::uintptr_t>(info->si_addr), sig, info->si_code,
                            static_cast<std::uint64_t>(uc->uc_mcontext.gregs[REG_RCX])};
            uc->uc_mcontext.gregs[REG_RIP] = static_cast<greg_t>(recover);
            uc->uc_mcontext.gregs[REG_EFL] &= ~greg_t{0x400}; // DF clear, as the ABI expects
            return;
        }
    }
    chain_to_previous(sig, info, context);
}

} // namespace detail

/// Installs the handler for SIGSEGV and SIGBUS once per shared object. Idempotent and
/// thread-safe; every library entry point that creates guarded memory calls it.
inline __attribute__((visibility("hidden"))) void install_fault_handler() noexcept
{
    static const bool installed = [] {
        struct sigaction sa {};
        sa.sa_sigaction = &detail::on_fault;
        // SA_ONSTACK: run on the thread's alternate stack if it has one, so that chaining to a
        // stack-overflow handler (sanitizers, language runtimes) still works.
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        ::sigaction(SIGSEGV, &sa, &detail::PreviousHandlers::for_signal(SIGSEGV));
        ::sigaction(SIGBUS, &sa, &detail::PreviousHandlers::for_signal(SIGBUS));
        return true;
    }();
    (void)installed;
}

/// The last fault recovered on this thread (valid right after a primitive returned false).
[[nodiscard]] inline const FaultRecord& last_fault() noexcept
{
    return detail::last_fault;
}

} // namespace membacking::access

#endif // MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_LINUX
