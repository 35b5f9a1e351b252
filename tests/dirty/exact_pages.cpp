// Dirty tracking, VMM side: every write path of a tracked GuestMemory marks exactly the pages it
// wrote (not fewer, no neighbours), a write that faults part way marks the part it completed,
// reads and failed writes mark nothing, write leases mark on release; and the one dirty API
// (start / take runs or bitmap / stop) with the partitions' logs merged in, and the whole-window
// rule for topology changes.
#include <membacking/membacking.hpp>

#include "place_device.hpp"
#include "platform.hpp"
#include "test_support.hpp"

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace membacking;
using namespace membacking::literals;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t page = page_size;
constexpr std::uint64_t space = 16 * MiB;
constexpr std::uint64_t ram_end = 4 * MiB;
using BitTracked = TrackedMockGuestMemoryManager;
using ByteTracked = ByteMapTrackedMockGuestMemoryManager;
// Every case runs against both layouts of the dirty map: the same pages, the same results.
#define TRACKED_MANAGERS BitTracked, ByteTracked

static_assert(
    std::is_same_v<BitTracked::Memory, GuestMemory<BitTracked::Mapper, Gpa, DirtyTracking>>);
static_assert(std::is_same_v<ByteTracked::Memory,
                             GuestMemory<ByteTracked::Mapper, Gpa, ByteMapDirtyTracking>>);
static_assert(std::is_same_v<MockGuestMemoryManager::Memory,
                             GuestMemory<MockGuestMemoryManager::Mapper, Gpa, NoDirtyTracking>>);
// An untracked view is still four words; the tracked one carries the bitmap's words too.
static_assert(sizeof(MockGuestMemoryManager::MemoryView) == 4 * sizeof(void*));
static_assert(sizeof(BitTracked::MemoryView) == 5 * sizeof(void*));
static_assert(sizeof(ByteTracked::MemoryView) == 5 * sizeof(void*));
// One dirty API, and only where every handle marks: an untracked manager has none.
template <class M>
concept HasDirtyApi = requires(M& m)
{
    m.start_dirty_tracking();
};
static_assert(HasDirtyApi<BitTracked>);
static_assert(HasDirtyApi<ByteTracked>);
static_assert(!HasDirtyApi<MockGuestMemoryManager>);

template <class Manager>
Manager ram_guest()
{
    return must(Manager::builder()
                    .add_backing(RamBackingRequest({range(0, ram_end)}))
                    .build(Length{space}));
}

/// "gpa+len gpa+len ..." of the runs taken from r.
template <class Manager>
std::string take(Manager& m, const MemoryRange& r)
{
    std::vector<DirtyRun> runs;
    must(m.take_dirty_runs(r, runs));
    std::string out;
    // Appended piece by piece: GCC 12's -Wrestrict misfires at -O3 on `"" + std::string`.
    for (const DirtyRun& run : runs) {
        if (!out.empty())
            out += ' ';
        out += MemoryRange::hex(run.gpa.value());
        out += '+';
        out += MemoryRange::hex(run.length.value());
    }
    return out;
}

/// The same over the whole address space.
template <class Manager>
std::string take(Manager& m)
{
    return take(m, range(0, space));
}

std::string pages(std::uint64_t gpa, std::uint64_t n)
{
    return MemoryRange::hex(gpa) + "+" + MemoryRange::hex(n * page);
}

/// A tracked guest with tracking on and nothing dirty.
template <class Manager>
struct Tracked {
    Manager m = ram_guest<Manager>();
    typename Manager::Memory mem = m.guest_memory();
    Tracked()
    {
        must(m.start_dirty_tracking());
        REQUIRE(take(m).empty());
    }
};

} // namespace

TEST_CASE_TEMPLATE("write, fill and write_plain mark exactly the pages they wrote", Manager,
                   TRACKED_MANAGERS)
{
    Tracked<Manager> t;
    const std::array<std::uint8_t, 1> one{7};
    REQUIRE(t.mem.write(0x1000_gpa, one));
    CHECK(take(t.m) == pages(0x1000, 1));
    CHECK(take(t.m).empty()); // taken means reset

    const std::array<std::uint8_t, 2> two{1, 2}; // 0x2fff and 0x3000: two pages
    REQUIRE(t.mem.write(Gpa{0x2fff}, two));
    CHECK(take(t.m) == pages(0x2000, 2));

    std::vector<std::uint8_t> big(0x2000, 3); // 0x5800..0x77ff: pages 5, 6, 7
    REQUIRE(t.mem.write(Gpa{0x5800}, big));
    CHECK(take(t.m) == pages(0x5000, 3));

    REQUIRE(t.mem.write(Gpa{0x3f000}, std::vector<std::uint8_t>(0x2000, 1))); // across a word
    CHECK(take(t.m) == pages(0x3f000, 2));

    REQUIRE(t.mem.fill(Gpa{0x10000}, 0xaa, Length{page}));
    CHECK(take(t.m) == pages(0x10000, 1));
    REQUIRE(t.mem.fill(Gpa{0x10fff}, 0xaa, Length{2}));
    CHECK(take(t.m) == pages(0x10000, 2));

    REQUIRE(t.mem.template write_plain<std::uint64_t>(Gpa{0x20ff8}, 1));
    CHECK(take(t.m) == pages(0x20000, 1));
    REQUIRE(t.mem.template write_plain<std::uint32_t>(Gpa{0x21ffe}, 1)); // misaligned, across pages
    CHECK(take(t.m) == pages(0x21000, 2));
    struct Wide {
        std::array<std::uint64_t, 3> v;
    };
    REQUIRE(t.mem.write_plain(Gpa{0x23ff0}, Wide{{1, 2, 3}})); // 24 bytes, a copy
    CHECK(take(t.m) == pages(0x23000, 2));

    // Several writes before a take: maximal runs, ascending.
    REQUIRE(t.mem.template write_plain<std::uint8_t>(Gpa{0x9000}, 1));
    REQUIRE(t.mem.template write_plain<std::uint8_t>(Gpa{0x7000}, 1));
    REQUIRE(t.mem.template write_plain<std::uint8_t>(Gpa{0x8000}, 1));
    REQUIRE(t.mem.template write_plain<std::uint8_t>(Gpa{0x100000}, 1));
    CHECK(take(t.m) == pages(0x7000, 3) + " " + pages(0x100000, 1));
}

TEST_CASE_TEMPLATE("atomics mark the page they changed; a failed compare-exchange marks nothing",
                   Manager, TRACKED_MANAGERS)
{
    Tracked<Manager> t;
    const Gpa at{0x30008};
    REQUIRE(t.mem.template write_plain<std::uint64_t>(at, 5));
    CHECK(take(t.m) == pages(0x30000, 1));

    auto failed = t.mem.template compare_exchange<std::uint64_t>(at, 4, 9);
    REQUIRE(failed);
    CHECK(!failed.value().exchanged);
    CHECK(take(t.m).empty());
    auto swapped = t.mem.template compare_exchange<std::uint64_t>(at, 5, 9);
    REQUIRE(swapped);
    CHECK(swapped.value().exchanged);
    CHECK(take(t.m) == pages(0x30000, 1));

    REQUIRE(t.mem.template fetch_add<std::uint32_t>(Gpa{0x31000}, 1));
    CHECK(take(t.m) == pages(0x31000, 1));
    REQUIRE(t.mem.template fetch_sub<std::uint16_t>(Gpa{0x32ffe}, 1));
    CHECK(take(t.m) == pages(0x32000, 1));
    REQUIRE(t.mem.template fetch_or<std::uint8_t>(Gpa{0x33fff}, 1));
    CHECK(take(t.m) == pages(0x33000, 1));
    REQUIRE(t.mem.template fetch_and<std::uint64_t>(Gpa{0x34000}, 0));
    CHECK(take(t.m) == pages(0x34000, 1));
    REQUIRE(t.mem.template fetch_xor<std::int64_t>(Gpa{0x35ff8}, 3));
    CHECK(take(t.m) == pages(0x35000, 1));

    CHECK(test::error_of(t.mem.template fetch_add<std::uint64_t>(Gpa{0x36004}, 1)) ==
          errc::invalid_argument); // misaligned: nothing written
    CHECK(take(t.m).empty());
}

TEST_CASE_TEMPLATE(
    "reads and failed writes mark nothing; a partial write marks the part it completed", Manager,
    TRACKED_MANAGERS)
{
    Tracked<Manager> t;
    std::array<std::uint8_t, 64> buf{};
    REQUIRE(t.mem.read(0x1000_gpa, buf));
    REQUIRE(t.mem.template read_plain<std::uint64_t>(0x2000_gpa));
    CHECK(test::error_of(t.mem.template write_plain<std::uint64_t>(Gpa{space}, 1)) ==
          errc::out_of_range);
    CHECK(test::error_of(t.mem.template write_plain<std::uint64_t>(Gpa{ram_end}, 1)) ==
          errc::unmapped);
    CHECK(test::error_of(t.mem.fill(Gpa{ram_end + page}, 1, Length{page})) == errc::unmapped);
    CHECK(take(t.m).empty());

    // 0x3000 bytes from 0x1800 below the end of RAM: 0x1800 bytes land in RAM's last two pages.
    std::vector<std::uint8_t> big(0x3000, 9);
    auto partial = t.mem.write(Gpa{ram_end - 0x1800}, big);
    REQUIRE(!partial);
    CHECK(partial.error().code == errc::unmapped);
    CHECK(partial.error().completed == Length{0x1800});
    CHECK(take(t.m) == pages(ram_end - 2 * page, 2));

    auto partial_fill = t.mem.fill(Gpa{ram_end - 0x800}, 1, Length{0x1000});
    REQUIRE(!partial_fill);
    CHECK(partial_fill.error().completed == Length{0x800});
    CHECK(take(t.m) == pages(ram_end - page, 1));
}

TEST_CASE_TEMPLATE("every handle of a tracked manager marks: copies, windows, lazy mappers, views",
                   Manager, TRACKED_MANAGERS)
{
    Tracked<Manager> t;
    auto window = must(t.mem.subrange(Gpa{0x40000}, Length{0x10000}));
    REQUIRE(window.template write_plain<std::uint32_t>(Offset{0x2004}, 1));
    CHECK(take(t.m) == pages(0x42000, 1)); // the absolute GPA

    auto lazy = must(t.m.client().lazy_guest_memory());
    REQUIRE(lazy.template write_plain<std::uint32_t>(Gpa{0x50000}, 1));
    CHECK(take(t.m) == pages(0x50000, 1));

    typename Manager::MemoryView view = t.mem.view();
    REQUIRE(view.fill(Gpa{0x60000}, 1, Length{1}));
    const typename Manager::Memory copy =
        t.mem; // NOLINT(performance-unnecessary-copy-initialization)
    REQUIRE(copy.template write_plain<std::uint8_t>(Gpa{0x61000}, 1));
    CHECK(take(t.m) == pages(0x60000, 2));
}

#if MEMBACKING_OS_LINUX
TEST_CASE_TEMPLATE(
    "a write lease marks the pages it covers when it is released; a read lease never", Manager,
    TRACKED_MANAGERS)
{
    Tracked<Manager> t;
    {
        Lease lease = must(t.mem.lease(Gpa{0x70800}, Length{0x1000}, LeaseAccess::write));
        std::memset(lease.spans()[0].data(), 0x5a, lease.spans()[0].size());
        CHECK(take(t.m).empty()); // not while held: its writes are done only at release
    }
    CHECK(take(t.m) == pages(0x70000, 2));

    Lease moved;
    {
        Lease lease = must(t.mem.lease(Gpa{0x80000}, Length{page}, LeaseAccess::read_write));
        moved = std::move(lease); // the mark travels with the lease
    }
    CHECK(take(t.m).empty());
    moved.reset();
    CHECK(take(t.m) == pages(0x80000, 1));

    {
        Lease read = must(t.mem.lease(Gpa{0x90000}, Length{page}, LeaseAccess::read));
        CHECK(!read.empty());
    }
    CHECK(take(t.m).empty());
}
#endif

TEST_CASE_TEMPLATE("the dirty API: ranges, bitmap, the partitions' logs merged, start and stop",
                   Manager, TRACKED_MANAGERS)
{
    Manager m = ram_guest<Manager>();
    auto partition = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, partition));
    auto mem = m.guest_memory();
    std::vector<DirtyRun> runs;
    CHECK(test::error_of(m.take_dirty_runs(range(0, space), runs)) == errc::conflict);
    CHECK(test::error_of(m.stop_dirty_tracking()) == errc::conflict);

    REQUIRE(
        mem.template write_plain<std::uint8_t>(0x1000_gpa, 1)); // before start: forgotten by start
    must(m.start_dirty_tracking());
    CHECK(test::error_of(m.start_dirty_tracking()) == errc::conflict);
    CHECK(partition->dirty_logging());
    CHECK(take(m).empty());

    // A guest write (the partition's log) and a VMM write: their union, in one run here.
    partition->mark_dirty(0x7000);
    REQUIRE(mem.template write_plain<std::uint8_t>(Gpa{0x8000}, 1));
    partition->mark_dirty(0x200000);
    CHECK(take(m, range(0, MiB)) == pages(0x7000, 2)); // the part asked for
    CHECK(take(m) == pages(0x200000, 1));              // the rest waited

    // As a bitmap of a range that starts mid-word: bit i is page i of the range.
    REQUIRE(mem.template write_plain<std::uint8_t>(Gpa{0x105000}, 1)); // page 4 of the range
    partition->mark_dirty(0x142000);                                   // page 0x41: word 1, bit 1
    REQUIRE(mem.template write_plain<std::uint8_t>(Gpa{0x100000}, 1)); // just before the range
    std::array<std::uint64_t, 2> bits{};
    CHECK(test::error_of(m.take_dirty_bitmap(range(0x101000, 0x200000), bits)) ==
          errc::invalid_argument); // 255 pages need 4 words
    std::array<std::uint64_t, 4> enough{};
    must(m.take_dirty_bitmap(range(0x101000, 0x200000), enough));
    CHECK(enough[0] == std::uint64_t{1} << 4);
    CHECK(enough[1] == std::uint64_t{1} << 1);
    CHECK(enough[2] == 0);
    CHECK(take(m) == pages(0x100000, 1)); // outside the range: still there

    CHECK(test::error_of(m.take_dirty_runs(range(0, 2 * space), runs)) == errc::out_of_range);
    must(m.stop_dirty_tracking());
    CHECK(!partition->dirty_logging());
    CHECK(test::error_of(m.take_dirty_runs(range(0, space), runs)) == errc::conflict);

    // A partition attached during tracking logs from the start.
    must(m.start_dirty_tracking());
    auto late = std::make_shared<MockPartition>();
    must(m.attach_partition(Vtl::vtl0, late));
    CHECK(late->dirty_logging());
    (void)take(m);
    late->mark_dirty(0x3000);
    CHECK(take(m) == pages(0x3000, 1));
}

TEST_CASE_TEMPLATE("a partition detached during a pass leaves its guest's writes reported; an "
                   "attach refused during a pass takes no id and leaves logging off",
                   Manager, TRACKED_MANAGERS)
{
    Manager m = ram_guest<Manager>(); // one window: RAM [0, 4 MiB)
    const QuiesceHook hold_nothing{[] {}, [] {}};
    auto a = std::make_shared<MockPartition>();
    auto b = std::make_shared<MockPartition>();
    // a's guest writes page 0x5000 until its vCPUs are held: the detach must hold them before it
    // reads the log, else that write lands after the read and goes with the partition.
    MockPartition* guest_a = a.get();
    const PartitionId ida = must(m.attach_partition(
        Vtl::vtl0, a, QuiesceHook{[guest_a] { guest_a->mark_dirty(0x5000); }, [] {}}));
    const PartitionId idb = must(m.attach_partition(Vtl::vtl0, b, hold_nothing));
    must(m.start_dirty_tracking());

    // Detached: its log of the window moves into the manager's map first, exactly.
    a->mark_dirty(0x7000);
    b->mark_dirty(0x9000);
    must(m.detach_partition(ida));
    CHECK(take(m) == pages(0x5000, 1) + " " + pages(0x7000, 1) + " " + pages(0x9000, 1));

    // Bad input changes nothing: no partition's log is read, nothing is marked.
    b->mark_dirty(0x9000);
    CHECK(test::error_of(m.detach_partition(ida)) == errc::not_found);
    CHECK(b->dirty_logging());
    CHECK(take(m) == pages(0x9000, 1));

    // A log that cannot be read: the guest may have written anywhere it could, so the whole
    // window is reported (a page too many costs a copy, a page lost costs the migration).
    b->mark_dirty(0x9000);
    b->fail_next(MockPartition::Op::take_dirty_log);
    must(m.detach_partition(idb));
    CHECK(take(m) == pages(0, ram_end / page));

    // No quiesce hook: its vCPUs may write between the read and the window's removal, so the
    // whole window is reported too.
    auto running = std::make_shared<MockPartition>();
    const PartitionId idr = must(m.attach_partition(Vtl::vtl0, running));
    running->mark_dirty(0x9000);
    must(m.detach_partition(idr));
    CHECK(take(m) == pages(0, ram_end / page));

    // An attach refused during a pass (logging, or the first window, fails): logging is off
    // again, nothing is mapped, and no id is taken.
    for (const MockPartition::Op op :
         {MockPartition::Op::set_dirty_logging, MockPartition::Op::map}) {
        CAPTURE(MockPartition::op_name(op));
        auto c = std::make_shared<MockPartition>();
        c->fail_next(op);
        CHECK(test::error_of(m.attach_partition(Vtl::vtl0, c)) == errc::resource_exhausted);
        CHECK(!c->dirty_logging());
        CHECK(c->windows().empty());
    }
    const PartitionId idc = must(m.attach_partition(Vtl::vtl0, std::make_shared<MockPartition>()));
    CHECK(idc.value == idr.value + 1);

    // A read-only window's log is taken too (the mock logs a write into any window, as a
    // partition keeps what its guest wrote before a window was made read-only).
    auto rom = test::place_device(m, "rom", Gpa{8 * MiB}, Length{4 * page},
                                  test::make_object(4 * page), Protection::read_only);
    auto d = std::make_shared<MockPartition>();
    const PartitionId idd = must(m.attach_partition(Vtl::vtl0, d, hold_nothing));
    (void)take(m); // what the ROM's placement and the attach marked
    d->mark_dirty(8 * MiB + page);
    must(m.detach_partition(idd));
    CHECK(take(m) == pages(8 * MiB + page, 1));
}

TEST_CASE_TEMPLATE(
    "what becomes visible is dirty whole: a BAR placed and moved, RAM hidden and back", Manager,
    TRACKED_MANAGERS)
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(RamBackingRequest({range(0, ram_end)}))
                         .build(Length{space}));
    must(m.start_dirty_tracking());
    auto object = test::make_object(0x10000);
    auto bar = must(m.device_memory_mapper().new_region("bar", Length{0x10000}));
    must(bar.map({.offset = Offset{0},
                  .length = Length{0x10000},
                  .object = object,
                  .object_offset = Offset{0},
                  .protection = Protection::read_write}));
    CHECK(take(m).empty()); // mapped into a region that is not placed: nothing visible changed
    must(bar.map_to_guest(Gpa{0x800000}, Protection::read_write));
    CHECK(take(m) == pages(0x800000, 16));
    // Moved: its bytes are now at 0x900000, which is dirty whole; nothing is left at 0x800000.
    must(bar.map_to_guest(Gpa{0x900000}, Protection::read_write));
    CHECK(take(m) == pages(0x900000, 16));

    // A device region under a PAM segment (RAM hides it) appears when the segment is unmapped,
    // and the RAM comes back dirty whole: a copy made while it was hidden is of other bytes.
    const MemoryRange pam = *x86_legacy::pam_range(1, 0);
    auto rom = test::place_device(m, "rom", Gpa{pam.start()}, Length{pam.size()}, object,
                                  Protection::read_only);
    CHECK(take(m).empty()); // placed, but hidden under RAM
    must(m.ram_visibility_control().set_ram_visibility(pam, RamVisibility::unmapped));
    CHECK(take(m) == pages(pam.start(), pam.size() / page));
    must(m.ram_visibility_control().set_ram_visibility(pam, RamVisibility::read_write));
    CHECK(take(m) == pages(pam.start(), pam.size() / page));
}
