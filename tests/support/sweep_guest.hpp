/**
 * The guest and the operations of the fault-injection sweeps (tests/proof/faults.cpp over the
 * mock partition and the KVM policy, tests/windows/whp_sweep.cpp over the WHP policy): one
 * populate() builds the same PC-like guest under every manager type, and one
 * shared_operations() lists the control operations every sweep runs, so that the sweeps cannot
 * drift apart. Portable: Linux and Windows.
 */
#pragma once

#include <membacking/membacking.hpp>

#include "place_device.hpp"
#include "platform.hpp"
#include "test_support.hpp"

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace membacking::test::sweep {

inline constexpr std::uint64_t MiB = std::uint64_t{1} << 20;

/// What every sweep's guest holds (the mock's, the KVM's, the WHP's fixtures derive from it), all
/// of it set up by one populate(): a PC-like guest with a partition attached, two stacks of two
/// regions, two make-before-break stacks, device regions placed, a lazy mapper, and memory filled
/// with a pattern. The operations both tables run (shared_operations) name only these members.
template <class M>
struct GuestFixture {
    explicit GuestFixture(M manager) : m(std::move(manager)) {}
    M m;
    PartitionId id{};
    RegionId low{}, high{}, low2{}, high2{};
    /// Make-before-break stacks: a lower region inside a higher one whose mappings leave a
    /// hole over it (high3 unmapped, high4 mapped).
    RegionId low3{}, high3{}, low4{}, high4{};
    std::optional<typename M::Device> bar;
    std::optional<typename M::Device> twin; // same range and priority as bar, registered after it
    /// Writable device regions under PAM segments 0xc4000 (unmapped) and 0xc8000 (write-only,
    /// which exposes it read-only).
    std::optional<typename M::Device> under_c4, under_c8;
    typename M::Memory lazy;
    Mappable extra = test::make_object(0x10000);
    /// place_split's pieces, kept placed (dropping them is a control operation of its own).
    std::vector<typename M::Device> split;
};

inline constexpr std::uint64_t stack1 = 8 * MiB;  // low mapped, high not
inline constexpr std::uint64_t stack2 = 10 * MiB; // low2 and high2 mapped
inline constexpr std::uint64_t stack3 = 12 * MiB; // low3 mapped, high3 (with a hole over it) not
inline constexpr std::uint64_t stack4 = 14 * MiB; // low4 and high4 (with a hole over it) mapped
inline constexpr std::uint64_t bar_at = 16 * MiB;
inline constexpr std::uint64_t rom_at = 24 * MiB; // the KVM sweep's ROM region

/// A stack at `at`: a lower region, mapped, and a higher one over it, mapped if `map_high`.
template <class M>
void add_stack(M& m, std::uint64_t at, RegionId& low, RegionId& high, bool map_high)
{
    low = must(m.add_region("low", range(at, at + 0x10000), 1, MappingType::Ram));
    must(m.add_mapping(low, {range(0, 0x10000),
                             MappingBacking::file(test::make_object(0x10000), Offset{0}),
                             true,
                             {}}));
    must(m.map_region(low, {true, false, false}));
    high = must(m.add_region("high", range(at, at + 0x10000), 2, MappingType::Ram));
    must(m.add_mapping(high, {range(0, 0x10000),
                              MappingBacking::file(test::make_object(0x10000), Offset{0}),
                              true,
                              {}}));
    if (map_high)
        must(m.map_region(high, {true, false, false}));
}

inline std::vector<std::uint64_t> probe_gpas()
{
    std::vector<std::uint64_t> out;
    for (std::uint64_t g = 0; g < MiB; g += 0x4000)
        out.push_back(g);
    for (std::uint64_t g = MiB; g < 4 * MiB; g += 0x40000)
        out.push_back(g);
    for (const std::uint64_t base :
         {stack1, stack2, stack3, stack4, bar_at, bar_at + MiB, bar_at + 4 * MiB, rom_at})
        for (std::uint64_t g = base; g < base + 0x10000; g += 0x1000)
            out.push_back(g);
    return out;
}

/// Everything but the partition: `f`'s partition is attached (f.id), and nothing fails meanwhile.
template <class M>
void populate(GuestFixture<M>& f)
{
    add_stack(f.m, stack1, f.low, f.high, false);
    add_stack(f.m, stack2, f.low2, f.high2, true);
    // high covers [at, at + 64 KiB) with mappings at [0, 24 KiB) and [32 KiB, 64 KiB); low is
    // [at + 16 KiB, at + 48 KiB), wholly mapped: switching between them replaces two parts in
    // place and removes or adds only the hole.
    const auto add_holed_stack = [&](std::uint64_t at, RegionId& low, RegionId& high,
                                     bool map_high) {
        high = must(f.m.add_region("high", range(at, at + 0x10000), 2, MappingType::Ram));
        const Mappable object = test::make_object(0x10000);
        must(f.m.add_mapping(
            high, {range(0, 0x6000), MappingBacking::file(object, Offset{0}), true, {}}));
        must(f.m.add_mapping(
            high,
            {range(0x8000, 0x10000), MappingBacking::file(object, Offset{0x8000}), true, {}}));
        low = must(f.m.add_region("low", range(at + 0x4000, at + 0xc000), 1, MappingType::Ram));
        must(f.m.add_mapping(low, {range(0, 0x8000),
                                   MappingBacking::file(test::make_object(0x8000), Offset{0}),
                                   true,
                                   {}}));
        must(f.m.map_region(low, {true, false, false}));
        if (map_high)
            must(f.m.map_region(high, {true, false, false}));
    };
    add_holed_stack(stack3, f.low3, f.high3, false);
    add_holed_stack(stack4, f.low4, f.high4, true);
    f.bar =
        test::place_device(f.m, "bar", Gpa{bar_at}, Length{0x10000}, test::make_object(0x10000));
    // Hidden behind bar (the earlier registered wins): a failed move of bar must not show it.
    f.twin =
        test::place_device(f.m, "twin", Gpa{bar_at}, Length{0x10000}, test::make_object(0x10000));
    must(f.m.ram_visibility_control().set_ram_visibility(range(0xc4000, 0xc8000),
                                                         RamVisibility::unmapped));
    const auto place_under = [&](std::uint64_t at) {
        auto d =
            test::place_device(f.m, "under", Gpa{at}, Length{0x4000}, test::make_object(0x4000));
        return d;
    };
    f.under_c4 = place_under(0xc4000);
    f.under_c8 = place_under(0xc8000);
    must(f.m.ram_visibility_control().set_ram_visibility(range(0xc8000, 0xcc000),
                                                         RamVisibility::write_only));
    f.lazy = must(f.m.client().lazy_guest_memory());
    const std::uint64_t pattern = 0x9e3779b97f4a7c15;
    for (const std::uint64_t g : probe_gpas())
        (void)f.m.guest_memory().template write_plain<std::uint64_t>(Gpa{g}, g * pattern);
    const std::vector<std::uint8_t> ee(0x10000, 0xee);
    test::write_object(f.extra, 0, ee.data(), ee.size());
}

/// One control operation, run from a fresh fixture of type F, with what that fixture needs first
/// (before the "before" snapshot).
template <class F>
struct SweepOperation {
    std::string name;
    std::function<Result<void>(F&)> prepare; ///< may be empty
    std::function<Result<void>(F&)> run;
    /// May be empty: what must hold once the operation's run is judged consistent, after a
    /// failure and retry too (the KVM sweep's tracked variants: no dirty page lost).
    std::function<Result<void>(F&)> verify = {};
};

template <class T>
Result<void> drop_value(Result<T> r)
{
    if (!r)
        return std::move(r).error();
    return {};
}

/// The operations every sweep runs, on any fixture (GuestFixture's members only), so that the
/// sweeps' tables cannot drift apart; `tag` ends each name.
template <class F>
std::vector<SweepOperation<F>> shared_operations(const std::string& tag)
{
    /// set_ram_visibility of the 16 KiB PAM segment at `at`.
    const auto set_visibility = [](std::uint64_t at, RamVisibility v) {
        return [at, v](F& f) {
            return f.m.ram_visibility_control().set_ram_visibility(range(at, at + 0x4000), v);
        };
    };
    const auto dev = [](Offset at, Length len, const Mappable& object) {
        return DeviceMapping{.offset = at,
                             .length = len,
                             .object = object,
                             .object_offset = Offset{0},
                             .protection = Protection::read_write};
    };
    std::vector<SweepOperation<F>> ops = {
        {"detach_partition", {}, [](F& f) { return f.m.detach_partition(f.id); }},
        {"set_ram_visibility read_only", {}, set_visibility(0xc0000, RamVisibility::read_only)},
        {"set_ram_visibility unmapped", {}, set_visibility(0xc0000, RamVisibility::unmapped)},
        {"set_ram_visibility read_write (from unmapped)",
         {},
         set_visibility(0xc4000, RamVisibility::read_write)},
        {"set_ram_visibility write_only (from read_write, nothing below)",
         {},
         set_visibility(0xc0000, RamVisibility::write_only)},
        {"set_ram_visibility write_only (from unmapped, the device below becomes read-only)",
         {},
         set_visibility(0xc4000, RamVisibility::write_only)},
        {"set_ram_visibility unmapped (from write_only, the device below becomes writable)",
         {},
         set_visibility(0xc8000, RamVisibility::unmapped)},
        {"set_ram_visibility read_write (from write_only)",
         {},
         set_visibility(0xc8000, RamVisibility::read_write)},
        // high over low, which stays mapped under it.
        {"map_region over a mapped region",
         {},
         [](F& f) {
             return f.m.map_region(f.high, {true, false, false});
         }},
        {"map_region read-only (permission change)",
         {},
         [](F& f) {
             return f.m.map_region(f.low, {false, false, false});
         }},
        {"unmap_region (the region under it reappears)",
         {},
         [](F& f) { return f.m.unmap_region(f.high2); }},
        {"remove_region (mapped)", {}, [](F& f) { return f.m.remove_region(f.high2); }},
        {"map_region over a lower region, a hole in its mappings (make-before-break)",
         {},
         [](F& f) {
             return f.m.map_region(f.high3, {true, false, false});
         }},
        {"unmap_region, the lower region replacing part of it in place (make-before-break)",
         {},
         [](F& f) { return f.m.unmap_region(f.high4); }},
        {"add_mapping (file, splits the one under it)",
         {},
         [](F& f) {
             return f.m.add_mapping(
                 f.low,
                 {range(0x4000, 0x8000), MappingBacking::file(f.extra, Offset{0}), true, {}});
         }},
        {"remove_mappings (split)",
         {},
         [](F& f) { return f.m.remove_mappings(f.low, range(0x8000, 0xc000)); }},
        {"device map (sub-mapping)",
         {},
         [dev](F& f) { return f.bar->map(dev(Offset{0x1000}, Length{0x2000}, f.extra)); }},
        {"device unmap (sub-range)",
         {},
         [](F& f) { return f.bar->unmap(Offset{0x2000}, Length{0x1000}); }},
        {"device map_to_guest (move)",
         {},
         [](F& f) { return f.bar->map_to_guest(Gpa{bar_at + MiB}, Protection::read_write); }},
        {"device map_to_guest (read-only in place)",
         {},
         [](F& f) { return f.bar->map_to_guest(Gpa{bar_at}, Protection::read_only); }},
        {"device unmap_from_guest", {}, [](F& f) { return f.bar->unmap_from_guest(); }},
        {"device new_region",
         {},
         [](F& f) {
             return drop_value(f.m.device_memory_mapper().new_region("new", Length{0x10000}));
         }},
        {"device place_split (the object's size is checked first)",
         {},
         [](F& f) -> Result<void> {
             auto pieces =
                 f.m.device_memory_mapper().place_split({.name = "split",
                                                         .gpa = Gpa{bar_at + 4 * MiB},
                                                         .length = Length{0x10000},
                                                         .object = f.extra,
                                                         .object_offset = Offset{0},
                                                         .protection = Protection::read_only});
             if (!pieces)
                 return std::move(pieces).error();
             f.split = std::move(*pieces);
             return {};
         }},
        {"client lazy_guest_memory",
         {},
         [](F& f) { return drop_value(f.m.client().lazy_guest_memory()); }},
    };
    for (SweepOperation<F>& op : ops)
        op.name += tag;
    return ops;
}

} // namespace membacking::test::sweep
