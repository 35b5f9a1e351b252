// Guest memory in another process (ipc/remote_mapper.hpp, ipc/remote_listener.hpp): a child
// process (tests/ipc/helper.cpp, exec'd fresh) reads and writes through its own GuestMemory while
// this process, the manager, moves device memory, toggles RAM visibility and unmaps regions; a
// child killed or stopped in the middle; a manager killed under its client; private memory.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_listener.hpp>
#include <membacking/ipc/remote_mapper.hpp>
#include <membacking/membacking.hpp>

#include "line_protocol.hpp"
#include "migration_loop.hpp"
#include "place_device.hpp"
#include "platform.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <set>
#include <spawn.h>
#include <string>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

extern char** environ;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
using Manager = MockGuestMemoryManager;
using Clock = std::chrono::steady_clock;

void quiet(const std::string&) {}

/// The helper program, exec'd with fd 3 = its guest memory socket and fd 4 = a script socket.
class Helper {
public:
    Helper(const char* mode, int socket)
    {
        const char* path = std::getenv("MEMBACKING_IPC_HELPER");
        REQUIRE(path != nullptr);
        int script[2] = {-1, -1};
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, script) == 0);
        posix_spawn_file_actions_t actions;
        REQUIRE(posix_spawn_file_actions_init(&actions) == 0);
        // dup2 clears close-on-exec on the new numbers; the originals stay close-on-exec.
        REQUIRE(posix_spawn_file_actions_adddup2(&actions, socket, 3) == 0);
        REQUIRE(posix_spawn_file_actions_adddup2(&actions, script[1], 4) == 0);
        char* argv[] = {const_cast<char*>(path), const_cast<char*>(mode), nullptr};
        const int rc = posix_spawn(&pid_, path, &actions, nullptr, argv, environ);
        posix_spawn_file_actions_destroy(&actions);
        ::close(script[1]);
        script_ = script[0];
        REQUIRE(rc == 0);
    }
    Helper(const Helper&) = delete;
    Helper& operator=(const Helper&) = delete;
    ~Helper()
    {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
        ::close(script_);
    }

    /// Sends one command line, returns the answer line (fails the test after 10 s).
    std::string ask(const std::string& command)
    {
        std::optional<std::string> a = test::ask(script_, command, answer_timeout_ms);
        REQUIRE(a.has_value());
        return *a;
    }
    std::string answer()
    {
        std::optional<std::string> a = test::read_answer(script_, answer_timeout_ms);
        REQUIRE(a.has_value());
        return *a;
    }
    std::string read(std::uint64_t gpa) { return ask("read " + hex(gpa)); }
    std::string write(std::uint64_t gpa, std::uint64_t v)
    {
        return ask("write " + hex(gpa) + " " + hex(v));
    }
    void signal(int sig) const { REQUIRE(::kill(pid_, sig) == 0); }
    /// SIGSTOP, and waits until the process has really stopped (the signal is asynchronous).
    void stop() const
    {
        signal(SIGSTOP);
        int status = 0;
        REQUIRE(::waitpid(pid_, &status, WUNTRACED) == pid_);
        REQUIRE(WIFSTOPPED(status));
    }
    void resume() const
    {
        signal(SIGCONT);
        int status = 0;
        REQUIRE(::waitpid(pid_, &status, WCONTINUED) == pid_);
    }
    /// Kills and reaps the process.
    void kill()
    {
        signal(SIGKILL);
        REQUIRE(::waitpid(pid_, nullptr, 0) == pid_);
        pid_ = -1;
    }

    static std::string hex(std::uint64_t v)
    {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(v));
        return buf;
    }

private:
    static constexpr int answer_timeout_ms = 10'000;
    pid_t pid_ = -1;
    int script_ = -1;
};

std::string ok(std::uint64_t v)
{
    return "ok " + Helper::hex(v);
}
std::string err(errc e)
{
    return "err " + std::to_string(static_cast<int>(e));
}

Manager legacy_guest()
{
    return must(Manager::builder()
                    .x86_legacy_support(true)
                    .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                    .build(Length{16 * MiB}));
}

/// A manager serving a freshly exec'd client process.
struct Served {
    std::shared_ptr<ipc::RemoteListener<>> listener;
    std::unique_ptr<Helper> child;
};

/// `mode`: the helper's (client, tracked_client, bytemap_client); `expect`: its first line.
template <class M = Manager>
Served serve_child(M& m, std::chrono::milliseconds deadline = std::chrono::milliseconds(500),
                   const char* mode = "client", const std::string& expect = "connected")
{
    auto pair = must(ipc::Channel<>::pair());
    ipc::RemoteListenerOptions options;
    options.deadline = deadline;
    options.log = &quiet;
    auto served = must(m.client().serve_process(std::move(pair.first), "child", options));
    Served s{served.listener, std::make_unique<Helper>(mode, pair.second.native_handle())};
    // pair.second closes here: the child has its own copy.
    REQUIRE(s.child->answer() == expect);
    return s;
}

} // namespace

TEST_CASE("a child process sees the current topology and shares writes both ways")
{
    Manager m = legacy_guest();
    auto mem = m.guest_memory();
    auto s = serve_child(m);
    Helper& child = *s.child;

    // RAM: writes from either side are seen by the other.
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{0x10000}, 0xaaaa).has_value());
    CHECK(child.read(0x10000) == ok(0xaaaa));
    CHECK(child.write(0x20008, 0xbbbb) == "ok");
    CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{0x20008})) == 0xbbbb);
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{0x10000}, 0xcccc).has_value());
    CHECK(child.read(0x10000) == ok(0xcccc)); // the same page, mapped once: shared memory
    // Nothing beyond RAM; nothing outside the guest.
    CHECK(child.read(6 * MiB) == err(errc::unmapped));
    CHECK(child.read(16 * MiB) == err(errc::out_of_range));

    // Device memory moved around: the child never sees it where it no longer is.
    auto bar =
        test::place_device(m, "bar0", Gpa{8 * MiB}, Length{0x10000}, test::make_object(0x10000));
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{8 * MiB + 8}, 0x1234).has_value());
    for (int i = 0; i < 20; ++i) {
        const std::uint64_t here = (i % 2 == 0) ? 8 * MiB : 12 * MiB;
        const std::uint64_t there = (i % 2 == 0) ? 12 * MiB : 8 * MiB;
        CHECK(child.read(here + 8) == ok(0x1234 + static_cast<std::uint64_t>(i)));
        CHECK(child.write(here + 8, 0x1235 + static_cast<std::uint64_t>(i)) == "ok");
        must(bar.map_to_guest(Gpa{there}, Protection::read_write));
        // The child had `here` mapped; the move returned only after it dropped it.
        CHECK(child.read(here + 8) == err(errc::unmapped));
        CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{there + 8})) ==
              0x1235 + static_cast<std::uint64_t>(i));
    }
    // Read-only placement: reads work, writes are refused (by the manager's answer).
    must(bar.map_to_guest(Gpa{12 * MiB}, Protection::read_only));
    CHECK(child.read(12 * MiB + 8) == ok(0x1234 + 20));
    CHECK(child.write(12 * MiB + 8, 1) == err(errc::read_only));
    CHECK(child.write(12 * MiB + 0x2000, 1) == err(errc::read_only)); // a page not faulted yet
    must(bar.unmap_from_guest());
    CHECK(child.read(12 * MiB + 8) == err(errc::unmapped));

    // RAM visibility toggled under the child.
    auto control = m.ram_visibility_control();
    const MemoryRange pam = range(0xc0000, 0xc4000);
    CHECK(child.write(0xc0000, 0x77) == "ok");
    must(control.set_ram_visibility(pam, RamVisibility::unmapped));
    CHECK(child.read(0xc0000) == err(errc::unmapped));
    must(control.set_ram_visibility(pam, RamVisibility::read_only));
    CHECK(child.read(0xc0000) == ok(0x77));
    CHECK(child.write(0xc0000, 0x78) == err(errc::read_only));
    must(control.set_ram_visibility(pam, RamVisibility::read_write));
    CHECK(child.write(0xc0000, 0x79) == "ok");
    CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{0xc0000})) == 0x79);

    CHECK_FALSE(s.listener->cut_off());
    CHECK(s.listener->faults_served() > 20);
}

TEST_CASE("a child killed in the middle of an operation: the manager goes on")
{
    Manager m = legacy_guest();
    auto mem = m.guest_memory();
    // A long deadline: the operation must end because the child died, not because time ran out.
    auto s = serve_child(m, std::chrono::seconds(20));
    auto control = m.ram_visibility_control();
    const MemoryRange pam = range(0xc0000, 0xc4000);
    CHECK(s.child->read(0xc0000) == ok(0));
    // Stopped, the child cannot acknowledge: the toggle below waits for it until it is killed.
    s.child->stop();
    const auto start = Clock::now();
    std::thread killer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        s.child->kill();
    });
    must(control.set_ram_visibility(pam, RamVisibility::unmapped));
    killer.join();
    CHECK(Clock::now() - start < std::chrono::seconds(10));
    CHECK(s.listener->cut_off());
    // The manager keeps working: control calls, its own accesses, new clients.
    must(control.set_ram_visibility(pam, RamVisibility::read_write));
    REQUIRE(mem.write_plain<std::uint64_t>(Gpa{0xc0000}, 5).has_value());
    auto again = serve_child(m);
    CHECK(again.child->read(0xc0000) == ok(5));
}

TEST_CASE("a child that stops reading its socket is cut off within the deadline")
{
    Manager m = legacy_guest();
    const auto deadline = std::chrono::milliseconds(300);
    auto s = serve_child(m, deadline);
    auto control = m.ram_visibility_control();
    const MemoryRange pam = range(0xc0000, 0xc4000);
    CHECK(s.child->write(0xc0000, 0x42) == "ok");
    CHECK(s.child->read(0x1000) == ok(0));
    s.child->stop();
    const auto start = Clock::now();
    must(control.set_ram_visibility(pam, RamVisibility::unmapped));
    const auto took = Clock::now() - start;
    CHECK(took >= deadline);
    CHECK(took < deadline + std::chrono::seconds(2));
    CHECK(s.listener->cut_off());
    // The next control call does not wait for it at all.
    const auto start2 = Clock::now();
    must(control.set_ram_visibility(pam, RamVisibility::read_write));
    CHECK(Clock::now() - start2 < deadline);
    // Resumed, the child finds its socket shut down and has dropped every mapping: its accesses
    // fail, even to a page it had mapped and the manager never touched.
    s.child->resume();
    const std::string r = s.child->ask("read_until_error 1000 2000");
    CHECK(r.rfind(err(errc::unmapped) + " ", 0) == 0);
    CHECK(s.child->read(0xc0000) == err(errc::unmapped));
}

TEST_CASE("clients that stop answering together cost one deadline, not one each")
{
    // The step is sent to every client before any is awaited (AwaitsTableChanges), so the
    // deadlines run at the same time. In turn, four stopped clients would take 4 x 700 ms.
    Manager m = legacy_guest();
    const auto deadline = std::chrono::milliseconds(700);
    constexpr int stopped = 4;
    std::vector<Served> clients;
    for (int i = 0; i < stopped + 1; ++i)
        clients.push_back(serve_child(m, deadline));
    auto control = m.ram_visibility_control();
    const MemoryRange pam = range(0xc0000, 0xc4000);
    for (Served& c : clients)
        REQUIRE(c.child->read(0xc0000) == ok(0));
    for (int i = 0; i < stopped; ++i)
        clients[static_cast<std::size_t>(i)].child->stop();
    const auto start = Clock::now();
    must(control.set_ram_visibility(pam, RamVisibility::unmapped));
    const auto took = Clock::now() - start;
    CHECK(took >= deadline);
    CHECK(took < stopped * deadline);
    for (int i = 0; i < stopped; ++i)
        CHECK(clients[static_cast<std::size_t>(i)].listener->cut_off());
    // The one that answered was awaited too, and is still served.
    Served& live = clients.back();
    CHECK_FALSE(live.listener->cut_off());
    CHECK(live.child->read(0xc0000) == err(errc::unmapped));
    must(control.set_ram_visibility(pam, RamVisibility::read_write));
    CHECK(live.child->read(0xc0000) == ok(0));
}

TEST_CASE("a manager killed under its client: the client's accesses fail within 2 s")
{
    auto pair = must(ipc::Channel<>::pair());
    Helper manager("manager", pair.first.native_handle());
    {
        const ipc::Channel<> ours = std::move(pair.first); // only the helper keeps that end
    }
    REQUIRE(manager.answer() == "ready");
    ipc::RemoteMapperOptions options;
    options.log = &quiet;
    auto memory = must(ipc::connect_guest_memory(pair.second.release(), options));
    CHECK(test::value_of(memory.read_plain<std::uint64_t>(Gpa{0x1000})) == 0x600d);

    manager.kill();
    // A page it had mapped: fails as soon as the reader sees EOF.
    const auto start = Clock::now();
    AccessResult<std::uint64_t> r = memory.read_plain<std::uint64_t>(Gpa{0x1000});
    while (r.has_value() && Clock::now() - start < std::chrono::seconds(2)) {
        std::this_thread::yield();
        r = memory.read_plain<std::uint64_t>(Gpa{0x1000});
    }
    CHECK(test::error_of(r) == errc::unmapped);
    CHECK(Clock::now() - start < std::chrono::seconds(2));
    // A page it never mapped: the fault path does not wait for a dead manager.
    const auto start2 = Clock::now();
    CHECK(test::error_of(memory.read_plain<std::uint64_t>(Gpa{0x2000})) == errc::unmapped);
    CHECK(Clock::now() - start2 < std::chrono::seconds(2));
    CHECK_FALSE(memory.owner()->connected());
}

TEST_CASE("a manager that stops answering faults: the client's fault fails after its timeout")
{
    // The "manager" end is a bare socket nobody serves after hello.
    auto pair = must(ipc::Channel<>::pair());
    REQUIRE(pair.first.send({0, ipc::Hello{16 * MiB}}));
    ipc::RemoteMapperOptions options;
    options.log = &quiet;
    options.fault_timeout = std::chrono::milliseconds(200);
    auto memory = must(ipc::connect_guest_memory(pair.second.release(), options));
    const auto start = Clock::now();
    CHECK(test::error_of(memory.read_plain<std::uint64_t>(Gpa{0x1000})) == errc::unmapped);
    const auto took = Clock::now() - start;
    CHECK(took >= std::chrono::milliseconds(200));
    CHECK(took < std::chrono::seconds(2));
    CHECK_FALSE(memory.owner()->connected());
}

TEST_CASE("private memory cannot be shared with another process")
{
    Manager m = must(Manager::builder()
                         .add_backing(RamBackingRequest({range(0, 4 * MiB)}).private_memory(true))
                         .build(Length{16 * MiB}));
    auto pair = must(ipc::Channel<>::pair());
    ipc::RemoteListenerOptions options;
    options.log = &quiet;
    auto served = m.client().serve_process(std::move(pair.first), "child", options);
    REQUIRE_FALSE(served.has_value());
    CHECK(served.error().code() == errc::unsupported);
    CHECK(served.error().full_message().find("0x0-0x400000") != std::string::npos);
}

TEST_CASE("a client's listener refuses a change that would add private memory, applying none")
{
    // Through the public API private RAM is mapped at build, where serve_process already refuses
    // it; the listener still refuses any change that adds private memory, so that a control call
    // that would add some is rolled back while a client is connected (listener refusal).
    auto pair = must(ipc::Channel<>::pair());
    ipc::RemoteListenerOptions lo;
    lo.log = &quiet;
    auto listener =
        must(ipc::RemoteListener<>::create(std::move(pair.first), 16 * MiB, "child", lo));
    const MemoryPiece shared{range(0x10000, 0x14000),
                             test::make_object(0x4000),
                             Offset{0},
                             true,
                             MappingType::Ram,
                             RegionId{1}};
    const MemoryPiece private_piece{range(0x20000, 0x24000), Mappable{}, Offset{0}, true,
                                    MappingType::Ram,        RegionId{2}};
    auto r = listener->apply({MemoryTableChange::Kind::update, {}, {shared, private_piece}});
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::unsupported);
    CHECK(r.error().full_message().find("0x20000-0x24000") != std::string::npos);
    CHECK_FALSE(listener->cut_off());

    // None of it was applied: the shared piece of the refused change is not served.
    ipc::RemoteMapperOptions mo;
    mo.log = &quiet;
    auto memory = must(ipc::connect_guest_memory(pair.second.release(), mo));
    auto before = memory.read_plain<std::uint64_t>(Gpa{0x10000});
    REQUIRE_FALSE(before);
    CHECK(before.error().code == errc::unmapped);
    // The same change without the private piece is taken, and served.
    must(listener->apply({MemoryTableChange::Kind::update, {}, {shared}}));
    must(listener->await_applied());
    CHECK(memory.read_plain<std::uint64_t>(Gpa{0x10000}).has_value());
    CHECK_FALSE(listener->cut_off());
}

TEST_CASE("a hostile client is cut off; it never obtains memory the manager does not share")
{
    Manager m = legacy_guest();
    auto pair = must(ipc::Channel<>::pair());
    ipc::RemoteListenerOptions options;
    options.log = &quiet;
    auto served = must(m.client().serve_process(std::move(pair.first), "hostile", options));
    ipc::Channel<> client = std::move(pair.second);
    const ipc::DecodeContext ctx{ipc::Receiver::client, 0};
    auto hello = must(client.receive(1000, ctx));
    REQUIRE(hello.status == ipc::Incoming<>::Status::message);
    const ipc::DecodeContext live{ipc::Receiver::client, 16 * MiB};
    // A gap: an error reply, no fd.
    REQUIRE(client.send({1, ipc::FaultRequest{6 * MiB, false}}));
    auto gap = must(client.receive(1000, live));
    REQUIRE(gap.status == ipc::Incoming<>::Status::message);
    CHECK(std::get<ipc::FaultReply>(gap.message.body).status ==
          static_cast<std::uint32_t>(errc::unmapped));
    CHECK_FALSE(gap.fd.valid());
    // Read-only memory comes with a read-only fd: the client's kernel refuses a writable map.
    must(m.ram_visibility_control().set_ram_visibility(range(0xc0000, 0xc4000),
                                                       RamVisibility::read_only));
    REQUIRE(client.send({2, ipc::FaultRequest{0xc0000, false}}));
    auto ro = must(client.receive(1000, live));
    REQUIRE(ro.fd.valid());
    const auto& piece = std::get<ipc::FaultReply>(ro.message.body);
    CHECK_FALSE(piece.writable);
    void* p = ::mmap(nullptr, piece.length, PROT_READ | PROT_WRITE, MAP_SHARED, ro.fd.get(),
                     static_cast<off_t>(piece.object_offset));
    CHECK(p == MAP_FAILED);
    CHECK(errno == EACCES);
    // A message a client may not send (a reply): cut off.
    REQUIRE(client.send({3, ipc::Invalidate{0, 0x1000}}));
    auto eof = must(client.receive(2000, live));
    CHECK(eof.status == ipc::Incoming<>::Status::closed);
    CHECK(served.listener->cut_off());
    // The manager goes on.
    must(m.ram_visibility_control().set_ram_visibility(range(0xc0000, 0xc4000),
                                                       RamVisibility::read_write));
}

// ---- dirty tracking: a worker process's writes are marked in the manager's bitmap ----

namespace {

using Tracked = TrackedMockGuestMemoryManager;
using ByteMapTracked = ByteMapTrackedMockGuestMemoryManager;

template <class M = Tracked>
M tracked_guest()
{
    return must(
        M::builder().add_backing(RamBackingRequest({range(0, 8 * MiB)})).build(Length{16 * MiB}));
}

/// The child writes a u64 into each of `pages` (random RAM pages, random order), once: the first
/// half while nothing harvests, then one take, which must be exactly that half's pages; the
/// second half while this thread harvests in a loop (how many of those takes overlap the
/// child's writes is up to the scheduler: the in-process harvest tests in tests/dirty pin that
/// race down), then one last take. Returns the union of the pages taken.
template <class M>
std::set<std::uint64_t> harvest_while_child_writes(M& m, Helper& child,
                                                   const std::vector<std::uint64_t>& pages)
{
    auto write_list = [&](std::size_t from, std::size_t to) {
        std::string list;
        for (std::size_t i = from; i < to; ++i) {
            if (!list.empty())
                list += ",";
            list += Helper::hex(pages[i]);
        }
        return child.ask("write_pages " + list);
    };
    std::set<std::uint64_t> taken;
    auto take = [&] {
        std::vector<DirtyRun> runs;
        must(m.take_dirty_runs(range(0, 16 * MiB), runs));
        std::set<std::uint64_t> this_take;
        for (const DirtyRun& r : runs)
            for (std::uint64_t off = 0; off < r.length.value(); off += page_size)
                this_take.insert(r.gpa.value() + off);
        taken.insert(this_take.begin(), this_take.end());
        return this_take;
    };
    const std::size_t half = pages.size() / 2;
    CHECK(write_list(0, half) == "ok " + std::to_string(half));
    std::set<std::uint64_t> first_half;
    for (std::size_t i = 0; i < half; ++i)
        first_half.insert(pages[i] & ~(page_size - 1));
    CHECK(take() == first_half); // the worker's marks are in the manager's bitmap, no neighbours

    std::atomic<bool> done{false};
    std::thread harvester([&] {
        while (!done.load())
            take();
    });
    std::string answer = write_list(half, pages.size());
    done.store(true);
    harvester.join();
    take(); // the child's writes have all returned: this pass takes whatever is left
    CHECK(answer == "ok " + std::to_string(pages.size() - half));
    return taken;
}

std::vector<std::uint64_t> random_pages(std::uint64_t seed, std::size_t count)
{
    std::vector<std::uint64_t> all;
    for (std::uint64_t gpa = 0; gpa < 8 * MiB; gpa += page_size)
        all.push_back(gpa);
    std::mt19937_64 rng(seed);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(count);
    return all;
}

} // namespace

namespace {
/// The worker tests of either layout: the manager type and the helper mode of its worker.
struct BitMapWorker {
    using Manager = Tracked;
    static constexpr const char* mode = "tracked_client";
};
struct ByteMapWorker {
    using Manager = ByteMapTracked;
    static constexpr const char* mode = "bytemap_client";
};
} // namespace

TEST_CASE_TEMPLATE("a worker process's writes are marked (either layout): exactly its pages, "
                   "while the manager harvests",
                   W, BitMapWorker, ByteMapWorker)
{
    typename W::Manager m = tracked_guest<typename W::Manager>();
    // Each page gets its own offset inside the page (a u64, never straddling two pages): a mark
    // must name the page, not its word or chunk.
    std::vector<std::uint64_t> pages = random_pages(5, 700);
    for (std::size_t i = 0; i < pages.size(); ++i)
        pages[i] += (i * 8) % page_size;
    std::set<std::uint64_t> expected;
    for (std::uint64_t p : pages)
        expected.insert(p & ~(page_size - 1));

    SUBCASE("connected before tracking starts")
    {
        auto s = serve_child(m, std::chrono::milliseconds(500), W::mode);
        CHECK(s.child->write(0x3000, 1) == "ok"); // before start: cleared by start
        must(m.start_dirty_tracking());
        CHECK(harvest_while_child_writes(m, *s.child, pages) == expected);
    }
    SUBCASE("connected while tracking is on")
    {
        must(m.start_dirty_tracking());
        auto s = serve_child(m, std::chrono::milliseconds(500), W::mode);
        CHECK(harvest_while_child_writes(m, *s.child, pages) == expected);
    }
    SUBCASE("tracking stopped and started again: the worker keeps marking")
    {
        auto s = serve_child(m, std::chrono::milliseconds(500), W::mode);
        must(m.start_dirty_tracking());
        CHECK(s.child->write(0x3000, 1) == "ok");
        must(m.stop_dirty_tracking());
        must(m.start_dirty_tracking());
        CHECK(harvest_while_child_writes(m, *s.child, pages) == expected);
    }
}

TEST_CASE("tracking must match: an untracked worker of a tracked manager is refused, and the "
          "reverse")
{
    Tracked tracked = tracked_guest();
    auto a = serve_child(tracked, std::chrono::milliseconds(500), "client",
                         "refused " + std::to_string(static_cast<int>(errc::unsupported)));
    Manager untracked = legacy_guest();
    auto b = serve_child(untracked, std::chrono::milliseconds(500), "tracked_client",
                         "refused " + std::to_string(static_cast<int>(errc::unsupported)));
    ByteMapTracked bytes = tracked_guest<ByteMapTracked>();
    auto c = serve_child(bytes, std::chrono::milliseconds(500), "client",
                         "refused " + std::to_string(static_cast<int>(errc::unsupported)));
    auto d = serve_child(untracked, std::chrono::milliseconds(500), "bytemap_client",
                         "refused " + std::to_string(static_cast<int>(errc::unsupported)));
}

TEST_CASE("the dirty map's layout must match: a bit-map worker of a byte-map manager is refused, "
          "and the reverse")
{
    ByteMapTracked bytes = tracked_guest<ByteMapTracked>();
    auto a = serve_child(bytes, std::chrono::milliseconds(500), "tracked_client",
                         "refused " + std::to_string(static_cast<int>(errc::unsupported)));
    Tracked bits = tracked_guest();
    auto b = serve_child(bits, std::chrono::milliseconds(500), "bytemap_client",
                         "refused " + std::to_string(static_cast<int>(errc::unsupported)));
    // Each manager still serves the worker of its own layout.
    auto c = serve_child(bytes, std::chrono::milliseconds(500), "bytemap_client");
    auto d = serve_child(bits, std::chrono::milliseconds(500), "tracked_client");
}

TEST_CASE("migration without a hypervisor, with a worker process writing too: byte for byte")
{
    using namespace membacking::test::migration;
    using TrackedSide = Side<Tracked>;
    TrackedSide src = TrackedSide::make();
    TrackedSide dst = TrackedSide::make();
    auto s = serve_child(src.m, std::chrono::milliseconds(2000), "tracked_client");

    must(src.m.start_dirty_tracking());
    copy_runs({{Gpa{0}, Length{space}}}, src, dst); // pass 0: everything

    std::atomic<bool> stop{false};
    std::vector<std::thread> writers = start_vmm_writers(src.mem, stop);
    REQUIRE(s.child->ask("scribble 7") == "ok");
    const PassesDone done = run_passes(src, dst, 40);
    stop.store(true);
    for (auto& w : writers)
        w.join();
    const std::string scribbled = s.child->ask("scribble_stop"); // every write has returned
    REQUIRE(scribbled.rfind("ok ", 0) == 0);
    CHECK(std::stoull(scribbled.substr(3)) > 0);
    CHECK_FALSE(s.listener->cut_off());
    last_pass(src, dst, done);

    std::uint64_t compared = 0;
    const std::uint64_t differing = differing_pages(src, dst, compared);
    CHECK(compared == (ram_end + bar_size) / page);
    CHECK(differing == 0);
}
