// Guest-controlled inputs: every access API (read, write, fill, read_plain, write_plain,
// compare_exchange, fetch_*, lease, probe, subrange) at GPAs and lengths near the end of the
// guest, near 2^63 and near 2^64, with ranges that overflow, and atomics at every misaligned
// offset. Each must be an error, never a crash, and nothing may be written: all of RAM (which
// ends exactly at the guest's end, so the bytes beyond it are the reservation's PROT_NONE guard)
// holds a canary pattern that is checked after every batch, through the guest and through the
// object directly. A window made by subrange gets the same inputs, relative to its start, and
// the RAM around it is the canary: an offset that wrapped would land there.
#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <unistd.h>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t ram_size = MiB;
constexpr std::uint64_t top = std::numeric_limits<std::uint64_t>::max();
constexpr std::uint8_t canary = 0xa5;
using Manager = MockGuestMemoryManager;

/// Addresses a hostile guest would pick, relative to a view of `size` bytes.
std::vector<std::uint64_t> hostile_addresses(std::uint64_t size)
{
    return {size - 1, size,        size + 1,       size + 0x1000,  std::uint64_t{1} << 32,
            top / 2,  top / 2 + 1, top - 0x1000,   top - 8,        top - 7,
            top - 1,  top,         top - size + 1, top - size + 8, top - 0xfff};
}
/// Lengths a hostile guest would pick for a range starting at `at`.
std::vector<std::uint64_t> hostile_lengths(std::uint64_t at, std::uint64_t size)
{
    return {1,      8, 0x1000, size, top, top / 2 + 1, top - at + 1, top - at + 2, size - at + 1,
            0x10000};
}

/// An access result that must be an error of one of the codes a bad input gives.
template <class T>
bool is_clean_error(const AccessResult<T>& r)
{
    return !r && (r.error().code == errc::out_of_range || r.error().code == errc::invalid_range ||
                  r.error().code == errc::invalid_argument);
}

struct Tally {
    std::size_t accesses = 0;
    std::size_t bad = 0;
    void expect(bool clean, const std::string& what)
    {
        ++accesses;
        if (!clean) {
            ++bad;
            FAIL_CHECK(what);
        }
    }
};

/// Every access API through `view` (a whole guest or a window) at hostile addresses.
template <class View, class Address>
void hostile_accesses(const View& view, std::uint64_t size, Tally& t)
{
    std::vector<std::uint8_t> buffer(0x2000, 0x11);
    for (const std::uint64_t a : hostile_addresses(size)) {
        const Address at{a};
        const std::string where = " at " + MemoryRange::hex(a);
        // Single values, of every width: out of range unless wholly inside.
        const auto values = [&]<class T>(T) {
            if (a + sizeof(T) <= size && a + sizeof(T) > a)
                return; // inside: not a hostile input
            t.expect(is_clean_error(view.template read_plain<T>(at)), "read_plain" + where);
            t.expect(is_clean_error(view.template write_plain<T>(at, T{1})), "write_plain" + where);
            t.expect(is_clean_error(view.template compare_exchange<T>(at, T{0}, T{1})),
                     "compare_exchange" + where);
            t.expect(is_clean_error(view.template fetch_add<T>(at, T{1})), "fetch_add" + where);
            t.expect(is_clean_error(view.template fetch_sub<T>(at, T{1})), "fetch_sub" + where);
            t.expect(is_clean_error(view.template fetch_or<T>(at, T{1})), "fetch_or" + where);
            t.expect(is_clean_error(view.template fetch_and<T>(at, T{0})), "fetch_and" + where);
            t.expect(is_clean_error(view.template fetch_xor<T>(at, T{1})), "fetch_xor" + where);
        };
        values(std::uint8_t{});
        values(std::uint16_t{});
        values(std::uint32_t{});
        values(std::uint64_t{});
        // Buffers: read into and write from 1 byte up to 8 KiB.
        for (const std::size_t n : {std::size_t{1}, std::size_t{8}, std::size_t{0x2000}}) {
            if (a + n <= size && a + n > a)
                continue;
            const std::span<std::uint8_t> part(buffer.data(), n);
            t.expect(is_clean_error(view.read(at, part)), "read" + where);
            t.expect(is_clean_error(view.write(at, std::span<const std::uint8_t>(part))),
                     "write" + where);
        }
        for (const std::uint64_t len : hostile_lengths(a, size)) {
            if (a + len <= size && a + len > a)
                continue;
            const std::string what = where + " of " + MemoryRange::hex(len) + " bytes";
            t.expect(is_clean_error(view.fill(at, 0x5a, Length{len})), "fill" + what);
            auto lease = view.lease(at, Length{len}, LeaseAccess::read_write);
            t.expect(!lease && lease.error().code() == errc::out_of_range, "lease" + what);
            const RangeProbe p = view.probe(at, Length{len});
            const std::uint64_t inside = a < size ? size - a : 0;
            t.expect(p.mapped.value() <= inside && p.writable <= p.mapped, "probe" + what);
            t.expect(!view.subrange(at, Length{len}).has_value(), "subrange" + what);
        }
    }
    for (const std::uint8_t b : buffer)
        t.expect(b == 0x11, "a failed read wrote into the caller's buffer");
}

/// Atomics at every misaligned offset of a valid address: errc::invalid_argument.
template <class View, class Address>
void misaligned_atomics(const View& view, std::uint64_t at, Tally& t)
{
    const auto one = [&]<class T>(T) {
        for (std::uint64_t off = 1; off < sizeof(T); ++off) {
            const Address a{at + off};
            const std::string where =
                " of " + std::to_string(sizeof(T)) + " bytes at +" + std::to_string(off);
            const auto invalid = [](const auto& r) {
                return !r && r.error().code == errc::invalid_argument;
            };
            t.expect(invalid(view.template compare_exchange<T>(a, T{0}, T{1})),
                     "compare_exchange" + where);
            t.expect(invalid(view.template fetch_add<T>(a, T{1})), "fetch_add" + where);
            t.expect(invalid(view.template fetch_sub<T>(a, T{1})), "fetch_sub" + where);
            t.expect(invalid(view.template fetch_or<T>(a, T{1})), "fetch_or" + where);
            t.expect(invalid(view.template fetch_and<T>(a, T{0})), "fetch_and" + where);
            t.expect(invalid(view.template fetch_xor<T>(a, T{1})), "fetch_xor" + where);
        }
    };
    one(std::uint16_t{});
    one(std::uint32_t{});
    one(std::uint64_t{});
}

/// All of RAM still holds the canary, through the guest and through the object itself.
void check_canary(const Manager& m, const Mappable& object)
{
    std::vector<std::uint8_t> seen(ram_size);
    REQUIRE(m.guest_memory().read(Gpa{0}, seen).has_value());
    std::size_t wrong = 0;
    for (const std::uint8_t b : seen)
        wrong += b != canary ? 1 : 0;
    std::vector<std::uint8_t> direct(ram_size);
    REQUIRE(::pread(object.native_handle(), direct.data(), ram_size, 0) ==
            static_cast<ssize_t>(ram_size));
    for (const std::uint8_t b : direct)
        wrong += b != canary ? 1 : 0;
    CHECK(wrong == 0);
}

} // namespace

TEST_CASE("hostile GPAs and lengths: errors only, nothing written anywhere")
{
    Manager m = must(Manager::builder()
                         .add_backing(RamBackingRequest({range(0, ram_size)}))
                         .build(Length{ram_size}));
    const auto backing = m.shared_memory_backing();
    REQUIRE(backing.has_value());
    const Manager::Memory mem = m.guest_memory();
    REQUIRE(mem.fill(Gpa{0}, canary, Length{ram_size}).has_value());
    check_canary(m, backing->mappable());

    Tally t;
    hostile_accesses<Manager::Memory, Gpa>(mem, ram_size, t);
    check_canary(m, backing->mappable());
    misaligned_atomics<Manager::Memory, Gpa>(mem, 0x1000, t);
    misaligned_atomics<Manager::Memory, Gpa>(mem, ram_size - 8, t);
    check_canary(m, backing->mappable());

    // A window in the middle of RAM: the same inputs relative to its start.
    constexpr std::uint64_t window_at = 0x40000, window_size = 0x10000;
    const auto window = must(mem.subrange(Gpa{window_at}, Length{window_size}));
    hostile_accesses<decltype(window), Offset>(window, window_size, t);
    misaligned_atomics<decltype(window), Offset>(window, 0, t);
    check_canary(m, backing->mappable());

    // A lazy mapper's handle, the same again.
    const Manager::Memory lazy = must(m.client().lazy_guest_memory());
    hostile_accesses<Manager::Memory, Gpa>(lazy, ram_size, t);
    check_canary(m, backing->mappable());

    // The control: the same APIs inside the range work (the canary is then rewritten).
    CHECK(mem.write_plain<std::uint64_t>(Gpa{ram_size - 8}, 1).has_value());
    CHECK(window.fetch_add<std::uint32_t>(Offset{window_size - 4}, 1).has_value());
    CHECK(mem.probe(Gpa{ram_size - 0x1000}, Length{top}).mapped == Length{0x1000});
    MESSAGE("hostile accesses: " << t.accesses << ", not a clean error: " << t.bad);
    CHECK(t.accesses > 1000);
}
