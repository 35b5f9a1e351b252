// The worker process of bench_remote: a remote mapper in a process of its own, as a device worker
// would be. bench_remote spawns it (posix_spawn of this program, found beside bench_remote) with
//   fd 3 = its end of the guest memory socket, fd 4 = a command socket,
// and sends one command per line on fd 4:
//   touch GPA  -> "ok" | "err"            (reads a u64 at GPA: faults the page in)
//   time GPA   -> "NANOSECONDS" | "err"   (times that one read, in this process)
//   exit, or EOF
#include <membacking/ipc/remote_mapper.hpp>

#include "line_protocol.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <unistd.h>

using namespace membacking;

namespace {

constexpr int socket_fd = 3;
constexpr int command_fd = 4;

bool read_line(std::string& line)
{
    return test::read_line(command_fd, line);
}

void say(const std::string& s)
{
    test::write_line(command_fd, s);
}

void quiet(const std::string&) {}

} // namespace

int main()
{
    ipc::RemoteMapperOptions options;
    options.log = &quiet;
    auto memory = ipc::connect_guest_memory(socket_fd, options);
    if (!memory) {
        std::fprintf(stderr, "bench_remote_worker: %s\n", memory.error().full_message().c_str());
        return 2;
    }
    say("connected");
    std::string line;
    while (read_line(line)) {
        char cmd[16] = {};
        std::uint64_t gpa = 0;
        if (std::sscanf(line.c_str(), "%15s %" SCNx64, cmd, &gpa) != 2)
            return 0;
        const bool timed = std::strcmp(cmd, "time") == 0;
        const auto start = std::chrono::steady_clock::now();
        auto v = memory->read_plain<std::uint64_t>(Gpa{gpa});
        const auto end = std::chrono::steady_clock::now();
        if (!v) {
            say("err");
            continue;
        }
        benchmark::DoNotOptimize(*v);
        say(timed ? std::to_string(
                        std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count())
                  : std::string("ok"));
    }
    return 0;
}
