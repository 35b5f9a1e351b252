// The fault handler among other handlers of a real process, one scenario per run (argv[1]), each
// in a child process that starts with the default disposition (a sanitizer's own SIGSEGV
// handler is removed first, so every run sees the chain a plain process has):
// - late_handler_repaired: a handler installed after ours evicts it; install_fault_handler()
//   puts ours back in front, and the newcomer still gets the faults that are not ours.
// - embedder_entry_point: an embedder's handler in front of ours calls access::handle_fault().
// - non_repeating_fault: a fault outside guarded code that does not repeat (the page became
//   accessible meanwhile) leaves the handlers in place; it used to leave SIG_DFL installed.
// - non_repeating_fault_in_front: the same with ours in front of the newcomer, which chains back
//   to ours (the re-entry goes on down the chain, not round again).
// - too_many_newcomers: install_fault_handler() chains up to 8 evicting handlers, then says no
//   and leaves the ninth in front.
// - ignored_sent_signal: with SIGSEGV ignored before us, a SIGSEGV sent by raise() is still
//   ignored (it used to reset SIG_DFL and end the process).
// - repeating_fault_dies: a real fault outside guarded code, with a newcomer that chains back to
//   ours, still ends the process with SIGSEGV, after exactly one retry.
#include <membacking/access/primitives.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <signal.h>
#include <string_view>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <utility>

namespace {

using membacking::access::handle_fault;
using membacking::access::install_fault_handler;

constexpr std::size_t page_size = 4096;

/// The page a newcomer handler "heals" (makes readable) when it faults, as another thread's
/// mprotect would between the fault and the handler.
void* healable = nullptr;
/// How often the newcomer handler ran; written to `calls_fd` as well, for a parent to count.
volatile sig_atomic_t newcomer_calls = 0;
int calls_fd = -1;
struct sigaction newcomer_previous {};

enum class Newcomer { heal_then_chain, chain, entry_point_then_heal };
Newcomer newcomer_kind = Newcomer::chain;

bool is_healable(const siginfo_t* info)
{
    const auto a = reinterpret_cast<std::uintptr_t>(info->si_addr);
    const auto h = reinterpret_cast<std::uintptr_t>(healable);
    return healable != nullptr && a >= h && a < h + page_size;
}

void chain_to_newcomer_previous(int sig, siginfo_t* info, void* context)
{
    if ((newcomer_previous.sa_flags & SA_SIGINFO) != 0 && newcomer_previous.sa_sigaction != nullptr)
        newcomer_previous.sa_sigaction(sig, info, context);
    else
        ::_exit(90); // the scenarios always install the newcomer over a SA_SIGINFO handler
}

/// A crash reporter or language runtime: installed after the library, chains to what it replaced.
extern "C" void newcomer_handler(int sig, siginfo_t* info, void* context)
{
    if (newcomer_kind == Newcomer::entry_point_then_heal && handle_fault(sig, info, context))
        return; // the library's fault: recovered, nothing else to do
    newcomer_calls = newcomer_calls + 1;
    if (calls_fd >= 0) {
        const char c = 'x';
        (void)!::write(calls_fd, &c, 1);
    }
    if (newcomer_kind != Newcomer::chain && is_healable(info)) {
        ::mprotect(healable, page_size, PROT_READ);
        if (newcomer_kind == Newcomer::entry_point_then_heal)
            return;
    }
    chain_to_newcomer_previous(sig, info, context);
}

void install_newcomer(Newcomer kind)
{
    newcomer_kind = kind;
    struct sigaction sa {};
    sa.sa_sigaction = &newcomer_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGSEGV, &sa, &newcomer_previous);
}

bool current_is_newcomer()
{
    struct sigaction now {};
    ::sigaction(SIGSEGV, nullptr, &now);
    return (now.sa_flags & SA_SIGINFO) != 0 && now.sa_sigaction == &newcomer_handler;
}

void* protected_page()
{
    void* p = ::mmap(nullptr, page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        ::_exit(91);
    return p;
}

/// A plain (unguarded) load, through a volatile so the compiler keeps it.
[[gnu::noinline]] std::uint8_t plain_load(const void* p)
{
    return *static_cast<const volatile std::uint8_t*>(p);
}

bool guarded_fault_recovered()
{
    void* page = protected_page();
    std::uint64_t v = 0;
    const bool ok =
        !membacking::access::try_load(page, v) &&
        membacking::access::last_fault().address == reinterpret_cast<std::uintptr_t>(page);
    ::munmap(page, page_size);
    return ok;
}

#define EXPECT(cond)                                                                               \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            std::printf("%s:%d: failed: %s\n", __FILE__, __LINE__, #cond);                         \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

int late_handler_repaired()
{
    install_fault_handler();
    install_newcomer(Newcomer::heal_then_chain);
    EXPECT(current_is_newcomer());
    EXPECT(install_fault_handler()); // ours back in front
    EXPECT(!current_is_newcomer());
    EXPECT(guarded_fault_recovered());
    EXPECT(newcomer_calls == 0); // ours: the newcomer never saw it
    healable = protected_page();
    EXPECT(plain_load(healable) == 0); // not ours: the newcomer got it and healed the page
    EXPECT(newcomer_calls == 1);
    EXPECT(install_fault_handler()); // idempotent: nothing more to chain
    EXPECT(guarded_fault_recovered());
    EXPECT(newcomer_calls == 1);
    return 0;
}

int embedder_entry_point()
{
    install_fault_handler();
    install_newcomer(Newcomer::entry_point_then_heal);
    EXPECT(current_is_newcomer());
    EXPECT(guarded_fault_recovered()); // through handle_fault() in the embedder's handler
    EXPECT(newcomer_calls == 0);
    EXPECT(current_is_newcomer());
    healable = protected_page();
    EXPECT(plain_load(healable) == 0);
    EXPECT(newcomer_calls == 1);
    return 0;
}

int non_repeating_fault()
{
    install_fault_handler(); // in front of SIG_DFL
    install_newcomer(Newcomer::heal_then_chain);
    healable = protected_page();
    // The newcomer heals the page and chains to ours, which finds SIG_DFL behind it.
    EXPECT(plain_load(healable) == 0);
    EXPECT(newcomer_calls == 1);
    EXPECT(current_is_newcomer()); // not SIG_DFL
    EXPECT(install_fault_handler());
    EXPECT(guarded_fault_recovered());
    return 0;
}

int non_repeating_fault_in_front()
{
    install_fault_handler();
    install_newcomer(Newcomer::heal_then_chain);
    EXPECT(install_fault_handler()); // ours in front, the newcomer behind it, SIG_DFL last
    healable = protected_page();
    EXPECT(plain_load(healable) == 0);
    EXPECT(newcomer_calls == 1);
    struct sigaction now {};
    ::sigaction(SIGSEGV, nullptr, &now);
    EXPECT((now.sa_flags & SA_SIGINFO) != 0); // ours, still: not SIG_DFL
    EXPECT(!current_is_newcomer());
    EXPECT(guarded_fault_recovered());
    EXPECT(newcomer_calls == 1);
    return 0;
}

/// Distinct handlers, one per N, that only chain to what they replaced.
template <int N>
struct Numbered {
    static inline struct sigaction previous {};
    static void handler(int sig, siginfo_t* info, void* context)
    {
        previous.sa_sigaction(sig, info, context);
    }
    static void install()
    {
        struct sigaction sa {};
        sa.sa_sigaction = &handler;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        ::sigaction(SIGSEGV, &sa, &previous);
    }
    static bool is_current()
    {
        struct sigaction now {};
        ::sigaction(SIGSEGV, nullptr, &now);
        return (now.sa_flags & SA_SIGINFO) != 0 && now.sa_sigaction == &handler;
    }
};

template <int... N>
bool chain_each(std::integer_sequence<int, N...>)
{
    return ((Numbered<N>::install(), install_fault_handler() && !Numbered<N>::is_current()) && ...);
}

int too_many_newcomers()
{
    install_fault_handler();
    EXPECT(chain_each(std::make_integer_sequence<int, 8>{}));
    Numbered<8>::install();
    EXPECT(!install_fault_handler()); // a ninth: no room to chain it
    EXPECT(Numbered<8>::is_current());
    EXPECT(guarded_fault_recovered()); // through the whole chain, back to ours
    return 0;
}

int ignored_sent_signal()
{
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    ::sigaction(SIGSEGV, &ign, nullptr);
    install_fault_handler();
    EXPECT(::raise(SIGSEGV) == 0);
    EXPECT(guarded_fault_recovered()); // and ours is still in place
    return 0;
}

int repeating_fault_dies()
{
    install_fault_handler();
    install_newcomer(Newcomer::chain);
    install_fault_handler();
    EXPECT(guarded_fault_recovered());
    void* page = protected_page();
    (void)plain_load(page); // faults for good: the process ends here
    return 1;
}

struct Scenario {
    std::string_view name;
    int (*run)();
    bool dies; ///< expected to end by SIGSEGV, the newcomer having run exactly twice
};

constexpr Scenario scenarios[] = {
    {"late_handler_repaired", &late_handler_repaired, false},
    {"embedder_entry_point", &embedder_entry_point, false},
    {"non_repeating_fault", &non_repeating_fault, false},
    {"non_repeating_fault_in_front", &non_repeating_fault_in_front, false},
    {"too_many_newcomers", &too_many_newcomers, false},
    {"ignored_sent_signal", &ignored_sent_signal, false},
    {"repeating_fault_dies", &repeating_fault_dies, true},
};

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
        return 2;
    const Scenario* s = nullptr;
    for (const Scenario& c : scenarios)
        if (c.name == argv[1])
            s = &c;
    if (s == nullptr)
        return 2;
    int fds[2];
    if (::pipe(fds) != 0)
        return 2;
    const pid_t pid = ::fork();
    if (pid < 0)
        return 2;
    if (pid == 0) {
        ::close(fds[0]);
        calls_fd = fds[1];
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        ::sigaction(SIGSEGV, &dfl, nullptr); // a sanitizer's handler, if any, goes
        ::sigaction(SIGBUS, &dfl, nullptr);
        std::fflush(stdout);
        ::_exit(s->run());
    }
    ::close(fds[1]);
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid)
        return 2;
    int calls = 0;
    char buf[64];
    for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;)
        calls += static_cast<int>(n);
    std::printf("%s: %s %d, newcomer ran %d times\n", argv[1],
                WIFSIGNALED(status) ? "signal" : "exit",
                WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status), calls);
    if (s->dies)
        return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV && calls == 2 ? 0 : 1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
