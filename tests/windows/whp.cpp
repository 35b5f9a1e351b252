// WhpPartition against a stand-in WinHvPlatform.dll (whp_standin.cpp) that records calls: the
// partition conformance suite the mock and KVM pass, the exact WHP call sequences for map, unmap,
// re-map with new permissions, prefetch and pin, all-or-nothing rollback when the stand-in fails
// the n-th call, and the error a VMM gets without the DLL.
#include <membacking/partition/whp.hpp>

#include "standin.hpp"
#include "test_support.hpp"
#include "whp_standin.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

using namespace membacking;
using test::error_of;
using test::handle;
using test::must;
using test::Standin;

namespace {

constexpr std::uint64_t pg = page_size;

/// Host memory to map (80 pages), a stand-in, and a WhpPartition over it.
struct WhpFixture {
    WhpFixture()
        : memory(static_cast<std::byte*>(
              ::VirtualAlloc(nullptr, 80 * pg, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE))),
          partition(must(WhpPartition::create(handle)))
    {
        REQUIRE(memory != nullptr);
        standin.reset();
    }
    ~WhpFixture() { ::VirtualFree(memory, 0, MEM_RELEASE); }
    WhpFixture(const WhpFixture&) = delete;
    WhpFixture& operator=(const WhpFixture&) = delete;
    std::byte* host(std::uint64_t offset) { return memory + offset; }

    Standin standin;
    std::byte* memory;
    std::shared_ptr<WhpPartition> partition;
};

/// A call as the tests write it down.
struct Expect {
    std::uint32_t op;
    std::uint64_t gpa;
    std::uint64_t size;
    std::uint32_t flags_or_advice = 0;
    long result = S_OK;
};

void check_calls(const std::vector<StandinCall>& got, const std::vector<Expect>& want)
{
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i);
        CHECK(got[i].op == want[i].op);
        CHECK(got[i].partition == handle);
        CHECK(got[i].gpa == want[i].gpa);
        CHECK(got[i].size == want[i].size);
        CHECK((got[i].op == standin_map ? got[i].flags : got[i].advice) == want[i].flags_or_advice);
        CHECK(got[i].result == want[i].result);
    }
}

constexpr std::uint32_t R = 1, W = 2, X = 4;

} // namespace

// The conformance suite, for WHP.
#include "partition_conformance.hpp"

TEST_CASE_TEMPLATE_INVOKE(partition_conformance, WhpFixture);

TEST_CASE("WHP call sequence: map with each permission, unmap, re-map with new permissions")
{
    WhpFixture f;
    auto& p = *f.partition;
    REQUIRE(p.map_range(f.host(0), 0x100000, 4 * pg, true, true).has_value());
    REQUIRE(p.map_range(f.host(4 * pg), 0x200000, 2 * pg, false, false).has_value());
    REQUIRE(p.map_range(f.host(8 * pg), 0x300000, pg, true, false).has_value());
    const auto calls = f.standin.calls();
    CHECK(calls[0].source == f.host(0));
    CHECK(calls[1].source == f.host(4 * pg));
    // A permission change: the manager unmaps the window and maps it again.
    REQUIRE(p.unmap_range(0x100000, 4 * pg).has_value());
    REQUIRE(p.map_range(f.host(0), 0x100000, 4 * pg, false, true).has_value());
    // One unmap over two windows and the gap between them.
    REQUIRE(p.unmap_range(0x200000, 0x101000).has_value());
    check_calls(f.standin.calls(), {{standin_map, 0x100000, 4 * pg, R | W | X},
                                    {standin_map, 0x200000, 2 * pg, R},
                                    {standin_map, 0x300000, pg, R | W},
                                    {standin_unmap, 0x100000, 4 * pg},
                                    {standin_map, 0x100000, 4 * pg, R | X},
                                    {standin_unmap, 0x200000, 2 * pg},
                                    {standin_unmap, 0x300000, pg}});
    const auto left = f.standin.mapped();
    REQUIRE(left.size() == 1);
    CHECK(left[0].gpa == 0x100000);
    CHECK(p.windows().size() == 1);
}

TEST_CASE("WHP call sequence: prefetch populates for the window's access; pin and unpin")
{
    WhpFixture f;
    auto& p = *f.partition;
    REQUIRE(p.map_range(f.host(0), 0x100000, 8 * pg, true, false).has_value());
    REQUIRE(p.map_range(f.host(8 * pg), 0x200000, 4 * pg, false, false).has_value());
    REQUIRE(p.prefetch_range(0x100000, 8 * pg).has_value());
    REQUIRE(p.prefetch_range(0x201000, 2 * pg).has_value()); // part of a window
    CHECK(error_of(p.prefetch_range(0x1ff000, 2 * pg)) == errc::not_found);
    REQUIRE(p.pin_range(0x100000, 8 * pg).has_value());
    REQUIRE(p.pin_range(0x100000, 8 * pg).has_value()); // already pinned: no call
    REQUIRE(p.unpin_range(0x100000, 8 * pg).has_value());
    REQUIRE(p.pin_range(0x200000, 4 * pg).has_value());
    REQUIRE(p.unmap_range(0x200000, 4 * pg).has_value()); // a pinned window is unpinned first
    const auto calls = f.standin.calls();
    check_calls(calls, {{standin_map, 0x100000, 8 * pg, R | W},
                        {standin_map, 0x200000, 4 * pg, R},
                        {standin_advise, 0x100000, 8 * pg, 0},
                        {standin_advise, 0x201000, 2 * pg, 0},
                        {standin_advise, 0x100000, 8 * pg, 1},
                        {standin_advise, 0x100000, 8 * pg, 2},
                        {standin_advise, 0x200000, 4 * pg, 1},
                        {standin_advise, 0x200000, 4 * pg, 2},
                        {standin_unmap, 0x200000, 4 * pg}});
    CHECK(calls[2].populate_flags == 1);  // Prefetch
    CHECK(calls[2].populate_access == 1); // write: the window is writable
    CHECK(calls[3].populate_access == 0); // read
}

TEST_CASE("a failing WHP call changes nothing: map, pin, and every call of a multi-window unmap")
{
    WhpFixture f;
    auto& p = *f.partition;
    const HRESULT injected = static_cast<HRESULT>(0x80370301); // WHV_E_...: any failure
    f.standin.fail_nth_call(1, injected);
    auto r = p.map_range(f.host(0), 0x100000, 4 * pg, true, true);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().full_message().find("0x80370301") != std::string::npos);
    CHECK(p.windows().empty());
    CHECK(f.standin.mapped().empty());

    // Three windows, two pinned; one unmap over all of them fails at each of its calls in turn.
    for (std::uint64_t n = 1;; ++n) {
        CAPTURE(n);
        WhpFixture g;
        auto& q = *g.partition;
        REQUIRE(q.map_range(g.host(0), 0x100000, 2 * pg, true, true).has_value());
        REQUIRE(q.map_range(g.host(2 * pg), 0x200000, 2 * pg, false, false).has_value());
        REQUIRE(q.map_range(g.host(4 * pg), 0x300000, 2 * pg, true, false).has_value());
        REQUIRE(q.pin_range(0x100000, 2 * pg).has_value());
        REQUIRE(q.pin_range(0x300000, 2 * pg).has_value());
        const auto windows_before = q.windows();
        const auto mapped_before = g.standin.mapped();
        const std::size_t calls_before = g.standin.calls().size();
        g.standin.fail_nth_call(n, injected);
        auto u = q.unmap_range(0x100000, 0x202000);
        // 5 calls when nothing fails: unpin, unmap, unmap, unpin, unmap.
        if (n > 5) {
            REQUIRE(u.has_value());
            CHECK(g.standin.mapped().empty());
            CHECK(g.standin.calls().size() - calls_before == 5);
            g.standin.reset(); // the n-th call never came: disarm it
            break;
        }
        REQUIRE_FALSE(u.has_value());
        CHECK(q.windows() == windows_before);
        const auto mapped_after = g.standin.mapped();
        REQUIRE(mapped_after.size() == mapped_before.size());
        for (std::size_t i = 0; i < mapped_after.size(); ++i) {
            CHECK(mapped_after[i].gpa == mapped_before[i].gpa);
            CHECK(mapped_after[i].flags == mapped_before[i].flags);
            CHECK(mapped_after[i].advice == mapped_before[i].advice); // pinned
        }
    }

    // A failed pin leaves the window unpinned.
    REQUIRE(p.map_range(f.host(0), 0x100000, 4 * pg, true, true).has_value());
    f.standin.fail_nth_call(1, injected);
    REQUIRE_FALSE(p.pin_range(0x100000, 4 * pg).has_value());
    CHECK_FALSE(p.windows()[0].pinned);
}

TEST_CASE("a WHP that keeps failing from the n-th call on never brings an unmap's rollback to "
          "fatal(): what it will not put back is reported, and windows() follows WHP")
{
    const HRESULT injected = static_cast<HRESULT>(0x80370301);
    long rolled_back = 0, quarantined = 0;
    for (std::uint64_t n = 1;; ++n) {
        CAPTURE(n);
        WhpFixture g;
        auto& q = *g.partition;
        REQUIRE(q.map_range(g.host(0), 0x100000, 2 * pg, true, true).has_value());
        REQUIRE(q.map_range(g.host(2 * pg), 0x200000, 2 * pg, false, false).has_value());
        REQUIRE(q.map_range(g.host(4 * pg), 0x300000, 2 * pg, true, false).has_value());
        REQUIRE(q.pin_range(0x100000, 2 * pg).has_value());
        REQUIRE(q.pin_range(0x300000, 2 * pg).has_value());
        const auto windows_before = q.windows();
        const std::size_t calls_before = g.standin.calls().size();
        g.standin.fail_from_nth_call(n, injected);
        auto u = q.unmap_range(0x100000, 0x202000);
        g.standin.fail_from_nth_call(0, S_OK);
        const auto calls = g.standin.calls();
        const bool reached =
            std::any_of(calls.begin() + static_cast<std::ptrdiff_t>(calls_before), calls.end(),
                        [&](const StandinCall& c) { return c.result == injected; });
        // The books are WHP's: the same windows, pinned alike.
        const auto windows = q.windows();
        const auto mapped = g.standin.mapped();
        REQUIRE(windows.size() == mapped.size());
        for (std::size_t i = 0; i < windows.size(); ++i) {
            CHECK(windows[i].gpa == mapped[i].gpa);
            CHECK(windows[i].pinned == (mapped[i].advice != 0));
        }
        if (!reached) {
            REQUIRE(u.has_value());
            CHECK(mapped.empty());
            break;
        }
        REQUIRE_FALSE(u.has_value());
        if (u.error().code() != errc::quarantined) {
            ++rolled_back;
            CHECK(windows == windows_before);
            continue;
        }
        ++quarantined;
        CHECK(windows != windows_before);
        CHECK(u.error().full_message().find("would not put back") != std::string::npos);
        // What is left can still be unmapped, the books being right.
        for (const auto& w : windows) {
            if (w.pinned)
                REQUIRE(q.unpin_range(w.gpa, w.size).has_value());
            REQUIRE(q.unmap_range(w.gpa, w.size).has_value());
        }
        CHECK(g.standin.mapped().empty());
    }
    CHECK(rolled_back >= 1);
    CHECK(quarantined >= 1);
}

TEST_CASE("without WinHvPlatform.dll a VMM gets a clear error")
{
    auto api = os::WinHvPlatform::load(L"membacking-no-such-WinHvPlatform.dll");
    REQUIRE_FALSE(api.has_value());
    CHECK(api.error().message().find("Windows Hypervisor Platform is not installed") !=
          std::string::npos);
    CHECK(api.error().code() == std::error_code(ERROR_MOD_NOT_FOUND, std::system_category()));
    CHECK(error_of(WhpPartition::create(nullptr)) == errc::invalid_argument);
}

#include <membacking/membacking.hpp>

#include "place_device.hpp"
#include "platform.hpp"

#include <optional>

TEST_CASE("the Windows composition: WhpGuestMemoryManager keeps a WHP partition in sync")
{
    Standin standin;
    constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
    auto m = must(WhpGuestMemoryManager::builder()
                      .add_backing(RamBackingRequest({test::range(0, 2 * MiB)}))
                      .build(Length{8 * MiB}));
    auto whp = must(WhpPartition::create(handle));
    must(m.attach_partition(Vtl::vtl0, whp));
    const auto mapped = standin.mapped();
    REQUIRE(mapped.size() == 1);
    CHECK(mapped[0].gpa == 0);
    CHECK(mapped[0].size == 2 * MiB);
    CHECK(mapped[0].flags == (R | W | X));
    CHECK(standin.calls()[0].source == m.guest_memory().mapper()->base());
    // The guest's memory is the VMM's: a write through GuestMemory lands in the mapped range.
    REQUIRE(m.guest_memory().write_plain<std::uint32_t>(Gpa{0x1000}, 0xfeedf00d).has_value());
    std::uint32_t seen = 0;
    std::memcpy(&seen, m.guest_memory().mapper()->base() + 0x1000, sizeof(seen));
    CHECK(seen == 0xfeedf00d);
    // Read-only visibility is an unmap and a read-only map of that window.
    must(m.ram_visibility_control().set_ram_visibility(test::range(0, 2 * MiB),
                                                       RamVisibility::read_only));
    const auto after = standin.mapped();
    REQUIRE(after.size() == 1);
    CHECK(after[0].flags == (R | X));
    CHECK(test::error_of(m.guest_memory().write_plain<std::uint32_t>(Gpa{0x1000}, 1)) ==
          errc::read_only);
}

TEST_CASE("write-only PAM under WHP: the device below is mapped read-only, then writable again")
{
    Standin standin;
    constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
    auto m = must(WhpGuestMemoryManager::builder()
                      .x86_legacy_support(true)
                      .add_backing(RamBackingRequest({test::range(0, 4 * MiB)}))
                      .build(Length{8 * MiB}));
    auto whp = must(WhpPartition::create(handle));
    must(m.attach_partition(Vtl::vtl0, whp));
    const MemoryRange seg = x86_legacy::pam_segments[2];
    auto device =
        test::place_device(m, "rom", Gpa{seg.start()}, Length{0x4000}, test::make_object(0x4000));
    const auto flags_at_segment = [&]() -> std::optional<std::uint32_t> {
        for (const auto& w : standin.mapped())
            if (w.gpa == seg.start() && w.size == seg.size())
                return w.flags;
        return std::nullopt;
    };
    auto control = m.ram_visibility_control();
    must(control.set_ram_visibility(seg, RamVisibility::unmapped));
    CHECK(flags_at_segment() == std::optional<std::uint32_t>(R | W | X)); // the device, writable
    must(control.set_ram_visibility(seg, RamVisibility::write_only));
    CHECK(flags_at_segment() == std::optional<std::uint32_t>(R | X)); // capped: writes exit
    CHECK(test::error_of(m.guest_memory().write_plain<std::uint8_t>(Gpa{seg.start()}, 1)) ==
          errc::read_only);
    must(control.set_ram_visibility(seg, RamVisibility::unmapped));
    CHECK(flags_at_segment() == std::optional<std::uint32_t>(R | W | X));
    must(control.set_ram_visibility(seg, RamVisibility::read_write));
    CHECK(flags_at_segment() == std::optional<std::uint32_t>(R | W | X)); // the RAM
}
