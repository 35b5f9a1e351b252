// libFuzzer harness: random control operations and accesses against a reference model.
//
// The guest: x86 legacy RAM [0, 2 MiB) (twelve PAM segments whose visibility the input sets), a
// window at 4 MiB where two regions (priorities 1 and 2, each with its own object) are mapped,
// re-mapped with other permissions and unmapped, and a device region placed read-write or
// read-only at one of two GPAs, or taken out. Accesses (4-byte reads, writes, compare-exchanges
// and fetch_adds, 64-byte fills) go through the primary mapper or a lazy one, at GPAs anywhere
// in the guest and beyond it. The model knows each object's bytes and the topology; every
// access's outcome (the value, or the error code) must be the model's, or the harness traps.
//
// One manager serves every input: each input starts from the same state (everything unmapped,
// every object zeroed), so an input's result does not depend on the ones before it.
#include <membacking/membacking.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

using namespace membacking;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t ram_size = 2 * MiB;
constexpr std::uint64_t space = 16 * MiB;
constexpr std::uint64_t window_at = 4 * MiB;
constexpr std::uint64_t window_size = 0x10000;
constexpr std::array<std::uint64_t, 2> device_slots{8 * MiB, 9 * MiB};
constexpr std::uint64_t device_size = 0x10000;
constexpr std::uint64_t pam_start = 0xc0000;
constexpr std::uint64_t pam_size = 0x4000;
constexpr unsigned pam_count = 12;
using Manager = MockGuestMemoryManager;

[[noreturn]] void diverged(const char* what, std::uint64_t gpa)
{
    std::fprintf(stderr, "divergence from the model: %s at 0x%llx\n", what,
                 static_cast<unsigned long long>(gpa));
    std::abort();
}
template <class T>
T must(Result<T> r)
{
    if (!r) {
        std::fprintf(stderr, "control call failed: %s\n", r.error().full_message().c_str());
        std::abort();
    }
    return std::move(r).value();
}
void must(Result<void> r)
{
    if (!r) {
        std::fprintf(stderr, "control call failed: %s\n", r.error().full_message().c_str());
        std::abort();
    }
}
Mappable make_object(std::uint64_t size)
{
    const int fd = ::memfd_create("membacking-fuzz", MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0)
        std::abort();
    return Mappable::adopt(fd);
}
MemoryRange range(std::uint64_t start, std::uint64_t end)
{
    return MemoryRange::valid_or_abort(start, end);
}

/// What the model says an access at a GPA reaches.
struct Target {
    std::uint8_t* bytes = nullptr; // the model's copy of the object, at the GPA's offset
    bool writable = false;
    errc error = errc::unmapped; // when bytes is null
};

struct Region {
    RegionId id{};
    Mappable object;
    std::vector<std::uint8_t> model = std::vector<std::uint8_t>(window_size);
    bool mapped = false;
    bool writable = false;
};

struct World {
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(RamBackingRequest({range(0, ram_size)}))
                         .build(Length{space}));
    std::shared_ptr<MockPartition> partition = std::make_shared<MockPartition>();
    Manager::Memory primary = m.guest_memory();
    Manager::Memory lazy = must(m.client().lazy_guest_memory());
    std::vector<std::uint8_t> ram = std::vector<std::uint8_t>(ram_size);
    std::array<RamVisibility, pam_count> pam{};
    std::array<Region, 2> regions;
    Mappable device_object = make_object(device_size);
    std::vector<std::uint8_t> device_model = std::vector<std::uint8_t>(device_size);
    Manager::Device device = must(m.device_memory_mapper().new_region("dev", Length{device_size}));
    std::optional<unsigned> device_slot;
    bool device_writable = false;

    World()
    {
        partition->set_recording(false);
        must(m.attach_partition(Vtl::vtl0, partition));
        for (std::uint8_t prio = 1; prio <= 2; ++prio) {
            Region& r = regions.at(prio - 1U);
            r.object = make_object(window_size);
            r.id = must(m.add_region(prio == 1 ? "low" : "high",
                                     range(window_at, window_at + window_size), prio,
                                     MappingType::Ram));
            must(m.add_mapping(
                r.id,
                {range(0, window_size), MappingBacking::file(r.object, Offset{0}), true, {}}));
        }
        must(device.map({.offset = Offset{0},
                         .length = Length{device_size},
                         .object = device_object,
                         .object_offset = Offset{0},
                         .protection = Protection::read_write}));
    }

    /// The same starting state for every input.
    void reset()
    {
        for (unsigned i = 0; i < pam_count; ++i)
            set_pam(i, RamVisibility::read_write);
        for (Region& r : regions) {
            if (r.mapped)
                must(m.unmap_region(r.id));
            r.mapped = false;
            zero(r.object, r.model);
        }
        if (device_slot)
            must(device.unmap_from_guest());
        device_slot.reset();
        zero(device_object, device_model);
        if (!primary.fill(Gpa{0}, 0, Length{ram_size}))
            std::abort();
        std::fill(ram.begin(), ram.end(), std::uint8_t{0});
    }
    static void zero(const Mappable& object, std::vector<std::uint8_t>& model)
    {
        std::fill(model.begin(), model.end(), std::uint8_t{0});
        if (::pwrite(object.native_handle(), model.data(), model.size(), 0) !=
            static_cast<ssize_t>(model.size()))
            std::abort();
    }
    void set_pam(unsigned i, RamVisibility v)
    {
        const std::uint64_t at = pam_start + i * pam_size;
        must(m.ram_visibility_control().set_ram_visibility(range(at, at + pam_size), v));
        pam.at(i) = v;
    }

    [[nodiscard]] Target target(std::uint64_t gpa)
    {
        if (gpa >= space)
            return {nullptr, false, errc::out_of_range};
        if (gpa < ram_size) {
            bool writable = true;
            if (gpa >= pam_start && gpa < pam_start + pam_count * pam_size) {
                const RamVisibility v = pam.at((gpa - pam_start) / pam_size);
                if (v == RamVisibility::unmapped || v == RamVisibility::write_only)
                    return {}; // nothing lies below a PAM segment here
                writable = v == RamVisibility::read_write;
            }
            return {ram.data() + gpa, writable};
        }
        if (gpa >= window_at && gpa < window_at + window_size) {
            for (auto r = regions.rbegin(); r != regions.rend(); ++r)
                if (r->mapped)
                    return {r->model.data() + (gpa - window_at), r->writable};
            return {};
        }
        for (unsigned s = 0; s < device_slots.size(); ++s)
            if (device_slot == s && gpa >= device_slots.at(s) &&
                gpa < device_slots.at(s) + device_size)
                return {device_model.data() + (gpa - device_slots.at(s)), device_writable};
        return {};
    }
};

World& world()
{
    static World w;
    return w;
}

/// Reads the input a byte at a time; zeros once it runs out.
struct Input {
    const std::uint8_t* data;
    std::size_t size;
    std::uint8_t byte()
    {
        if (size == 0)
            return 0;
        --size;
        return *data++;
    }
    std::uint32_t u32()
    {
        std::uint32_t v = 0;
        for (int i = 0; i < 4; ++i)
            v = (v << 8) | byte();
        return v;
    }
};

/// A GPA an input picks: mostly in the interesting places, sometimes anywhere (4-byte aligned,
/// except where the input asks for a misaligned one).
std::uint64_t pick_gpa(Input& in)
{
    const std::uint8_t where = in.byte();
    const std::uint64_t off = std::uint64_t{in.u32()};
    std::uint64_t gpa = 0;
    switch (where % 6) {
    case 0: gpa = pam_start + off % (pam_count * pam_size); break;
    case 1: gpa = off % ram_size; break;
    case 2: gpa = window_at + off % window_size; break;
    case 3: gpa = device_slots.at(where / 8 % 2) + off % device_size; break;
    case 4: gpa = off % (space + MiB); break;
    default: gpa = ~std::uint64_t{0} - off % 0x10000; break;
    }
    return (where & 0x80) != 0 ? gpa : gpa & ~std::uint64_t{3};
}

void guest_access(World& w, Input& in)
{
    const std::uint8_t kind = in.byte();
    const Manager::Memory& mem = (kind & 0x80) != 0 ? w.lazy : w.primary;
    const std::uint64_t gpa = pick_gpa(in);
    const std::uint32_t value = in.u32();
    // The model's outcome: a 4-byte access needs all four bytes in one target (the areas are
    // page-multiple, so a 4-byte aligned access never straddles two).
    const Target t = w.target(gpa);
    const bool aligned = gpa % 4 == 0;
    const bool inside = gpa <= space - 4;
    const Target last = inside ? w.target(gpa + 3) : Target{nullptr, false, errc::out_of_range};
    const bool reachable = t.bytes != nullptr && last.bytes == t.bytes + 3;
    const bool writable = t.writable && last.writable;
    // A misaligned access across two pages whose first is mapped: which page's error the
    // access reports is the hardware's order, not the model's; either is right.
    const bool either_error = gpa / page_size != (gpa + 3) / page_size && t.bytes != nullptr;
    const auto expect_error = [&](const auto& r, bool write, const char* what) {
        if (r)
            diverged(what, gpa);
        // Alignment is checked first (atomics only), then the range, then the memory.
        const bool atomic = (kind % 5) >= 2;
        const errc want = (write && atomic && !aligned) ? errc::invalid_argument
                          : !inside                     ? errc::out_of_range
                          : t.bytes == nullptr          ? t.error
                          : last.bytes == nullptr       ? last.error
                                                        : errc::read_only;
        const errc got = r.error().code;
        if (got != want && !(either_error && (got == errc::unmapped || got == errc::read_only)))
            diverged(what, gpa);
    };
    std::uint32_t model = 0;
    if (reachable)
        std::memcpy(&model, t.bytes, 4);
    switch (kind % 5) {
    case 0: { // read
        auto r = mem.read_plain<std::uint32_t>(Gpa{gpa});
        if (!reachable)
            return expect_error(r, false, "read");
        if (!r || *r != model)
            diverged("read value", gpa);
        return;
    }
    case 1: { // write
        auto r = mem.write_plain<std::uint32_t>(Gpa{gpa}, value);
        if (!reachable || !writable)
            return expect_error(r, true, "write");
        if (!r)
            diverged("write", gpa);
        std::memcpy(t.bytes, &value, 4);
        return;
    }
    case 2: { // compare-exchange, expecting the model's value half of the time
        const std::uint32_t expected = (value & 1) != 0 ? model : value;
        auto r = mem.compare_exchange<std::uint32_t>(Gpa{gpa}, expected, value ^ 0x5a5a5a5a);
        if (!aligned || !reachable || !writable)
            return expect_error(r, true, "compare_exchange");
        if (!r || (*r).observed != model || (*r).exchanged != (expected == model))
            diverged("compare_exchange", gpa);
        if ((*r).exchanged) {
            const std::uint32_t desired = value ^ 0x5a5a5a5a;
            std::memcpy(t.bytes, &desired, 4);
        }
        return;
    }
    case 3: { // fetch_add
        auto r = mem.fetch_add<std::uint32_t>(Gpa{gpa}, value);
        if (!aligned || !reachable || !writable)
            return expect_error(r, true, "fetch_add");
        if (!r || *r != model)
            diverged("fetch_add", gpa);
        const std::uint32_t sum = model + value;
        std::memcpy(t.bytes, &sum, 4);
        return;
    }
    default: { // fill 64 bytes at a 64-byte aligned GPA (one target, or an error)
        const std::uint64_t at = gpa & ~std::uint64_t{63};
        const Target ft = w.target(at);
        auto r = mem.fill(Gpa{at}, static_cast<std::uint8_t>(value), Length{64});
        if (at > space - 64 || ft.bytes == nullptr || !ft.writable) {
            if (r)
                diverged("fill", at);
            return;
        }
        if (!r)
            diverged("fill", at);
        std::memset(ft.bytes, static_cast<std::uint8_t>(value), 64);
        return;
    }
    }
}

void control(World& w, Input& in)
{
    const std::uint8_t op = in.byte();
    const std::uint8_t arg = in.byte();
    switch (op % 4) {
    case 0: w.set_pam(arg % pam_count, static_cast<RamVisibility>(arg / pam_count % 4)); return;
    case 1: {
        Region& r = w.regions.at(arg % 2);
        const bool writable = (arg & 2) != 0;
        must(w.m.map_region(r.id, {writable, false, false}));
        r.mapped = true;
        r.writable = writable;
        return;
    }
    case 2: {
        Region& r = w.regions.at(arg % 2);
        must(w.m.unmap_region(r.id));
        r.mapped = false;
        return;
    }
    default:
        if (arg % 3 == 2) {
            must(w.device.unmap_from_guest());
            w.device_slot.reset();
            return;
        }
        const bool writable = (arg & 4) != 0;
        must(w.device.map_to_guest(Gpa{device_slots.at(arg % 3)},
                                   writable ? Protection::read_write : Protection::read_only));
        w.device_slot = arg % 3;
        w.device_writable = writable;
        return;
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    World& w = world();
    w.reset();
    Input in{data, size};
    for (int step = 0; step < 256 && in.size > 0; ++step) {
        if (in.byte() % 4 == 0)
            control(w, in);
        else
            guest_access(w, in);
    }
    // The partition agrees with the books at the end of every input.
    const MemoryMap map = w.m.memory_map();
    std::size_t active = 0;
    for (const auto& r : map.regions)
        if (r.active) {
            ++active;
            if (!w.partition->lookup(r.range.start()))
                diverged("partition window missing", r.range.start());
        }
    if (w.partition->windows().size() != active)
        diverged("partition windows", 0);
    return 0;
}
