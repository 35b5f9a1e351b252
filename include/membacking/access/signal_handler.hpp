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
 * One handler per object. The executable and each shared object that includes the library has
 * its own table, so each has its own handler: every function and variable below has hidden
 * visibility (the pragma), so no object's handler, state or last_fault() is interposed by
 * another's. Each installs its handler over whatever was there (possibly another object's) and
 * chains to it, so a fault in any object's primitives is recovered by that object's handler.
 *
 * Faults that are not ours go, in order:
 * 1. to the handlers that evicted ours (a crash reporter or language runtime installed after us),
 *    newest first, when install_fault_handler() has put ours back in front of them (it does so
 *    whenever it finds ours evicted). Such a handler usually chains to what it replaced, which
 *    is ours again: a thread-local depth, keyed by the fault, sends that re-entry on down the
 *    chain instead of round again;
 * 2. to the handler that was installed before ours: called directly (a SA_SIGINFO handler with
 *    the same arguments, a plain one with the signal number), never by reinstalling it;
 * 3. if that is SIG_DFL or SIG_IGN: a fault the kernel raised is retried once with our handler
 *    still installed, because the memory may have become accessible meanwhile (another thread's
 *    mprotect or mmap). Only when the same instruction faults again at the same address does the
 *    handler put SIG_DFL back and return, so the kernel delivers the default action (core dump,
 *    exact siginfo) exactly as without us. A signal sent with kill() or raise() is not retried:
 *    SIG_DFL, then raise it again. We never abort a process for a fault that is not ours.
 *
 * Embedders whose own handler runs in front of ours call access::handle_fault() from it (as
 * V8's TryHandleSignal or wasmtime's embedder hook), or call install_fault_handler() again
 * after installing theirs.
 *
 * Unloading: the first install pins the object that holds the handler (dlopen RTLD_NODELETE of
 * itself), so dlclose of a plugin that uses the library never leaves a handler in the chain that
 * points into unmapped code. A plugin that used guarded memory stays mapped until exit.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_LINUX

#    include <atomic>
#    include <csignal>
#    include <cstdint>
#    include <cstring>
#    include <dlfcn.h>
#    include <mutex>
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

// Everything from here to the pop is per object: see "One handler per object" above.
#    pragma GCC visibility push(hidden)

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

/// How many handlers that evicted ours one object remembers (install_fault_handler()).
inline constexpr int max_newcomers = 8;

/// The chain behind this object's handler, for one signal. Written under install_mutex only;
/// the handler reads a slot only after seeing newcomer_count cover it (release/acquire).
struct ChainState {
    struct sigaction previous {};                 // what was installed before our first install
    struct sigaction newcomers[max_newcomers] {}; // handlers that evicted ours, oldest first
    std::atomic<int> newcomer_count{0};
    std::atomic<bool> gave_up_to_default{false}; // we put SIG_DFL back for a repeating fault
};

inline ChainState segv_chain{};
inline ChainState bus_chain{};
inline std::mutex install_mutex;
inline bool first_install_done = false; // under install_mutex

inline ChainState& chain_for(int sig) noexcept
{
    return sig == SIGBUS ? bus_chain : segv_chain;
}

/// A kernel-raised fault, as far as the chain needs to tell one from another.
struct FaultKey {
    int signal = 0;
    std::uintptr_t address = 0;
    std::uintptr_t ip = 0;
    friend bool operator==(const FaultKey&, const FaultKey&) = default;
};

/// The fault this thread is passing down the chain, and how far down it is (re-entry guard).
struct InProgress {
    FaultKey key;
    int depth = 0;
};
[[gnu::tls_model("initial-exec")]] inline thread_local InProgress in_progress{};
/// The last fault this thread retried under a default action (repeat detection).
[[gnu::tls_model("initial-exec")]] inline thread_local FaultKey retried_once{};

inline FaultKey key_of(int sig, const siginfo_t* info, const void* context) noexcept
{
    FaultKey k;
    k.signal = sig;
    if (info != nullptr)
        k.address = reinterpret_cast<std::uintptr_t>(info->si_addr);
    if (context != nullptr)
        k.ip = static_cast<std::uintptr_t>(
            static_cast<const ucontext_t*>(context)->uc_mcontext.gregs[REG_RIP]);
    return k;
}

/// The handler installed for SIGSEGV and SIGBUS (defined after handle_fault, which it calls).
inline void on_fault(int sig, siginfo_t* info, void* context) noexcept;

inline bool is_ours(const struct sigaction& sa) noexcept
{
    return (sa.sa_flags & SA_SIGINFO) != 0 && sa.sa_sigaction == &on_fault;
}

/// SIG_DFL or SIG_IGN in front of a fault: see step 3 in the file comment.
inline void default_action(int sig, const siginfo_t* info, const void* context) noexcept
{
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    if (info == nullptr || info->si_code <= 0) {
        // Sent by kill() or raise(): nothing re-executes, so send it again. It stays blocked
        // until this handler returns, and then the default action ends the process.
        chain_for(sig).gave_up_to_default.store(true, std::memory_order_relaxed);
        ::sigaction(sig, &dfl, nullptr);
        (void)::raise(sig);
        return;
    }
    const FaultKey key = key_of(sig, info, context);
    if (!(retried_once == key)) {
        retried_once = key; // return and let the instruction run again, our handler in place
        return;
    }
    // The same instruction faulted again at the same address: the fault is real.
    retried_once = FaultKey{};
    chain_for(sig).gave_up_to_default.store(true, std::memory_order_relaxed);
    ::sigaction(sig, &dfl, nullptr);
}

/// Runs a handler that was in place before ours or that evicted ours.
inline void call_handler(const struct sigaction& h, int sig, siginfo_t* info,
                         void* context) noexcept
{
    if ((h.sa_flags & SA_SIGINFO) != 0) {
        if (h.sa_sigaction != nullptr)
            h.sa_sigaction(sig, info, context);
        else
            default_action(sig, info, context);
        return;
    }
    if (h.sa_handler == SIG_IGN && (info == nullptr || info->si_code <= 0))
        return; // a SIGSEGV sent with kill() to a process that ignores it: ignored, as without us
    if (h.sa_handler == SIG_DFL || h.sa_handler == SIG_IGN) {
        // (The kernel never lets a fault it raised be ignored: it forces the default action.)
        default_action(sig, info, context);
        return;
    }
    h.sa_handler(sig);
}

/// A fault that is not this object's: down the chain (steps 1 to 3 of the file comment).
inline void chain(int sig, siginfo_t* info, void* context) noexcept
{
    ChainState& c = chain_for(sig);
    const FaultKey key = key_of(sig, info, context);
    const int depth = in_progress.key == key ? in_progress.depth : 0;
    const int newcomers = c.newcomer_count.load(std::memory_order_acquire);
    if (depth < newcomers) {
        const InProgress saved = in_progress;
        in_progress = InProgress{key, depth + 1};
        call_handler(c.newcomers[newcomers - 1 - depth], sig, info, context);
        in_progress = saved;
        return;
    }
    call_handler(c.previous, sig, info, context);
}

} // namespace detail

/// The entry point for an embedder's own SIGSEGV/SIGBUS handler (one that runs in front of
/// ours): call it first with the handler's arguments. True: the fault was in a guarded primitive
/// of the calling object (executable or shared object) and `context` now resumes at its recovery
/// path; return from your handler at once. False: not ours; handle or chain it as usual (the
/// library's copies in other objects are in that chain). Async-signal-safe.
[[nodiscard]] inline bool handle_fault(int sig, siginfo_t* info, void* context) noexcept
{
    auto* uc = static_cast<ucontext_t*>(context);
    // Only kernel-generated faults (si_code > 0) interrupt an instruction we can resume from.
    if ((sig != SIGSEGV && sig != SIGBUS) || uc == nullptr || info == nullptr || info->si_code <= 0)
        return false;
    const auto ip = static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
    const std::uintptr_t recover = detail::find_recovery(ip);
    if (recover == 0)
        return false;
    detail::last_fault =
        FaultRecord{reinterpret_cast<std::uintptr_t>(info->si_addr), sig, info->si_code,
                    static_cast<std::uint64_t>(uc->uc_mcontext.gregs[REG_RCX])};
    uc->uc_mcontext.gregs[REG_RIP] = static_cast<greg_t>(recover);
    uc->uc_mcontext.gregs[REG_EFL] &= ~greg_t{0x400}; // DF clear, as the ABI expects
    return true;
}

inline void detail::on_fault(int sig, siginfo_t* info, void* context) noexcept
{
    if (!handle_fault(sig, info, context))
        chain(sig, info, context);
}

/// Installs this object's handler for SIGSEGV and SIGBUS, or puts it back in front. Thread-safe;
/// every library entry point that creates guarded memory calls it, and embedders call it again
/// after installing a handler of their own.
/// - First call: installs the handler, remembering what was there, and pins this object.
/// - Later calls: if another handler has replaced ours, ours goes back in front and calls that
///   one first for the faults that are not ours (at most detail::max_newcomers of them); if we
///   had put SIG_DFL back for a fault that then did not repeat, ours goes back.
/// Returns whether this object's handler is now the installed one for both signals.
inline bool install_fault_handler() noexcept
{
    struct sigaction ours {};
    ours.sa_sigaction = &detail::on_fault;
    // SA_ONSTACK: run on the thread's alternate stack if it has one, so that chaining to a
    // stack-overflow handler (sanitizers, language runtimes) still works.
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);

    const std::lock_guard lock(detail::install_mutex);
    if (!detail::first_install_done) {
        ::sigaction(SIGSEGV, &ours, &detail::segv_chain.previous);
        ::sigaction(SIGBUS, &ours, &detail::bus_chain.previous);
        detail::first_install_done = true;
        // Pin the object whose code the handler is: dlclose must not unmap it while the process's
        // chain may still lead into it. NOLOAD takes a reference on the loaded object, never
        // loads anything; the handle is kept for good on purpose.
        Dl_info self{};
        if (::dladdr(reinterpret_cast<void*>(&detail::on_fault), &self) != 0 &&
            self.dli_fname != nullptr && self.dli_fname[0] != '\0')
            (void)::dlopen(self.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE);
        return true;
    }
    bool current = true;
    for (const int sig : {SIGSEGV, SIGBUS}) {
        detail::ChainState& c = detail::chain_for(sig);
        struct sigaction now {};
        ::sigaction(sig, nullptr, &now);
        if (detail::is_ours(now))
            continue;
        const bool was_ours_given_up = c.gave_up_to_default.exchange(false) &&
                                       (now.sa_flags & SA_SIGINFO) == 0 &&
                                       now.sa_handler == SIG_DFL;
        const int n = c.newcomer_count.load(std::memory_order_relaxed);
        bool known = was_ours_given_up;
        for (int i = 0; i < n && !known; ++i)
            known = c.newcomers[i].sa_handler == now.sa_handler &&
                    (c.newcomers[i].sa_flags & SA_SIGINFO) == (now.sa_flags & SA_SIGINFO);
        if (!known && n == detail::max_newcomers) {
            current = false;
            continue;
        }
        struct sigaction evicted {};
        ::sigaction(sig, &ours, &evicted); // atomic swap: `evicted` is what really was there
        if (detail::is_ours(evicted) || known)
            continue;
        c.newcomers[n] = evicted;
        c.newcomer_count.store(n + 1, std::memory_order_release);
    }
    return current;
}

/// The last fault recovered on this thread (valid right after a primitive returned false).
[[nodiscard]] inline const FaultRecord& last_fault() noexcept
{
    return detail::last_fault;
}

#    pragma GCC visibility pop

} // namespace membacking::access

#endif // MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_LINUX
