// Guest memory served to another mapper over a socket (ipc/), each beside its baseline:
//
// BM_RemoteFault/remote: the latency of a remote mapper's first access to a page it has not
//   mapped: fault, fault_request over the socket, the manager's answer with the fd, the mapping,
//   the retry. Each iteration first takes the page away from the mapper (a RAM visibility toggle
//   that invalidates it, not timed), then times one 8-byte read (manual time).
// BM_RemoteFault/local: the same for a lazy mapper of the manager's own process
//   (client().lazy_guest_memory()): the baseline.
// BM_RemoteInvalidate/<n>: one control call that removes a piece every one of n connected remote
//   mappers holds (they fault it in again between iterations, not timed). n = 0 is the baseline:
//   the extra cost per client is (t(n) - t(0)) / n.
//
// The remote mappers here live in the benchmark's own process (their reader threads and the
// manager's server threads talk over a real SOCK_SEQPACKET socketpair, with SCM_RIGHTS): every
// system call of the cross-process path is made; what a separate process adds is the switch
// between address spaces on each wake-up.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_listener.hpp>
#include <membacking/ipc/remote_mapper.hpp>
#include <membacking/membacking.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

using namespace membacking;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
const MemoryRange pam = MemoryRange::valid_or_abort(0xc0000, 0xc4000);

void quiet(const std::string&) {}

MockGuestMemoryManager make_guest()
{
    auto m = MockGuestMemoryManager::builder()
                 .x86_legacy_support(true)
                 .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, 4 * MiB)}))
                 .build(Length{16 * MiB});
    if (!m)
        std::abort();
    return std::move(*m);
}

using RemoteMemory = GuestMemory<ipc::RemoteMapper<>>;

struct Remote {
    ServedProcess<> served;
    RemoteMemory memory;
};

Remote connect(MockGuestMemoryManager& m)
{
    auto pair = ipc::Channel<>::pair();
    if (!pair)
        std::abort();
    ipc::RemoteListenerOptions lo;
    lo.log = &quiet;
    auto served = m.client().serve_process(std::move(pair->first), "bench", lo);
    ipc::RemoteMapperOptions mo;
    mo.log = &quiet;
    auto memory = ipc::connect_guest_memory(pair->second.release(), mo);
    if (!served || !memory)
        std::abort();
    return {std::move(*served), std::move(*memory)};
}

/// Takes the PAM segment away from every mapper that holds it and gives it back.
void toggle(MockGuestMemoryManager& m)
{
    auto control = m.ram_visibility_control();
    if (!control.set_ram_visibility(pam, RamVisibility::unmapped) ||
        !control.set_ram_visibility(pam, RamVisibility::read_write))
        std::abort();
}

template <class Memory>
void first_access(benchmark::State& state, MockGuestMemoryManager& m, const Memory& memory)
{
    for (auto _ : state) {
        toggle(m);
        const auto start = std::chrono::steady_clock::now();
        auto v = memory.template read_plain<std::uint64_t>(Gpa{pam.start()});
        const auto end = std::chrono::steady_clock::now();
        if (!v) {
            state.SkipWithError("the access failed");
            return;
        }
        benchmark::DoNotOptimize(*v);
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
    }
}

void BM_RemoteFault_local(benchmark::State& state)
{
    MockGuestMemoryManager m = make_guest();
    auto memory = m.client().lazy_guest_memory();
    if (!memory)
        std::abort();
    first_access(state, m, *memory);
}

void BM_RemoteFault_remote(benchmark::State& state)
{
    MockGuestMemoryManager m = make_guest();
    Remote r = connect(m);
    first_access(state, m, r.memory);
}

void BM_RemoteInvalidate(benchmark::State& state)
{
    MockGuestMemoryManager m = make_guest();
    std::vector<Remote> clients;
    for (std::int64_t i = 0; i < state.range(0); ++i)
        clients.push_back(connect(m));
    auto control = m.ram_visibility_control();
    for (auto _ : state) {
        for (const Remote& c : clients)
            if (!c.memory.read_plain<std::uint64_t>(Gpa{pam.start()}))
                std::abort(); // every client holds the piece
        const auto start = std::chrono::steady_clock::now();
        auto r = control.set_ram_visibility(pam, RamVisibility::unmapped);
        const auto end = std::chrono::steady_clock::now();
        if (!r || !control.set_ram_visibility(pam, RamVisibility::read_write))
            std::abort();
        state.SetIterationTime(std::chrono::duration<double>(end - start).count());
    }
    for (const Remote& c : clients)
        if (c.served.listener->cut_off())
            state.SkipWithError("a client was cut off");
}

} // namespace

BENCHMARK(BM_RemoteFault_local)->Name("BM_RemoteFault/local")->UseManualTime();
BENCHMARK(BM_RemoteFault_remote)->Name("BM_RemoteFault/remote")->UseManualTime();
BENCHMARK(BM_RemoteInvalidate)->Arg(0)->Arg(1)->Arg(2)->Arg(4)->UseManualTime();

BENCHMARK_MAIN();
