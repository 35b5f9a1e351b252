// The client side alone (ipc/remote_mapper.hpp), against a scripted manager end in this test:
// the fault round trip, invalidation before acknowledgement, and every way of losing the manager
// dropping all mappings.
#include <membacking/ipc/channel.hpp>
#include <membacking/ipc/remote_mapper.hpp>

#include "test_support.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

namespace mb = membacking;
namespace ipc = membacking::ipc;
using mb::test::must;

namespace {

constexpr std::uint64_t guest = 0x100000;
const ipc::DecodeContext manager_ctx{ipc::Receiver::manager, guest};

void quiet(const std::string&) {}

/// Whether the page at p is mapped at all (mincore fails with ENOMEM on unmapped pages; a
/// PROT_NONE reservation counts as mapped, so this checks residency through the guest's VA).
bool resident(const std::byte* p)
{
    unsigned char v = 0;
    return ::mincore(const_cast<std::byte*>(p), 4096, &v) == 0 && (v & 1) != 0;
}

struct Fixture {
    ipc::Channel<> manager;
    mb::GuestMemory<ipc::RemoteMapper<>> memory;
    mb::Mappable object = mb::test::make_memfd(0x10000);

    Fixture()
    {
        auto pair = must(ipc::Channel<>::pair());
        manager = std::move(pair.first);
        REQUIRE(manager.send({0, ipc::Hello{guest}}));
        ipc::RemoteMapperOptions o;
        o.log = &quiet;
        o.fault_timeout = std::chrono::milliseconds(2000);
        memory = must(ipc::connect_guest_memory(pair.second.release(), o));
        // The object's first word, written through the manager's own fd.
        const std::uint64_t v = 0xfeed;
        REQUIRE(::pwrite(object.native_handle(), &v, sizeof v, 0x3000) == sizeof v);
    }

    /// Answers the next fault request with [gpa, gpa + len) at object offset off.
    ipc::FaultRequest serve(std::uint64_t gpa, std::uint64_t len, std::uint64_t off,
                            bool writable = true)
    {
        auto in = must(manager.receive(5000, manager_ctx));
        REQUIRE(in.status == ipc::Incoming<>::Status::message);
        const auto q = std::get<ipc::FaultRequest>(in.message.body);
        REQUIRE(manager.send({in.message.seq, ipc::FaultReply{0, writable, gpa, len, off}},
                             object.native_handle()));
        return q;
    }
};

} // namespace

TEST_CASE("a remote mapper faults a piece in, and drops it before acknowledging an invalidate")
{
    Fixture f;
    std::uint64_t seen = 0;
    std::thread access(
        [&] { seen = *mb::test::value_of(f.memory.read_plain<std::uint64_t>(mb::Gpa{0x5008})); });
    const auto q = f.serve(0x4000, 0x4000, 0x2000); // gpa 0x5000 is object offset 0x3000
    access.join();
    CHECK(q.gpa == 0x5000); // the page, not the byte
    CHECK_FALSE(q.write);
    CHECK(seen == 0); // 0x5008 -> offset 0x3008
    CHECK(mb::test::value_of(f.memory.read_plain<std::uint64_t>(mb::Gpa{0x5000})) == 0xfeed);
    CHECK(f.memory.owner()->faults_served() == 1); // the second read needed no request
    CHECK(resident(f.memory.owner()->base() + 0x5000));

    REQUIRE(f.manager.send({7, ipc::Invalidate{0x4000, 0x4000}}));
    auto ack = must(f.manager.receive(5000, manager_ctx));
    REQUIRE(ack.status == ipc::Incoming<>::Status::message);
    CHECK(std::holds_alternative<ipc::InvalidateAck>(ack.message.body));
    CHECK(ack.message.seq == 7);
    // Acknowledged means gone: the page is no longer resident in the client's view.
    CHECK_FALSE(resident(f.memory.owner()->base() + 0x5000));
}

TEST_CASE("a remote mapper reports the manager's error replies as the access's error")
{
    Fixture f;
    std::thread manager([&] {
        auto in = must(f.manager.receive(5000, manager_ctx));
        REQUIRE(f.manager.send(
            {in.message.seq, ipc::FaultReply{static_cast<std::uint32_t>(mb::errc::read_only)}}));
    });
    CHECK(mb::test::error_of(f.memory.write_plain<std::uint64_t>(mb::Gpa{0x8000}, 1)) ==
          mb::errc::read_only);
    manager.join();
    CHECK(f.memory.owner()->connected());
}

TEST_CASE("a remote mapper disconnects and drops everything on EOF or a hostile message")
{
    Fixture f;
    std::thread access([&] { (void)f.memory.read_plain<std::uint64_t>(mb::Gpa{0x5000}); });
    f.serve(0x4000, 0x4000, 0x2000);
    access.join();
    REQUIRE(resident(f.memory.owner()->base() + 0x5000));

    SUBCASE("EOF")
    {
        f.manager.shutdown();
    }
    SUBCASE("a reply nobody asked for")
    {
        REQUIRE(f.manager.send({99, ipc::FaultReply{0, true, 0x8000, 0x1000, 0}},
                               f.object.native_handle()));
    }
    SUBCASE("a piece outside its object")
    {
        REQUIRE(f.manager.send({99, ipc::FaultReply{0, true, 0x8000, 0x1000, 0x10000}},
                               f.object.native_handle()));
    }
    // The reader drops every mapping and shuts the socket: the manager's end sees EOF.
    auto eof = must(f.manager.receive(5000, manager_ctx));
    CHECK(eof.status == ipc::Incoming<>::Status::closed);
    // (After our own shutdown, our end sees EOF at once; the reader may still be on its way.)
    const auto start = std::chrono::steady_clock::now();
    while (f.memory.owner()->connected() &&
           std::chrono::steady_clock::now() - start < std::chrono::seconds(5))
        std::this_thread::yield();
    CHECK_FALSE(f.memory.owner()->connected());
    CHECK_FALSE(resident(f.memory.owner()->base() + 0x5000));
    CHECK(mb::test::error_of(f.memory.read_plain<std::uint64_t>(mb::Gpa{0x5000})) ==
          mb::errc::unmapped);
}

// ---- dirty tracking: the hello's dirty map, in the manager's layout (protocol version 3) ----

namespace {

/// A scripted tracked manager: its dirty map in `layout`, sent with the hello.
struct TrackedManager {
    ipc::Channel<> manager;
    std::shared_ptr<mb::detail::DirtyBitmap> map;
    int client_socket = -1;

    explicit TrackedManager(mb::DirtyMapLayout layout)
    {
        map = must(mb::detail::DirtyBitmap::create(guest, layout));
        auto pair = must(ipc::Channel<>::pair());
        manager = std::move(pair.first);
        const auto wire_layout = ipc::to_wire(layout);
        REQUIRE(manager.send(
            {0, ipc::Hello{guest, ipc::wire_dirty_map_bytes(guest, wire_layout), wire_layout}},
            map->share_fd()));
        client_socket = pair.second.release();
    }

    template <class Tracking>
    auto connect()
    {
        ipc::RemoteMapperOptions o;
        o.log = &quiet;
        o.fault_timeout = std::chrono::milliseconds(2000);
        return ipc::connect_guest_memory<Tracking>(std::exchange(client_socket, -1), o);
    }
};

} // namespace

TEST_CASE("a remote mapper marks a byte-map manager's map in bytes: exactly the pages it wrote")
{
    TrackedManager m(mb::DirtyMapLayout::bytes);
    auto memory = must(m.connect<mb::ByteMapDirtyTracking>());
    REQUIRE(memory.owner()->dirty_bitmap() != nullptr);
    CHECK(memory.owner()->dirty_bitmap()->layout() == mb::DirtyMapLayout::bytes);
    const mb::Mappable object = mb::test::make_memfd(0x10000);
    std::thread manager([&] {
        auto in = must(m.manager.receive(5000, manager_ctx));
        REQUIRE(in.status == ipc::Incoming<>::Status::message);
        REQUIRE(m.manager.send({in.message.seq, ipc::FaultReply{0, true, 0x4000, 0x4000, 0}},
                               object.native_handle()));
    });
    CHECK(memory.write_plain<std::uint64_t>(mb::Gpa{0x5008}, 1).has_value());
    manager.join();
    CHECK(memory.write_plain<std::uint64_t>(mb::Gpa{0x6ff8}, 2).has_value());
    CHECK(memory.write_plain<std::uint32_t>(mb::Gpa{0x4ffe}, 3).has_value()); // pages 4 and 5
    // One byte per page, in the manager's map (a bit-layout marker would have set bits of the
    // first word instead, pages 0 to 63).
    const unsigned char* marks = m.map->marks();
    for (std::uint64_t page = 0; page < 16; ++page) {
        CAPTURE(page);
        CHECK(marks[page] == (page >= 4 && page <= 6 ? 1 : 0));
    }
    std::vector<mb::DirtyRun> runs;
    REQUIRE(m.map->take_runs(0, guest, runs));
    REQUIRE(runs.size() == 1);
    CHECK(runs[0] == mb::DirtyRun{mb::Gpa{0x4000}, mb::Length{0x3000}});
}

TEST_CASE("connect_guest_memory refuses a tracking policy of the other layout, both ways, naming "
          "both policies")
{
    SUBCASE("a bit-map client of a byte-map manager")
    {
        TrackedManager m(mb::DirtyMapLayout::bytes);
        auto memory = m.connect<mb::DirtyTracking>();
        REQUIRE_FALSE(memory.has_value());
        CHECK(memory.error().code() == mb::make_error_code(mb::errc::unsupported));
        const std::string why = memory.error().full_message();
        CHECK(why.find("connect_guest_memory<ByteMapDirtyTracking>, not "
                       "connect_guest_memory<DirtyTracking>") != std::string::npos);
    }
    SUBCASE("a byte-map client of a bit-map manager")
    {
        TrackedManager m(mb::DirtyMapLayout::bits);
        auto memory = m.connect<mb::ByteMapDirtyTracking>();
        REQUIRE_FALSE(memory.has_value());
        CHECK(memory.error().code() == mb::make_error_code(mb::errc::unsupported));
        const std::string why = memory.error().full_message();
        CHECK(why.find("connect_guest_memory<DirtyTracking>, not "
                       "connect_guest_memory<ByteMapDirtyTracking>") != std::string::npos);
    }
    SUBCASE("an untracked client of a byte-map manager is told the byte-map policy")
    {
        TrackedManager m(mb::DirtyMapLayout::bytes);
        auto memory = m.connect<mb::NoDirtyTracking>();
        REQUIRE_FALSE(memory.has_value());
        CHECK(memory.error().code() == mb::make_error_code(mb::errc::unsupported));
        CHECK(memory.error().full_message().find("connect_guest_memory<ByteMapDirtyTracking>") !=
              std::string::npos);
    }
    SUBCASE("the matching policies connect")
    {
        TrackedManager bytes(mb::DirtyMapLayout::bytes);
        CHECK(bytes.connect<mb::ByteMapDirtyTracking>().has_value());
        TrackedManager bits(mb::DirtyMapLayout::bits);
        CHECK(bits.connect<mb::DirtyTracking>().has_value());
    }
}
