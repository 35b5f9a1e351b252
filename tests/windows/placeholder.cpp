// WindowsPlaceholder under Wine: the VA conformance suite that LinuxMmap passes, then what is the
// placeholder policy's own: after 1,000 random maps, unmaps, commits and protection changes, a
// VirtualQuery walk of the reservation finds exactly one placeholder per gap and every mapped
// page holds its own section's (or its own private) bytes with the right protection; and every
// Win32 call of every operation, failed on purpose, leaves the range as it was.
#include <membacking/access/primitives.hpp>
#include <membacking/va/windows_placeholder.hpp>

#include "injecting_windows.hpp"
#include "test_support.hpp"
#include "va_conformance.hpp"

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace membacking;
using test::error_of;
using test::must;

namespace {

constexpr std::uint64_t pg = page_size;

/// True if the OS sees p as a placeholder: reserved, private, inaccessible.
bool is_placeholder(const std::byte* p)
{
    MEMORY_BASIC_INFORMATION info{};
    REQUIRE(::VirtualQuery(p, &info, sizeof(info)) == sizeof(info));
    return info.State == MEM_RESERVE && info.Type == MEM_PRIVATE;
}

struct PlaceholderFixture {
    using Va = WindowsPlaceholder<>;
    static bool reserved_and_inaccessible(const std::byte* p) { return is_placeholder(p); }
};

} // namespace

TEST_CASE_TEMPLATE_INVOKE(va_conformance, PlaceholderFixture);

namespace {

/// What one page of the reservation should be.
struct Page {
    enum Kind : std::uint8_t { gap, section, private_memory } kind = gap;
    std::uint64_t stamp = 0; ///< the 8 bytes at its start
    bool writable = false;
    friend bool operator==(const Page&, const Page&) = default;
};

/// A reservation of `pages` pages with its expected state, and sections whose every page
/// starts with a stamp naming the section and the page.
template <class Va>
struct Model {
    static constexpr std::uint64_t section_pages = 32;

    explicit Model(std::uint64_t n, std::size_t sections = 4)
        : va(must(Va::reserve(n * pg, 1))), pages(n)
    {
        access::install_fault_handler();
        for (std::size_t s = 0; s < sections; ++s) {
            Mappable m = must(Va::create_shared_memory(section_pages * pg, "model"));
            // Stamp every page through a view of our own, outside the reservation.
            void* v = ::MapViewOfFile(m.native_handle(), FILE_MAP_WRITE, 0, 0, 0);
            REQUIRE(v != nullptr);
            for (std::uint64_t i = 0; i < section_pages; ++i) {
                const std::uint64_t stamp = section_stamp(s, i);
                std::memcpy(static_cast<std::byte*>(v) + i * pg, &stamp, sizeof(stamp));
            }
            REQUIRE(::UnmapViewOfFile(v));
            objects.push_back(std::move(m));
        }
    }

    static std::uint64_t section_stamp(std::uint64_t s, std::uint64_t page)
    {
        return 0x5ec0000000000000ULL | (s << 16) | page;
    }

    // ---- operations: on the policy and on the model ----

    Result<void> map_file(std::uint64_t first, std::uint64_t n, std::size_t s,
                          std::uint64_t file_page, bool writable)
    {
        auto r = va.map_file(first * pg, n * pg, objects[s], file_page * pg, writable);
        if (r)
            for (std::uint64_t i = 0; i < n; ++i)
                pages[first + i] = {Page::section, section_stamp(s, file_page + i), writable};
        return r;
    }
    Result<void> commit(std::uint64_t first, std::uint64_t n)
    {
        auto r = va.commit_private(first * pg, n * pg);
        if (r) {
            ++generation;
            for (std::uint64_t i = 0; i < n; ++i) {
                // Fresh private memory reads zero; then it gets a stamp of its own.
                std::uint64_t zero = 1;
                REQUIRE(access::try_load(at(first + i), zero));
                REQUIRE(zero == 0);
                const std::uint64_t stamp = 0x9000000000000000ULL | (generation << 16) | i;
                REQUIRE(access::try_store(at(first + i), stamp));
                pages[first + i] = {Page::private_memory, stamp, true};
            }
        }
        return r;
    }
    Result<void> unmap(std::uint64_t first, std::uint64_t n)
    {
        auto r = va.unmap(first * pg, n * pg);
        if (r)
            for (std::uint64_t i = 0; i < n; ++i)
                pages[first + i] = {};
        return r;
    }
    Result<void> protect(std::uint64_t first, std::uint64_t n, bool writable)
    {
        auto r = va.protect(first * pg, n * pg, writable);
        if (r)
            for (std::uint64_t i = 0; i < n; ++i)
                pages[first + i].writable = writable;
        return r;
    }
    [[nodiscard]] bool wholly_mapped(std::uint64_t first, std::uint64_t n) const
    {
        for (std::uint64_t i = 0; i < n; ++i)
            if (pages[first + i].kind == Page::gap)
                return false;
        return true;
    }

    std::byte* at(std::uint64_t page) const { return va.base() + page * pg; }

    // ---- checks ----

    /// The OS's view of the reservation: every gap of the model is exactly one placeholder (its
    /// own allocation, nothing more, nothing less); every mapped page is committed with the
    /// model's protection and kind.
    void check_layout() const
    {
        std::vector<std::pair<std::uint64_t, std::uint64_t>> want_gaps, got_gaps;
        for (std::uint64_t i = 0; i < pages.size();) {
            if (pages[i].kind != Page::gap) {
                ++i;
                continue;
            }
            std::uint64_t j = i;
            while (j < pages.size() && pages[j].kind == Page::gap)
                ++j;
            want_gaps.emplace_back(i, j);
            i = j;
        }
        const std::byte* p = va.base();
        const std::byte* const end = va.base() + pages.size() * pg;
        while (p < end) {
            MEMORY_BASIC_INFORMATION info{};
            REQUIRE(::VirtualQuery(p, &info, sizeof(info)) == sizeof(info));
            const auto* region = static_cast<const std::byte*>(info.BaseAddress);
            const std::uint64_t first = static_cast<std::uint64_t>(region - va.base()) / pg;
            const std::uint64_t last =
                std::min<std::uint64_t>(first + info.RegionSize / pg, pages.size());
            if (info.State == MEM_RESERVE) {
                CAPTURE(first);
                CHECK(info.AllocationBase == info.BaseAddress); // a placeholder of its own
                CHECK(info.Type == MEM_PRIVATE);
                got_gaps.emplace_back(first, last);
            } else {
                REQUIRE(info.State == MEM_COMMIT);
                for (std::uint64_t i = first; i < last; ++i) {
                    CAPTURE(i);
                    CHECK(pages[i].kind != Page::gap);
                    CHECK(info.Type == (pages[i].kind == Page::section ? MEM_MAPPED : MEM_PRIVATE));
                    CHECK(info.Protect ==
                          static_cast<DWORD>(pages[i].writable ? PAGE_READWRITE : PAGE_READONLY));
                }
            }
            p = region + info.RegionSize;
        }
        CHECK(got_gaps == want_gaps);
    }

    /// Every mapped page holds its stamp and takes writes exactly if writable; gaps fault.
    void check_contents() const
    {
        for (std::uint64_t i = 0; i < pages.size(); ++i) {
            CAPTURE(i);
            std::uint64_t v = 0;
            const bool readable = access::try_load(at(i), v);
            CHECK(readable == (pages[i].kind != Page::gap));
            if (!readable)
                continue;
            CHECK(v == pages[i].stamp);
            // Write the same bytes back: harmless, and it must fault exactly when read-only.
            CHECK(access::try_store(at(i), v) == pages[i].writable);
        }
    }

    /// The policy's books agree with the model page by page.
    void check_books() const
    {
        std::vector<Page::Kind> kinds(pages.size(), Page::gap);
        for (const auto& piece : va.pieces())
            for (std::uint64_t o = piece.offset; o < piece.end; o += pg)
                kinds[o / pg] = piece.is_private() ? Page::private_memory : Page::section;
        for (std::uint64_t i = 0; i < pages.size(); ++i)
            CHECK(kinds[i] == pages[i].kind);
    }

    void check() const
    {
        check_layout();
        check_contents();
        check_books();
    }

    Va va;
    std::vector<Page> pages;
    std::vector<Mappable> objects;
    std::uint64_t generation = 0;
};

} // namespace

TEST_CASE("1,000 random operations: one placeholder per gap, every page its own bytes")
{
    constexpr std::uint64_t n_pages = 96;
    Model<WindowsPlaceholder<>> m(n_pages);
    const std::uint64_t seed = 0x6d656d6261636b; // fixed: a failure reproduces
    std::mt19937_64 rng(seed);
    const auto pick = [&](std::uint64_t lo, std::uint64_t hi) {
        return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng);
    };
    int maps = 0, unmaps = 0, commits = 0, protects = 0, refused = 0;
    for (int op = 0; op < 1000; ++op) {
        const std::uint64_t len = pick(1, 24);
        const std::uint64_t first = pick(0, n_pages - len);
        const std::uint64_t kind = pick(0, 99);
        CAPTURE(op);
        CAPTURE(first);
        CAPTURE(len);
        if (kind < 40) {
            const std::uint64_t s = pick(0, m.objects.size() - 1);
            const std::uint64_t file_page = pick(0, m.section_pages - len);
            CAPTURE(s);
            REQUIRE(m.map_file(first, len, s, file_page, pick(0, 3) != 0).has_value());
            ++maps;
        } else if (kind < 55) {
            REQUIRE(m.commit(first, len).has_value());
            ++commits;
        } else if (kind < 85) {
            REQUIRE(m.unmap(first, len).has_value());
            ++unmaps;
        } else {
            const bool writable = pick(0, 1) != 0;
            if (m.wholly_mapped(first, len)) {
                REQUIRE(m.protect(first, len, writable).has_value());
                ++protects;
            } else {
                // Not wholly mapped: refused, and nothing changes (checked below).
                CHECK(error_of(m.va.protect(first * pg, len * pg, writable)) == errc::unmapped);
                ++refused;
            }
        }
        m.check();
    }
    MESSAGE(maps << " maps, " << commits << " commits, " << unmaps << " unmaps, " << protects
                 << " protects, " << refused << " refused");
    CHECK(maps > 300);
    CHECK(protects > 30);
    // And everything can go.
    REQUIRE(m.unmap(0, n_pages).has_value());
    m.check();
}

namespace {
using InjectedVa = WindowsPlaceholder<test::InjectingWindows>;

/// A layout with every kind of neighbour: view A [0,4), private P [4,6), gap [6,8), view B
/// [8,12) from its section's page 4, gap [12,16).
void standard_layout(Model<InjectedVa>& m)
{
    REQUIRE(m.map_file(0, 4, 0, 0, true).has_value());
    REQUIRE(m.commit(4, 2).has_value());
    REQUIRE(m.map_file(8, 4, 1, 4, false).has_value());
}

/// Runs `op` with the n-th Win32 call failing, for n = 1, 2, ... until an attempt makes no call
/// fail; each failed attempt must leave the model's state exactly (private pages whose release
/// the failure followed come back zero-filled: accepted, and only there).
template <class Op, class Setup = void (*)(Model<InjectedVa>&)>
void every_call_fails(
    Op&& op, Setup&& setup = [](Model<InjectedVa>&) {})
{
    for (std::int64_t n = 1;; ++n) {
        CAPTURE(n);
        Model<InjectedVa> m(16, 2);
        standard_layout(m);
        setup(m);
        const std::vector<Page> before = m.pages;
        test::InjectingWindows::reset();
        test::InjectingWindows::fail_nth(n, ERROR_COMMITMENT_LIMIT);
        auto r = op(m);
        const bool fired = test::InjectingWindows::fired;
        test::InjectingWindows::reset();
        if (!fired) {
            REQUIRE(r.has_value());
            m.check();
            MESSAGE("succeeded once " << n - 1 << " calls were allowed");
            return;
        }
        REQUIRE_FALSE(r.has_value());
        CHECK(r.error().code() == std::error_code(ERROR_COMMITMENT_LIMIT, std::system_category()));
        m.pages = before; // the operation must have changed nothing
        for (std::uint64_t i = 0; i < m.pages.size(); ++i) {
            std::uint64_t v = 0;
            if (m.pages[i].kind == Page::private_memory && access::try_load(m.at(i), v) && v == 0)
                m.pages[i].stamp = 0; // released, then committed again by the rollback
        }
        m.check();
    }
}
} // namespace

TEST_CASE("every Win32 call of a map can fail, and the range stays as it was")
{
    every_call_fails([](Model<InjectedVa>& m) { return m.map_file(2, 8, 1, 0, true); });
    every_call_fails([](Model<InjectedVa>& m) { return m.map_file(9, 2, 0, 8, true); });
}

TEST_CASE("every Win32 call of an unmap can fail, and the range stays as it was")
{
    every_call_fails([](Model<InjectedVa>& m) { return m.unmap(1, 10); });
    every_call_fails([](Model<InjectedVa>& m) { return m.unmap(9, 1); });
}

TEST_CASE("every Win32 call of a commit or a protection change can fail, and nothing changes")
{
    every_call_fails([](Model<InjectedVa>& m) { return m.commit(3, 6); });
    every_call_fails([](Model<InjectedVa>& m) { return m.protect(1, 4, false); });
    every_call_fails([](Model<InjectedVa>& m) { return m.protect(9, 2, true); });
    // Whole views: in place within the mapped protection, re-mapped beyond it.
    every_call_fails([](Model<InjectedVa>& m) { return m.protect(0, 4, false); });
    every_call_fails([](Model<InjectedVa>& m) { return m.protect(8, 4, true); });
    // A view mapped writable, made read-only in place, then partly unmapped: its head and tail
    // come back read-only, and become writable again in place.
    every_call_fails([](Model<InjectedVa>& m) { return m.protect(0, 1, true); },
                     [](Model<InjectedVa>& m) {
                         REQUIRE(m.protect(0, 4, false).has_value());
                         REQUIRE(m.unmap(1, 2).has_value());
                     });
}

TEST_CASE("a partial unmap of a view re-maps its head and tail from the same section")
{
    Model<WindowsPlaceholder<>> m(16);
    REQUIRE(m.map_file(2, 10, 3, 5, true).has_value());
    REQUIRE(m.unmap(5, 3).has_value());
    m.check();
    const auto pieces = m.va.pieces();
    REQUIRE(pieces.size() == 2);
    CHECK(pieces[0].offset == 2 * pg);
    CHECK(pieces[0].end == 5 * pg);
    CHECK(pieces[0].file_offset == 5 * pg);
    CHECK(pieces[1].offset == 8 * pg);
    CHECK(pieces[1].end == 12 * pg);
    CHECK(pieces[1].file_offset == 11 * pg);
    CHECK(pieces[0].object == pieces[1].object);
}

TEST_CASE("the reservation's alignment, objects and hints")
{
    using Va = WindowsPlaceholder<>;
    Va big = must(Va::reserve(std::uint64_t{3} << 20, std::uint64_t{4} << 20));
    CHECK(reinterpret_cast<std::uintptr_t>(big.base()) % (std::uint64_t{4} << 20) == 0);
    CHECK(big.size() == std::uint64_t{3} << 20);
    // Trimmed: nothing of ours right before or after the reservation.
    MEMORY_BASIC_INFORMATION info{};
    REQUIRE(::VirtualQuery(big.base() - pg, &info, sizeof(info)) == sizeof(info));
    CHECK(info.AllocationBase != big.base());
    REQUIRE(::VirtualQuery(big.base() + big.size(), &info, sizeof(info)) == sizeof(info));
    CHECK(info.AllocationBase != big.base());
    CHECK(is_placeholder(big.base()));
    CHECK(is_placeholder(big.base() + big.size() - pg));

    CHECK(error_of(Va::create_shared_memory(0, "empty")) == errc::invalid_argument);
    CHECK(error_of(Va::create_hugetlb_memory(std::uint64_t{2} << 20, "huge", 2 << 20)) ==
          errc::unsupported);
    Va va = must(Va::reserve(4 * pg, 1));
    CHECK(error_of(va.advise_hugepages(0, pg)) == errc::unsupported);
    CHECK(error_of(va.bind_numa(0, pg, 0)) == errc::unsupported);
    CHECK(error_of(va.set_name(0, pg, "x")) == errc::unsupported);
    CHECK(error_of(va.protect(0, pg, true)) == errc::unmapped);
}

namespace {
struct NoPlaceholders : os::WindowsSyscalls {
    static bool has_placeholders() noexcept { return false; }
};
} // namespace

TEST_CASE("without the placeholder API, reserve says so")
{
    auto r = WindowsPlaceholder<NoPlaceholders>::reserve(pg, 1);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code() == errc::unsupported);
    CHECK(r.error().message().find("Windows 10 1803") != std::string::npos);
}

TEST_CASE("each Win32 call of an aligned reservation can fail, with an error")
{
    test::InjectingWindows::reset();
    for (std::int64_t n = 1; n <= 5; ++n) {
        CAPTURE(n);
        test::InjectingWindows::fail_nth(n);
        auto r = InjectedVa::reserve(std::uint64_t{3} << 20, std::uint64_t{4} << 20);
        const bool fired = test::InjectingWindows::fired;
        test::InjectingWindows::reset();
        CHECK(r.has_value() != fired);
    }
}
