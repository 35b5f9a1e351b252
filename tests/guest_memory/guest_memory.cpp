// GuestMemory over the real stack (region manager -> mapping manager -> the platform's VA
// mapper: LinuxMmap, or WindowsPlaceholder under Wine): the
// reference's guestmem tests that apply, and the access-path behaviours. No access may
// crash the process: unmapped, read-only and straddling accesses come back as errors that say
// where they stopped.
#include "platform.hpp"
#include "va_stack.hpp"

#include <array>
#include <atomic>
#include <cstring>
#include <latch>
#include <thread>
#include <vector>

using namespace membacking;
using test::must;
using test::range;
using test::VaStack;
using Stack = VaStack<>;
using Memory = GuestMemory<VaMapper<test::PlatformVa>>;

namespace {
constexpr std::uint64_t MiB = std::uint64_t{1} << 20;

std::vector<std::byte> pattern(std::size_t n, std::uint8_t seed)
{
    std::vector<std::byte> v(n);
    for (std::size_t i = 0; i < n; ++i)
        v[i] = static_cast<std::byte>(static_cast<std::uint8_t>(seed + i * 7));
    return v;
}
} // namespace

static_assert(!std::is_polymorphic_v<Memory>);
static_assert(std::is_nothrow_copy_constructible_v<Memory>);

TEST_CASE("reference test_basic_read_write: RAM with holes")
{
    // RAM 0-1M, hole 1-2M, RAM 2-3M, hole 3M-3M+4K, RAM 3M+4K-4M.
    Stack s(4 * MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(4 * MiB, "ram"));
    s.add_ram("a", 0, MiB, ram, 0);
    s.add_ram("b", 2 * MiB, 3 * MiB, ram, MiB);
    s.add_ram("c", 3 * MiB + page_size, 4 * MiB, ram, 2 * MiB);
    const Memory& m = s.memory;

    CHECK(test::value_of(m.read_plain<std::uint8_t>(0)) == 0);
    const std::array<std::byte, 5> five{std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4},
                                        std::byte{5}};
    REQUIRE(m.write(0, five).has_value());
    std::array<std::byte, 5> back{};
    REQUIRE(m.read(0, back).has_value());
    CHECK(back == five);
    for (std::uint64_t i = 0; i < 5; ++i)
        CHECK(test::value_of(m.read_plain<std::uint8_t>(i)) == i + 1);

    for (std::size_t n : {std::size_t{4096}, std::size_t{MiB}}) {
        const auto data = pattern(n, static_cast<std::uint8_t>(n));
        REQUIRE(m.write(2 * MiB, data).has_value());
        std::vector<std::byte> got(n);
        REQUIRE(m.read(2 * MiB, got).has_value());
        CHECK(got == data);
    }
    auto hole = m.read_plain<std::uint8_t>(MiB);
    REQUIRE_FALSE(hole);
    CHECK(hole.error().code == errc::unmapped);
    CHECK(hole.error().gpa == MiB);
    CHECK(test::error_of(m.read_plain<std::uint8_t>(3 * MiB)) == errc::unmapped);
    CHECK(m.read_plain<std::uint8_t>(3 * MiB + page_size).has_value());
}

TEST_CASE("two mappers of the same memfd see each other's writes")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(MiB, "ram"));
    s.add_ram("ram", 0, MiB, ram);
    auto second = must(s.va.new_mapper(MapperMode::eager));
    Memory other(second);
    REQUIRE(s.memory.write_plain<std::uint64_t>(0x1234 * 8, 0x0123456789abcdef).has_value());
    CHECK(test::value_of(other.read_plain<std::uint64_t>(0x1234 * 8)) == 0x0123456789abcdef);
    REQUIRE(other.fill(0x8000, 0x5a, 0x100).has_value());
    CHECK(test::value_of(s.memory.read_plain<std::uint8_t>(0x80ff)) == 0x5a);
}

TEST_CASE("a remap changes what a read returns; unmapping brings the lower region back")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(MiB, "ram"));
    Mappable rom = must(test::PlatformVa::create_shared_memory(0x10000, "rom"));
    const RegionId dev = s.add_ram("rom", 0x40000, 0x50000, rom, 0, {true, true, false}, 0);
    (void)dev;
    const RegionId r = s.add_ram("ram", 0, MiB, ram);
    REQUIRE(s.memory.write_plain<std::uint32_t>(0x40000, 0xaaaaaaaa).has_value()); // into RAM
    REQUIRE(s.regions.unmap_region(r).has_value());
    CHECK(test::value_of(s.memory.read_plain<std::uint32_t>(0x40000)) == 0); // the ROM region
    REQUIRE(s.memory.write_plain<std::uint32_t>(0x40000, 0xbbbbbbbb).has_value());
    CHECK(test::error_of(s.memory.read_plain<std::uint32_t>(0x0)) == errc::unmapped);
    REQUIRE(s.regions.map_region(r, {true, true, false}).has_value());
    CHECK(test::value_of(s.memory.read_plain<std::uint32_t>(0x40000)) == 0xaaaaaaaa);
}

TEST_CASE("a read of an unmapped GPA is an error and the process survives it, many times")
{
    Stack s(MiB);
    for (int i = 0; i < 1000; ++i) {
        auto r = s.memory.read_plain<std::uint64_t>(static_cast<std::uint64_t>(i) * 8);
        REQUIRE_FALSE(r);
        CHECK(r.error().kind == AccessKind::read);
    }
}

TEST_CASE("a write to a read-only mapping is an error naming the GPA; reads work")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(MiB, "ram"));
    s.add_ram("ram", 0, MiB, ram, 0, {false, true, false});
    CHECK(s.memory.read_plain<std::uint64_t>(0x2000).has_value());
    auto w = s.memory.write_plain<std::uint64_t>(0x2008, 1);
    REQUIRE_FALSE(w);
    CHECK(w.error().code == errc::read_only);
    CHECK(w.error().gpa == 0x2008);
    CHECK(w.error().kind == AccessKind::write);
    CHECK(w.error().message() == "guest memory write at 0x2008 failed: read-only memory");
    CHECK(test::error_of(s.memory.fill(0x3000, 1, 16)) == errc::read_only);
    CHECK(test::error_of(s.memory.fetch_add<std::uint32_t>(0x3000, 1)) == errc::read_only);
}

TEST_CASE("a copy from mapped into unmapped memory reports the exact offset it reached")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x10000, "ram"));
    s.add_ram("ram", 0, 0x10000, ram);
    const auto data = pattern(0x3000, 3);
    REQUIRE(s.memory.write(0xd000, std::span(data).first(0x3000)).has_value());

    std::vector<std::byte> buf(0x4000);
    auto r = s.memory.read(0xe100, buf);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::unmapped);
    CHECK(r.error().gpa == 0x10000);
    CHECK(r.error().completed == 0x10000 - 0xe100);
    CHECK(std::memcmp(buf.data(), data.data() + 0x1100, 0x10000 - 0xe100) == 0);
    CHECK(r.error().message() ==
          "guest memory read at 0x10000 failed: no mapping (0x1f00 bytes done)");

    auto w = s.memory.write(0xfff0, std::span(data).first(0x20));
    REQUIRE_FALSE(w);
    CHECK(w.error().completed == 0x10);
    CHECK(w.error().kind == AccessKind::write);
    CHECK(test::value_of(s.memory.read_plain<std::uint8_t>(0xffff)) ==
          std::to_integer<std::uint8_t>(data[0xf]));
}

TEST_CASE("a value straddling a mapped/unmapped boundary fails as a whole")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x1000, "ram"));
    s.add_ram("ram", 0, 0x1000, ram);
    auto r = s.memory.read_plain<std::uint64_t>(0xffc);
    REQUIRE_FALSE(r);
    CHECK(r.error().gpa == 0x1000);
    CHECK(r.error().completed == 0);
}

TEST_CASE("out of range is checked before touching memory")
{
    Stack s(MiB);
    std::array<std::byte, 16> buf{};
    auto r = s.memory.read(MiB - 8, buf);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::out_of_range);
    CHECK(test::error_of(s.memory.read_plain<std::uint8_t>(~std::uint64_t{0})) ==
          errc::out_of_range);
    CHECK(test::error_of(s.memory.write(~std::uint64_t{0} - 2, buf)) == errc::out_of_range);
    CHECK(s.memory.read(MiB, std::span<std::byte>()).has_value()); // empty access at the end
    Memory empty;
    CHECK(test::error_of(empty.read_plain<std::uint8_t>(0)) == errc::out_of_range);
}

TEST_CASE("a fault in the caller's own buffer is an error, not a crash")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x1000, "ram"));
    s.add_ram("ram", 0, 0x1000, ram);
    test::NoAccessPage page;
    auto r = s.memory.read(0, std::span(page.get(), 0x100));
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::invalid_argument);
}

TEST_CASE("atomics: compare-exchange, fetch operations, alignment")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x1000, "ram"));
    s.add_ram("ram", 0, 0x1000, ram);
    const Memory& m = s.memory;
    REQUIRE(m.write_plain<std::uint32_t>(0x100, 10).has_value());
    auto cx = m.compare_exchange<std::uint32_t>(0x100, 10, 20);
    REQUIRE(cx.has_value());
    CHECK(cx.value().exchanged);
    auto miss = m.compare_exchange<std::uint32_t>(0x100, 10, 30);
    REQUIRE(miss.has_value());
    CHECK_FALSE(miss.value().exchanged);
    CHECK(miss.value().observed == 20);
    CHECK(test::value_of(m.fetch_add<std::uint32_t>(0x100, 5)) == 20);
    CHECK(test::value_of(m.fetch_sub<std::uint32_t>(0x100, 1)) == 25);
    CHECK(test::value_of(m.fetch_or<std::uint32_t>(0x100, 0x100)) == 24);
    CHECK(test::value_of(m.fetch_and<std::uint32_t>(0x100, 0xff)) == 0x118);
    CHECK(test::value_of(m.fetch_xor<std::uint32_t>(0x100, 0xff)) == 0x18);
    CHECK(test::value_of(m.read_plain<std::uint32_t>(0x100)) == 0xe7);
    CHECK(test::value_of(m.fetch_add<std::int8_t>(0x200, -3)) == 0);
    CHECK(test::value_of(m.read_plain<std::int8_t>(0x200)) == -3);
    CHECK(test::error_of(m.fetch_add<std::uint64_t>(0x104, 1)) == errc::invalid_argument);
    CHECK(test::error_of(m.compare_exchange<std::uint64_t>(MiB, 0, 1)) == errc::out_of_range);
    CHECK(test::error_of(m.compare_exchange<std::uint64_t>(0x2000, 0, 1)) == errc::unmapped);
    CHECK(m.compare_exchange<std::uint16_t>(0xffe, 0, 1).has_value());
}

TEST_CASE("atomic increments from several threads do not lose updates")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x1000, "ram"));
    s.add_ram("ram", 0, 0x1000, ram);
    constexpr int per_thread = 20000;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([m = s.memory] {
            for (int i = 0; i < per_thread; ++i) {
                (void)m.fetch_add<std::uint64_t>(0x40, 1);
                (void)m.fetch_or<std::uint32_t>(0x80, 1U << (i % 32));
            }
        });
    for (auto& t : threads)
        t.join();
    CHECK(test::value_of(s.memory.read_plain<std::uint64_t>(0x40)) == 4 * per_thread);
    CHECK(test::value_of(s.memory.read_plain<std::uint32_t>(0x80)) == 0xffffffff);
}

TEST_CASE("read_plain and write_plain of a struct go through the copy path")
{
    struct Desc {
        std::uint64_t addr;
        std::uint32_t len;
        std::uint16_t flags;
        std::uint16_t next;
    };
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x1000, "ram"));
    s.add_ram("ram", 0, 0x1000, ram);
    REQUIRE(s.memory.write_plain(0x10, Desc{0x1000, 512, 3, 7}).has_value());
    auto d = s.memory.read_plain<Desc>(0x10);
    REQUIRE(d.has_value());
    CHECK(d.value().len == 512);
    CHECK(d.value().next == 7);
    CHECK(test::error_of(s.memory.read_plain<Desc>(0xff8)) == errc::unmapped);
}

TEST_CASE("subrange: offsets are relative, errors name absolute GPAs, bounds are checked")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x4000, "ram"));
    s.add_ram("ram", 0, 0x4000, ram);
    auto sub = s.memory.subrange(0x3000, 0x2000);
    REQUIRE(sub.has_value());
    CHECK(sub->gpa_base() == 0x3000);
    REQUIRE(sub->write_plain<std::uint16_t>(0x10, 0xbeef).has_value());
    CHECK(test::value_of(s.memory.read_plain<std::uint16_t>(0x3010)) == 0xbeef);
    auto past = sub->read_plain<std::uint8_t>(0x1000);
    REQUIRE_FALSE(past);
    CHECK(past.error().code == errc::unmapped);
    CHECK(past.error().gpa == 0x4000);
    CHECK(test::error_of(sub->read_plain<std::uint8_t>(0x2000)) == errc::out_of_range);
    CHECK(test::error_of(s.memory.subrange(MiB - 0x1000, 0x2000)) == errc::out_of_range);
}

TEST_CASE("reference test_fault: a lazy mapper faults mappings in, across gaps and pages")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x4000, "ram"));
    s.add_ram("low", 0x1000, 0x2000, ram, 0, {true, true, false});
    s.add_ram("ro", 0x2000, 0x3000, ram, 0x1000, {false, true, false}, 254);
    Memory lazy(must(s.va.new_mapper(MapperMode::lazy)));
    CHECK(test::error_of(lazy.write_plain<std::uint8_t>(0, 1)) == errc::unmapped);
    CHECK(test::error_of(lazy.read_plain<std::uint8_t>(0xfff)) == errc::unmapped);
    CHECK(lazy.read_plain<std::uint8_t>(0x1000).has_value());
    CHECK(lazy.write_plain<std::uint8_t>(0x1000, 1).has_value());
    // A 2-byte access across into the read-only page: the read works, the write does not.
    CHECK(lazy.read_plain<std::uint16_t>(0x1fff).has_value());
    CHECK(test::error_of(lazy.write_plain<std::uint16_t>(0x1fff, 1)) == errc::read_only);
    CHECK(lazy.read_plain<std::uint8_t>(0x2fff).has_value());
    CHECK(test::error_of(lazy.write_plain<std::uint8_t>(0x2fff, 1)) == errc::read_only);
    // A copy that runs from a mapped page into a hole reports how far it got.
    std::vector<std::byte> buf(0x1800);
    auto r = lazy.read(0x2800, buf);
    REQUIRE_FALSE(r);
    CHECK(r.error().gpa == 0x3000);
    CHECK(r.error().completed == 0x800);
}

TEST_CASE("GuestMemory handles outliving the manager get errors, not stale memory")
{
    Memory survivor;
    {
        Stack s(MiB);
        Mappable ram = must(test::PlatformVa::create_shared_memory(0x1000, "ram"));
        s.add_ram("ram", 0, 0x1000, ram);
        survivor = s.memory;
        REQUIRE(survivor.write_plain<std::uint8_t>(0, 1).has_value());
    }
    CHECK(test::error_of(survivor.read_plain<std::uint8_t>(0)) == errc::unmapped);
}

TEST_CASE("concurrent accesses while the topology changes see old or new memory, or an error")
{
    Stack s(MiB);
    Mappable ram = must(test::PlatformVa::create_shared_memory(0x10000, "ram"));
    Mappable dev = must(test::PlatformVa::create_shared_memory(0x10000, "dev"));
    s.add_ram("dev", 0, 0x10000, dev, 0, {true, true, false}, 0);
    const RegionId r = s.add_ram("ram", 0, 0x10000, ram);
    REQUIRE(s.memory.fill(0, 0x11, 0x10000).has_value()); // RAM's pattern
    REQUIRE(s.regions.unmap_region(r).has_value());
    REQUIRE(s.memory.fill(0, 0x22, 0x10000).has_value()); // the device's pattern
    REQUIRE(s.regions.map_region(r, {true, true, false}).has_value());

    constexpr int readers = 2;
    // Wine maps a view in two steps (anonymous memory, then the file), so under Wine a reader can
    // briefly see zero-filled pages; raw MapViewOfFile3/UnmapViewOfFile2 calls show the same.
    // Windows replaces a placeholder in one step. Zeros are accepted under Wine only.
    const std::byte transient = test::under_wine() ? std::byte{0} : std::byte{0x11};
    std::latch started(readers);
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> ok{0}, failed{0}, torn{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < readers; ++t)
        threads.emplace_back([&, m = s.memory.view()] {
            started.count_down();
            std::array<std::byte, 256> buf{};
            while (!stop.load()) {
                auto res = m.read(0x7f80, buf);
                if (!res) {
                    // Only "nothing mapped here right now" is an acceptable failure.
                    if (res.error().code != errc::unmapped)
                        torn.fetch_add(1);
                    failed.fetch_add(1);
                    continue;
                }
                // A successful read sees one region's bytes (a remap may land mid-copy, so
                // each byte is checked on its own).
                for (std::byte b : buf)
                    if (b != std::byte{0x11} && b != std::byte{0x22} && b != transient)
                        torn.fetch_add(1);
                ok.fetch_add(1);
            }
        });
    started.wait();
    // Toggle until the readers demonstrably ran alongside many topology changes.
    int toggles = 0;
    while (toggles < 300 || ok.load() + failed.load() < 1000) {
        REQUIRE(s.regions.unmap_region(r).has_value());
        REQUIRE(s.regions.map_region(r, {true, true, false}).has_value());
        ++toggles;
    }
    stop = true;
    for (auto& t : threads)
        t.join();
    CHECK(torn.load() == 0);
    CHECK(ok.load() > 0);
}
