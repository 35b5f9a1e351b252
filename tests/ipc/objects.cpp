// What a worker process may obtain (manager/detail/shared_objects.hpp): an fd names its whole
// object and the worker keeps it, so the manager shares an object only if every byte of it is
// guest memory and no mapping places part of it read-only and part writable. The worker here is
// this test speaking the protocol on the worker's end of the socket, as a hostile worker would:
// the fds it receives are new fds of the objects (SCM_RIGHTS), exactly what another process gets.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_listener.hpp>
#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t bar_gpa = 8 * MiB;
using Manager = MockGuestMemoryManager;

void quiet(const std::string&) {}

Manager guest()
{
    return must(Manager::builder()
                    .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                    .build(Length{16 * MiB}));
}

bool contains(const std::string& text, const std::string& part)
{
    return text.find(part) != std::string::npos;
}

/// The worker's end of a served socket, driven by hand: what a hostile worker can do.
struct Worker {
    ipc::Channel<> channel;
    ServedProcess<> served;
    std::uint32_t seq = 0;

    static Result<Worker> connect(const Manager& m)
    {
        auto pair = must(ipc::Channel<>::pair());
        ipc::RemoteListenerOptions options;
        options.log = &quiet;
        auto served = m.client().serve_process(std::move(pair.first), "worker", options);
        if (!served)
            return std::move(served).error();
        Worker w{std::move(pair.second), std::move(*served)};
        auto hello = must(w.channel.receive(2000, {ipc::Receiver::client, 0}));
        REQUIRE(hello.status == ipc::Incoming<>::Status::message);
        return w;
    }

    /// Asks for the piece holding gpa; the reply and its fd.
    ipc::Incoming<> fault(std::uint64_t gpa, bool write = false)
    {
        REQUIRE(channel.send({++seq, ipc::FaultRequest{gpa, write}}));
        auto in = must(channel.receive(2000, {ipc::Receiver::client, 16 * MiB}));
        REQUIRE(in.status == ipc::Incoming<>::Status::message);
        return in;
    }
};

/// A device region of `size` bytes holding `mappings`, placed at bar_gpa read-write.
DeviceRegion<Manager::Core> bar_with(const Manager& m, std::uint64_t size,
                                     const std::vector<DeviceMapping>& mappings)
{
    auto bar = must(m.device_memory_mapper().new_region("bar", Length{size}));
    for (const DeviceMapping& d : mappings)
        must(bar.map(d));
    return bar;
}

DeviceMapping piece_of(const Mappable& object, std::uint64_t offset, std::uint64_t object_offset,
                       std::uint64_t length, Protection protection = Protection::read_write)
{
    return {.offset = Offset{offset},
            .length = Length{length},
            .object = object,
            .object_offset = Offset{object_offset},
            .protection = protection};
}

/// Everything a refused control call must leave unchanged.
struct State {
    std::vector<MemoryPiece> table;
    std::string map;

    explicit State(const Manager& m) : table(m.memory_table()), map(m.memory_map().to_text()) {}
    bool operator==(const State&) const = default;
};

} // namespace

TEST_CASE("serve_process refuses an object with bytes in no mapping, naming the object and them")
{
    Manager m = guest();
    // 64 KiB object, only its first half in the guest: the rest could be the VMM's own data.
    auto tail = test::make_memfd(0x10000);
    auto bar = bar_with(m, 0x8000, {piece_of(tail, 0, 0, 0x8000)});
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    auto refused = Worker::connect(m);
    REQUIRE_FALSE(refused);
    const std::string why = refused.error().full_message();
    CHECK(refused.error().code() == errc::conflict);
    CHECK(contains(why, "object fd " + std::to_string(tail.native_handle())));
    CHECK(contains(why, "size 0x10000"));
    CHECK(contains(why, "0x8000-0x10000"));
    CHECK(contains(why, "guest memory at 0x800000-0x808000")); // where its piece is

    // A hole in the middle is named the same way.
    bar = bar_with(m, 0x20000, {});
    auto holed = test::make_memfd(0x30000);
    must(bar.map(piece_of(holed, 0, 0, 0x10000)));
    must(bar.map(piece_of(holed, 0x10000, 0x20000, 0x10000)));
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    auto middle = Worker::connect(m);
    REQUIRE_FALSE(middle);
    CHECK(contains(middle.error().full_message(), "0x10000-0x20000"));
    CHECK(contains(middle.error().full_message(), "size 0x30000"));

    // Map the hole too and the object is shared.
    must(bar.unmap_from_guest());
    bar = bar_with(m, 0x30000, {piece_of(holed, 0, 0, 0x30000)});
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    CHECK(Worker::connect(m).has_value());
}

TEST_CASE("while a worker is connected, handing it part of a larger object is refused and undone")
{
    Manager m = guest();
    auto worker = must(Worker::connect(m));
    auto larger = test::make_memfd(0x20000);

    // Placing a region that shows half of the object: refused, nothing changed.
    auto bar = bar_with(m, 0x10000, {piece_of(larger, 0, 0, 0x10000)});
    const State before(m);
    auto placed = bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write);
    REQUIRE_FALSE(placed);
    CHECK(placed.error().code() == errc::conflict);
    CHECK(contains(placed.error().full_message(), "0x10000-0x20000"));
    CHECK(State(m) == before);
    CHECK_FALSE(worker.served.listener->cut_off());
    CHECK(test::error_of(m.guest_memory().read_plain<std::uint64_t>(Gpa{bar_gpa})) ==
          errc::unmapped);

    // A placed region that is sharable, then a mapping of part of the larger object into it.
    auto whole = test::make_memfd(0x10000);
    auto shared = bar_with(m, 0x10000, {piece_of(whole, 0, 0, 0x10000)});
    must(shared.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    const State placed_state(m);
    auto mapped = shared.map(piece_of(larger, 0, 0x10000, 0x8000));
    REQUIRE_FALSE(mapped);
    CHECK(mapped.error().code() == errc::conflict);
    CHECK(State(m) == placed_state);
    CHECK_FALSE(worker.served.listener->cut_off());

    // The worker is still served, and a fault there hands out the shared object.
    auto reply = worker.fault(bar_gpa);
    CHECK(std::get<ipc::FaultReply>(reply.message.body).status == 0);
    CHECK(reply.fd.valid());

    // Without workers, the same changes are allowed.
    must(m.remove_memory_listener(worker.served.id));
    must(shared.map(piece_of(larger, 0, 0x10000, 0x8000)));
    must(shared.unmap_from_guest());
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    CHECK(State(m) != before);
}

TEST_CASE("a worker mapping other offsets of a shared object reaches only the guest memory there")
{
    Manager m = guest();
    auto mem = m.guest_memory();
    // The object's halves are placed swapped: offset o shows at bar_gpa + (o ^ 0x8000).
    auto object = test::make_memfd(0x10000);
    auto bar = bar_with(m, 0x10000,
                        {piece_of(object, 0, 0x8000, 0x8000), piece_of(object, 0x8000, 0, 0x8000)});
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    for (std::uint64_t page = 0; page < 0x10000; page += 0x1000)
        REQUIRE(mem.write_plain<std::uint64_t>(Gpa{bar_gpa + page}, 0xb000 + page).has_value());
    for (std::uint64_t gpa = 0; gpa < 4 * MiB; gpa += 0x40000)
        REQUIRE(mem.write_plain<std::uint64_t>(Gpa{gpa + 8}, 0x7a00 + gpa).has_value());

    auto worker = must(Worker::connect(m));
    // The piece the worker asks for is the first half of the region; its fd names all of it.
    auto reply = worker.fault(bar_gpa);
    REQUIRE(reply.fd.valid());
    const auto& piece = std::get<ipc::FaultReply>(reply.message.body);
    CHECK(piece.object_offset == 0x8000);
    CHECK(piece.length == 0x8000);
    struct stat st {};
    REQUIRE(::fstat(reply.fd.get(), &st) == 0);
    CHECK(st.st_size == 0x10000);
    void* p = ::mmap(nullptr, 0x10000, PROT_READ, MAP_SHARED, reply.fd.get(), 0);
    REQUIRE(p != MAP_FAILED);
    const auto* bytes = static_cast<const std::uint8_t*>(p);
    for (std::uint64_t off = 0; off < 0x10000; off += 0x1000) {
        std::uint64_t seen = 0;
        std::memcpy(&seen, bytes + off, sizeof seen);
        const std::uint64_t gpa = bar_gpa + (off ^ 0x8000);
        CHECK(seen == test::value_of(mem.read_plain<std::uint64_t>(Gpa{gpa})));
    }
    ::munmap(p, 0x10000);

    // RAM likewise: its object is the RAM, and each offset is the guest's RAM there.
    auto ram = worker.fault(0x1000);
    REQUIRE(ram.fd.valid());
    REQUIRE(::fstat(ram.fd.get(), &st) == 0);
    CHECK(static_cast<std::uint64_t>(st.st_size) == 4 * MiB);
    void* r = ::mmap(nullptr, 4 * MiB, PROT_READ, MAP_SHARED, ram.fd.get(), 0);
    REQUIRE(r != MAP_FAILED);
    const auto* ram_bytes = static_cast<const std::uint8_t*>(r);
    for (std::uint64_t gpa = 0; gpa < 4 * MiB; gpa += 0x40000) {
        std::uint64_t seen = 0;
        std::memcpy(&seen, ram_bytes + gpa + 8, sizeof seen);
        CHECK(seen == 0x7a00 + gpa);
    }
    ::munmap(r, 4 * MiB);
}

TEST_CASE("guest memory hidden under another region still counts as guest memory")
{
    Manager m = guest();
    // Half of the object sits in a device region inside RAM (RAM wins there: hidden), the other
    // half in one placed in the open. Both halves are guest memory: the object is shared.
    auto object = test::make_memfd(0x10000);
    auto hidden = bar_with(m, 0x8000, {piece_of(object, 0, 0x8000, 0x8000)});
    must(hidden.map_to_guest(Gpa{1 * MiB}, Protection::read_write));
    auto open = bar_with(m, 0x8000, {piece_of(object, 0, 0, 0x8000)});
    must(open.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    auto worker = must(Worker::connect(m)); // the initial table holds the open half

    // The hidden half leaves the guest: the object is no longer all guest memory, so no change
    // may hand it out again (moving the open half is refused and undone).
    must(hidden.unmap_from_guest());
    const State before(m);
    auto moved = open.map_to_guest(Gpa{bar_gpa + 0x10000}, Protection::read_write);
    REQUIRE_FALSE(moved);
    CHECK(moved.error().code() == errc::conflict);
    CHECK(contains(moved.error().full_message(), "0x8000-0x10000"));
    CHECK(State(m) == before);
    CHECK_FALSE(worker.served.listener->cut_off());
    // The piece accepted at connection time is still served (the table did not change).
    CHECK(worker.fault(bar_gpa).fd.valid());
}

TEST_CASE("a part placed read-only is never writable through an fd the worker gets")
{
    Manager m = guest();
    auto worker = must(Worker::connect(m));

    // One object placed part read-only, part writable: refused while a worker is connected.
    auto mixed = test::make_memfd(0x10000);
    auto bar = bar_with(m, 0x10000,
                        {piece_of(mixed, 0, 0, 0x8000, Protection::read_write),
                         piece_of(mixed, 0x8000, 0x8000, 0x8000, Protection::read_only)});
    const State before(m);
    auto placed = bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write);
    REQUIRE_FALSE(placed);
    CHECK(placed.error().code() == errc::conflict);
    CHECK(contains(placed.error().full_message(), "read-only"));
    CHECK(State(m) == before);

    // An object placed read-only only (a ROM): shared, always with a read-only fd.
    auto rom = test::make_memfd(0x10000);
    auto rom_bar = bar_with(m, 0x10000, {piece_of(rom, 0, 0, 0x10000, Protection::read_only)});
    must(rom_bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    auto write = worker.fault(bar_gpa, true);
    CHECK(std::get<ipc::FaultReply>(write.message.body).status ==
          static_cast<std::uint32_t>(errc::read_only));
    CHECK_FALSE(write.fd.valid());
    auto read = worker.fault(bar_gpa);
    REQUIRE(read.fd.valid());
    CHECK_FALSE(std::get<ipc::FaultReply>(read.message.body).writable);
    CHECK((::fcntl(read.fd.get(), F_GETFL) & O_ACCMODE) == O_RDONLY);
    errno = 0;
    void* p = ::mmap(nullptr, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, read.fd.get(), 0);
    CHECK(p == MAP_FAILED);
    CHECK(errno == EACCES);

    // Without workers the mixed placement is allowed; a worker then cannot connect.
    must(m.remove_memory_listener(worker.served.id));
    must(rom_bar.unmap_from_guest());
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    auto refused = Worker::connect(m);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code() == errc::conflict);
    CHECK(contains(refused.error().full_message(), "read-only"));
}

TEST_CASE("a region placed read-only is the guest's view: the object stays writable elsewhere")
{
    Manager m = guest();
    auto mem = m.guest_memory();
    auto worker = must(Worker::connect(m));
    // Both regions map all of the object writable; one is placed read-only.
    auto object = test::make_memfd(0x10000);
    auto ro = bar_with(m, 0x10000, {piece_of(object, 0, 0, 0x10000)});
    must(ro.map_to_guest(Gpa{bar_gpa}, Protection::read_only));
    auto rw = bar_with(m, 0x10000, {piece_of(object, 0, 0, 0x10000)});
    must(rw.map_to_guest(Gpa{bar_gpa + 0x100000}, Protection::read_write));

    // The read-only piece comes with a read-only fd...
    auto read_only = worker.fault(bar_gpa);
    REQUIRE(read_only.fd.valid());
    CHECK((::fcntl(read_only.fd.get(), F_GETFL) & O_ACCMODE) == O_RDONLY);
    // ...but the writable piece's fd writes the same bytes, which the guest reads read-only.
    auto writable = worker.fault(bar_gpa + 0x100000, true);
    REQUIRE(writable.fd.valid());
    void* p = ::mmap(nullptr, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, writable.fd.get(), 0);
    REQUIRE(p != MAP_FAILED);
    const std::uint64_t v = 0x5eed;
    std::memcpy(static_cast<std::uint8_t*>(p) + 0x2000, &v, sizeof v);
    ::munmap(p, 0x10000);
    CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{bar_gpa + 0x2000})) == v);
    CHECK(test::error_of(mem.write_plain<std::uint64_t>(Gpa{bar_gpa + 0x2000}, 1)) ==
          errc::read_only);
}

TEST_CASE("dup'd and reopened fds of one file are one object, covered together")
{
    Manager m = guest();
    auto worker = must(Worker::connect(m));
    auto object = test::make_memfd(0x10000);
    const int fd = object.native_handle();
    auto dupped = Mappable::adopt(::dup(fd));
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    auto reopened = Mappable::adopt(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    REQUIRE(dupped.native_handle() >= 0);
    REQUIRE(reopened.native_handle() >= 0);

    // A mapping through another fd of the file counts against the file: a region showing the
    // file's first half through the dup'd fd alone is refused (its second half is in no mapping).
    auto half = bar_with(m, 0x8000, {piece_of(dupped, 0, 0, 0x8000)});
    auto r = half.map_to_guest(Gpa{bar_gpa + 0x100000}, Protection::read_write);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::conflict);
    CHECK(contains(r.error().full_message(), "0x8000-0x10000"));

    // Each Mappable alone covers half of the file or less; together they cover it.
    auto bar = bar_with(m, 0x10000,
                        {piece_of(object, 0, 0, 0x8000), piece_of(dupped, 0x8000, 0x8000, 0x4000),
                         piece_of(reopened, 0xc000, 0xc000, 0x4000)});
    must(bar.map_to_guest(Gpa{bar_gpa}, Protection::read_write));
    CHECK(worker.fault(bar_gpa + 0xc000).fd.valid());
    // Now the file is all guest memory: the half region may be placed too.
    must(half.map_to_guest(Gpa{bar_gpa + 0x100000}, Protection::read_write));
    CHECK_FALSE(worker.served.listener->cut_off());
}
