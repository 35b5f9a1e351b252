// The other process of the cross-process tests (tests/ipc/remote.cpp), exec'd fresh (never a
// fork that keeps running the test's code: TSan and threads after fork do not mix).
//
//   ipc_helper client   fd 3 = its end of the guest memory socket, fd 4 = the script socket.
//       Connects a RemoteMapper and answers one command per line on fd 4:
//         read GPA            -> "ok VALUE" | "err CODE"     (a u64 at GPA, hex)
//         write GPA VALUE     -> "ok" | "err CODE"
//         read_until_error GPA MS -> "err CODE MS_TAKEN" | "ok VALUE" (reads until an error, at
//                                most MS milliseconds)
//         write_pages GPA,GPA,...  -> "ok COUNT" | "err CODE"  (a u64 at each GPA, in order, once)
//         scribble SEED       -> "ok"   (a thread starts writing random bytes anywhere in the guest
//                                through every write path, errors ignored, until scribble_stop)
//         scribble_stop       -> "ok WRITES"   (the thread has stopped: every write has returned)
//         exit
//       Says "connected", or "refused CODE" if connecting failed.
//   ipc_helper tracked_client   the same, connected with connect_guest_memory<DirtyTracking>
//       (a manager that tracks dirty pages in a bit map).
//   ipc_helper bytemap_client   the same, connected with
//       connect_guest_memory<ByteMapDirtyTracking> (a manager with a byte map).
//   ipc_helper manager  fd 3 = the manager's end of the guest memory socket, fd 4 = script.
//       Builds a 16 MiB guest (shared RAM 0..4 MiB), writes 0x600d at GPA 0x1000, serves fd 3,
//       says "ready" on fd 4, then waits to be killed.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_mapper.hpp>
#include <membacking/membacking.hpp>

#include "line_protocol.hpp"
#include "random_writes.hpp"

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace membacking;

namespace {

constexpr int socket_fd = 3;
constexpr int script_fd = 4;

std::string read_line()
{
    std::string line;
    return test::read_line(script_fd, line) ? line : "exit";
}

void say(const std::string& s)
{
    test::write_line(script_fd, s);
}

std::string code_of(const AccessError& e)
{
    return std::to_string(static_cast<int>(e.code));
}

void quiet(const std::string&) {}

/// Writes random bytes anywhere in [0, space) through copies, fills, plain stores and atomics
/// until `stop`; returns the writes made (successful or not).
template <class Memory>
std::uint64_t scribble(const Memory& mem, std::uint64_t seed, std::uint64_t space,
                       const std::atomic<bool>& stop)
{
    std::mt19937_64 rng(seed);
    std::vector<std::uint8_t> chunk(3 * 4096);
    std::uint64_t writes = 0;
    // At least one write, however soon the stop comes: the test asserts that writes were made.
    do {
        const test::RandomWrite w = test::draw_random_write(rng, space, chunk.size());
        test::write_randomly(mem, rng, std::span(chunk), w,
                             static_cast<unsigned>(rng() % test::random_write_paths));
        ++writes;
    } while (!stop.load(std::memory_order_relaxed));
    return writes;
}

template <class Tracking>
int client()
{
    ipc::RemoteMapperOptions options;
    options.log = &quiet;
    auto memory = ipc::connect_guest_memory<Tracking>(socket_fd, options);
    if (!memory) {
        std::fprintf(stderr, "helper: %s\n", memory.error().full_message().c_str());
        say("refused " + std::to_string(memory.error().code().value()));
        return 2;
    }
    say("connected");
    std::atomic<bool> stop_scribbling{false};
    std::atomic<std::uint64_t> scribbled{0};
    std::thread scribbler;
    for (;;) {
        const std::string line = read_line();
        char cmd[32] = {};
        std::uint64_t gpa = 0;
        std::uint64_t value = 0;
        const int n = std::sscanf(line.c_str(), "%31s %" SCNx64 " %" SCNx64, cmd, &gpa, &value);
        if (n < 1 || std::strcmp(cmd, "exit") == 0) {
            stop_scribbling.store(true);
            if (scribbler.joinable())
                scribbler.join();
            return 0;
        }
        if (std::strcmp(cmd, "read") == 0) {
            auto r = memory->template read_plain<std::uint64_t>(Gpa{gpa});
            char buf[64];
            std::snprintf(buf, sizeof buf, "ok %" PRIx64, r ? *r : 0);
            say(r ? buf : "err " + code_of(r.error()));
        } else if (std::strcmp(cmd, "write") == 0) {
            auto r = memory->template write_plain<std::uint64_t>(Gpa{gpa}, value);
            say(r ? "ok" : "err " + code_of(r.error()));
        } else if (std::strcmp(cmd, "read_until_error") == 0) {
            const auto start = std::chrono::steady_clock::now();
            const auto limit = std::chrono::milliseconds(value);
            for (;;) {
                auto r = memory->template read_plain<std::uint64_t>(Gpa{gpa});
                const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::steady_clock::now() - start);
                if (!r) {
                    say("err " + code_of(r.error()) + " " + std::to_string(took.count()));
                    break;
                }
                if (took > limit) {
                    say("ok " + std::to_string(*r));
                    break;
                }
                std::this_thread::yield();
            }
        } else if (std::strcmp(cmd, "write_pages") == 0) {
            // The list follows the command: GPAs in hex, comma-separated.
            const char* p = line.c_str() + std::strlen("write_pages");
            std::uint64_t count = 0;
            std::string failed;
            while (*p != '\0' && failed.empty()) {
                char* end = nullptr;
                const std::uint64_t at = std::strtoull(p, &end, 16);
                if (end == p)
                    break;
                if (auto r = memory->template write_plain<std::uint64_t>(Gpa{at}, at ^ 0x5a5a); !r)
                    failed = "err " + code_of(r.error());
                ++count;
                p = *end == ',' ? end + 1 : end;
            }
            say(failed.empty() ? "ok " + std::to_string(count) : failed);
        } else if (std::strcmp(cmd, "scribble") == 0) {
            stop_scribbling.store(false);
            scribbler = std::thread([&, seed = gpa, space = memory->size().value()] {
                scribbled.store(scribble(*memory, seed, space, stop_scribbling));
            });
            say("ok");
        } else if (std::strcmp(cmd, "scribble_stop") == 0) {
            stop_scribbling.store(true);
            if (scribbler.joinable())
                scribbler.join();
            say("ok " + std::to_string(scribbled.load()));
        } else
            say("bad command");
    }
}

int manager()
{
    constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
    auto m = MockGuestMemoryManager::builder()
                 .add_backing(RamBackingRequest({MemoryRange::valid_or_abort(0, 4 * MiB)}))
                 .build(Length{16 * MiB});
    if (!m)
        return 2;
    auto mem = m->guest_memory();
    if (!mem.write_plain<std::uint64_t>(Gpa{0x1000}, 0x600d))
        return 2;
    ipc::RemoteListenerOptions options;
    options.log = &quiet;
    auto served = m->client().serve_process(ipc::Channel<>(socket_fd), "test-client", options);
    if (!served) {
        std::fprintf(stderr, "helper: %s\n", served.error().full_message().c_str());
        return 2;
    }
    say("ready");
    for (;;)
        ::pause();
}

} // namespace

int main(int argc, char** argv)
{
    if (argc == 2 && std::strcmp(argv[1], "client") == 0)
        return client<NoDirtyTracking>();
    if (argc == 2 && std::strcmp(argv[1], "tracked_client") == 0)
        return client<DirtyTracking>();
    if (argc == 2 && std::strcmp(argv[1], "bytemap_client") == 0)
        return client<ByteMapDirtyTracking>();
    if (argc == 2 && std::strcmp(argv[1], "manager") == 0)
        return manager();
    std::fprintf(stderr, "usage: ipc_helper client|tracked_client|bytemap_client|manager\n");
    return 2;
}
