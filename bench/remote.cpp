// Guest memory served to a worker in another process over a socket (ipc/), each beside its
// baseline:
//
// BM_RemoteFault/process: the latency of a worker process's first access to a page it has not
//   mapped: fault, fault_request over the socket, the manager's answer with the fd, the mapping,
//   the retry. Each iteration first takes the page away from the worker (a RAM visibility toggle
//   that invalidates it, not timed), then the worker times one 8-byte read in its own process
//   and sends the time back (manual time).
// BM_RemoteFault/local: the same for a lazy mapper of the manager's own process
//   (client().lazy_guest_memory()): the baseline.
// BM_RemoteInvalidate/<n>: one control call that removes a piece every one of n connected worker
//   processes holds (they fault it in again between iterations, not timed). n = 0 is the
//   baseline: the extra cost per worker is (t(n) - t(0)) / n. The workers are invalidated
//   together (the listener's two phases): all are sent the invalidation before any is awaited.
//
// The workers are bench_remote_worker processes (bench/remote_worker.cpp), spawned from the
// folder this program runs from.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_listener.hpp>
#include <membacking/membacking.hpp>

#include <benchmark/benchmark.h>

#include "line_protocol.hpp"

#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <spawn.h>
#include <string>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

using namespace membacking;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
const MemoryRange pam = MemoryRange::valid_or_abort(0xc0000, 0xc4000);

void quiet(const std::string&) {}

[[noreturn]] void fail(const std::string& why)
{
    std::fprintf(stderr, "bench_remote: %s\n", why.c_str());
    std::exit(1);
}

MockGuestMemoryManager make_guest()
{
    auto m = MockGuestMemoryManager::builder()
                 .x86_legacy_support(true)
                 .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, 4 * MiB)}))
                 .build(Length{16 * MiB});
    if (!m)
        fail(m.error().full_message());
    return std::move(*m);
}

/// bench_remote_worker, beside this program.
std::string worker_path()
{
    std::string self(4096, '\0');
    const ssize_t n = ::readlink("/proc/self/exe", self.data(), self.size());
    if (n <= 0)
        fail("cannot read /proc/self/exe");
    self.resize(static_cast<std::size_t>(n));
    return self.substr(0, self.rfind('/') + 1) + "bench_remote_worker";
}

/// One worker process served by the manager: spawned with its end of a fresh socket pair.
class Worker {
public:
    explicit Worker(MockGuestMemoryManager& m)
    {
        auto pair = ipc::Channel<>::pair();
        if (!pair)
            fail(pair.error().full_message());
        ipc::RemoteListenerOptions lo;
        lo.log = &quiet;
        auto served = m.client().serve_process(std::move(pair->first), "bench", lo);
        if (!served)
            fail(served.error().full_message());
        served_ = std::move(*served);
        int commands[2] = {-1, -1};
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, commands) != 0)
            fail("socketpair");
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        // dup2 clears close-on-exec on fds 3 and 4; the originals stay close-on-exec.
        posix_spawn_file_actions_adddup2(&actions, pair->second.native_handle(), 3);
        posix_spawn_file_actions_adddup2(&actions, commands[1], 4);
        const std::string path = worker_path();
        char* argv[] = {const_cast<char*>(path.c_str()), nullptr};
        const int rc = posix_spawn(&pid_, path.c_str(), &actions, nullptr, argv, environ);
        posix_spawn_file_actions_destroy(&actions);
        ::close(commands[1]);
        commands_ = commands[0];
        if (rc != 0)
            fail("cannot spawn " + path);
        if (test::read_answer(commands_) != "connected")
            fail("the worker did not connect");
    }
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    ~Worker()
    {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        ::close(commands_);
    }

    /// Faults the page at gpa in (untimed).
    void touch(std::uint64_t gpa)
    {
        if (ask("touch", gpa) != "ok")
            fail("the worker's access failed");
    }
    /// The worker's own time for one read at gpa.
    std::chrono::nanoseconds time(std::uint64_t gpa)
    {
        const std::string a = ask("time", gpa);
        if (a == "err")
            fail("the worker's access failed");
        return std::chrono::nanoseconds(std::stoll(a));
    }
    [[nodiscard]] bool cut_off() const { return served_.listener->cut_off(); }

private:
    /// Sends "cmd gpa" (hex), returns the worker's answer line.
    std::string ask(const char* cmd, std::uint64_t gpa)
    {
        char line[64];
        std::snprintf(line, sizeof line, "%s %llx", cmd, static_cast<unsigned long long>(gpa));
        std::optional<std::string> a = test::ask(commands_, line);
        if (!a)
            fail("the worker is gone");
        return *a;
    }

    ServedProcess<> served_;
    pid_t pid_ = -1;
    int commands_ = -1;
};

/// Takes the PAM segment away from every mapper that holds it and gives it back.
void toggle(MockGuestMemoryManager& m)
{
    auto control = m.ram_visibility_control();
    if (!control.set_ram_visibility(pam, RamVisibility::unmapped) ||
        !control.set_ram_visibility(pam, RamVisibility::read_write))
        fail("a visibility toggle failed");
}

void BM_RemoteFault_local(benchmark::State& state)
{
    MockGuestMemoryManager m = make_guest();
    auto memory = m.client().lazy_guest_memory();
    if (!memory)
        fail(memory.error().full_message());
    for (auto _ : state) {
        toggle(m);
        const auto start = std::chrono::steady_clock::now();
        auto v = memory->read_plain<std::uint64_t>(Gpa{pam.start()});
        const auto end = std::chrono::steady_clock::now();
        if (!v)
            fail("the access failed");
        benchmark::DoNotOptimize(*v);
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
    }
}

void BM_RemoteFault_process(benchmark::State& state)
{
    MockGuestMemoryManager m = make_guest();
    Worker w(m);
    for (auto _ : state) {
        toggle(m);
        state.SetIterationTime(std::chrono::duration<double>(w.time(pam.start())).count());
    }
}

void BM_RemoteInvalidate(benchmark::State& state)
{
    MockGuestMemoryManager m = make_guest();
    std::vector<std::unique_ptr<Worker>> workers;
    for (std::int64_t i = 0; i < state.range(0); ++i)
        workers.push_back(std::make_unique<Worker>(m));
    auto control = m.ram_visibility_control();
    for (auto _ : state) {
        for (auto& w : workers)
            w->touch(pam.start()); // every worker holds the piece
        const auto start = std::chrono::steady_clock::now();
        auto r = control.set_ram_visibility(pam, RamVisibility::unmapped);
        const auto end = std::chrono::steady_clock::now();
        if (!r || !control.set_ram_visibility(pam, RamVisibility::read_write))
            fail("a visibility toggle failed");
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
    }
    for (auto& w : workers)
        if (w->cut_off())
            state.SkipWithError("a worker was cut off");
}

} // namespace

BENCHMARK(BM_RemoteFault_local)->Name("BM_RemoteFault/local")->UseManualTime();
BENCHMARK(BM_RemoteFault_process)->Name("BM_RemoteFault/process")->UseManualTime();
BENCHMARK(BM_RemoteInvalidate)->Arg(0)->Arg(1)->Arg(2)->Arg(4)->UseManualTime();

BENCHMARK_MAIN();
