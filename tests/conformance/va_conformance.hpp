/**
 * The VA-policy conformance suite: what every VaPolicy must do, written once and instantiated for
 * each policy (LinuxMmap in test_va, WindowsPlaceholder in the Windows tests under Wine). These
 * are the reference's sparse_mmap tests that apply to every platform, plus the behaviour the
 * mapping manager relies on: replacement keeps what lies outside the new mapping, a partial unmap
 * keeps the rest of a mapping, protection changes keep contents, failures name the range.
 *
 * A fixture F provides:
 *   using Va = <the policy>;
 *   static bool reserved_and_inaccessible(const std::byte* p);   // the OS's own view of p
 * Accesses that must fault go through the guarded primitives, so a policy bug is a failed CHECK,
 * not a crash.
 */
#pragma once

#include <membacking/access/primitives.hpp>
#include <membacking/base/align.hpp>
#include <membacking/va/va_policy.hpp>

#include "test_support.hpp"

#include <cstdint>
#include <cstring>

namespace membacking::test {

/// A byte read through the guarded load: nullopt if it faults.
inline std::optional<std::uint8_t> peek(const std::byte* p)
{
    std::uint8_t v = 0;
    if (!access::try_load(p, v))
        return std::nullopt;
    return v;
}
/// A guarded store: false if it faults.
inline bool poke(std::byte* p, std::uint8_t v)
{
    return access::try_store(p, v);
}

} // namespace membacking::test

// At global scope: doctest's TEST_CASE_TEMPLATE_INVOKE must name the definition from the same
// namespace.
TEST_CASE_TEMPLATE_DEFINE("VA policy conformance", F, va_conformance)
{
    using namespace membacking;
    using membacking::test::error_of;
    using membacking::test::must;
    using membacking::test::peek;
    using membacking::test::poke;
    using Va = typename F::Va;
    static_assert(VaPolicy<Va>);
    access::install_fault_handler();
    constexpr std::uint64_t pg = page_size;
    const auto addr = [](const std::byte* p) { return reinterpret_cast<std::uintptr_t>(p); };

    SUBCASE("reference test_sparse_mapping: commit, write and unmap at both ends of many sizes")
    {
        for (std::uint64_t size :
             {std::uint64_t{1} << 20, std::uint64_t{2} << 20, (std::uint64_t{2} << 20) + pg,
              std::uint64_t{1} << 30, (std::uint64_t{1} << 30) + pg}) {
            CAPTURE(size);
            Va va = must(Va::reserve(size, 1));
            CHECK(va.size() == size); // quirk fix: the reference reports the rounded size
            for (std::uint64_t off : {pg, size - pg}) {
                must(va.commit_private(off, pg));
                std::memset(va.base() + off, 0xcc, pg);
                CHECK(va.base()[off + 17] == std::byte{0xcc});
                must(va.unmap(off, pg));
                CHECK(F::reserved_and_inaccessible(va.base() + off));
            }
        }
    }

    SUBCASE("reference test_sparse_mapping_minimum_alignment and default alignment")
    {
        CHECK(error_of(Va::reserve(pg, 0)) == errc::invalid_argument);
        CHECK(error_of(Va::reserve(pg, 3)) == errc::invalid_argument);
        CHECK(addr(must(Va::reserve(pg, 1)).base()) % pg == 0);
        CHECK(addr(must(Va::reserve(pg, 0x10000)).base()) % 0x10000 == 0);
        CHECK(addr(must(Va::reserve(pg, 0x200000)).base()) % 0x200000 == 0);
        CHECK(addr(must(Va::reserve(std::uint64_t{2} << 20, 1)).base()) % (2 << 20) == 0);
        CHECK(addr(must(Va::reserve(std::uint64_t{1} << 30, 1)).base()) % (1 << 30) == 0);
        CHECK(error_of(Va::reserve(0, 1)) == errc::invalid_argument);
    }

    SUBCASE("reference test_overlapping_mappings: any order of overlapping maps and unmaps")
    {
        Va va = must(Va::reserve(16 * pg, 1));
        const auto p = [](std::uint64_t n) { return n * page_size; };
        must(va.commit_private(p(1), p(4)));
        must(va.commit_private(p(1), p(2)));
        must(va.commit_private(p(2), p(3)));
        must(va.commit_private(p(0), p(16)));
        must(va.commit_private(p(8), p(8)));
        must(va.unmap(p(0xc), p(2)));
        must(va.commit_private(p(9), p(4)));
        must(va.unmap(p(3), p(0xb)));
        must(va.commit_private(p(5), p(4)));
        must(va.commit_private(p(6), p(2)));
        must(va.commit_private(p(6), p(1)));
        must(va.commit_private(p(4), p(3)));
        Mappable shm = must(Va::create_shared_memory(p(4), "overlap"));
        must(va.map_file(p(5), p(4), shm, 0, true));
        must(va.map_file(p(6), p(2), shm, 0, true));
        must(va.map_file(p(6), p(1), shm, 0, true));
        must(va.map_file(p(4), p(3), shm, 0, true));
        // What is mapped now: private 0-3, nothing 3-4, the file 4-9, nothing 9-0xe, private
        // 0xe-0x10. Every page is where it should be.
        for (std::uint64_t n = 0; n < 0x10; ++n) {
            CAPTURE(n);
            const bool mapped = n < 3 || (n >= 4 && n < 9) || n >= 0xe;
            CHECK(poke(va.base() + p(n), 1) == mapped);
        }
        // The file's pages: 4->0, 5->1, 6->2, 7->1, 8->3 (later maps replaced earlier ones).
        REQUIRE(poke(va.base() + p(5), 0x55));
        CHECK(peek(va.base() + p(7)) == 0x55);
        CHECK(peek(va.base() + p(4)) == 1);
        CHECK(peek(va.base() + p(6)) == 1);
        CHECK(peek(va.base() + p(8)) == 1);
    }

    SUBCASE("a file mapping is shared memory, and a replacement keeps what lies outside it")
    {
        Va a = must(Va::reserve(4 * pg, 1));
        Va b = must(Va::reserve(4 * pg, 1));
        Mappable shm = must(Va::create_shared_memory(4 * pg, "shared"));
        must(a.map_file(0, 4 * pg, shm, 0, true));
        must(b.map_file(pg, pg, shm, pg, true));
        for (std::uint64_t n = 0; n < 4; ++n)
            a.base()[n * pg + 5] = std::byte(0x40 + n);
        CHECK(b.base()[pg + 5] == std::byte{0x41});
        // Replace a's second page with private memory: it no longer sees the file, and the
        // pages before and after it still do.
        must(a.commit_private(pg, pg));
        CHECK(a.base()[pg + 5] == std::byte{0});
        CHECK(b.base()[pg + 5] == std::byte{0x41});
        CHECK(a.base()[5] == std::byte{0x40});
        CHECK(a.base()[2 * pg + 5] == std::byte{0x42});
        CHECK(a.base()[3 * pg + 5] == std::byte{0x43});
    }

    SUBCASE("a partial unmap keeps the rest of a mapping, at the right file offsets")
    {
        Va va = must(Va::reserve(8 * pg, 1));
        Mappable shm = must(Va::create_shared_memory(8 * pg, "partial"));
        must(va.map_file(pg, 6 * pg, shm, pg, true));
        for (std::uint64_t n = 1; n < 7; ++n)
            va.base()[n * pg] = std::byte(n);
        must(va.unmap(3 * pg, 2 * pg)); // the middle
        CHECK(F::reserved_and_inaccessible(va.base() + 3 * pg));
        CHECK(F::reserved_and_inaccessible(va.base() + 4 * pg));
        CHECK(peek(va.base() + pg) == 1);
        CHECK(peek(va.base() + 2 * pg) == 2);
        CHECK(peek(va.base() + 5 * pg) == 5);
        CHECK(peek(va.base() + 6 * pg) == 6);
        must(va.unmap(0, 2 * pg)); // the head of the head, and a gap before it
        CHECK_FALSE(peek(va.base() + pg));
        CHECK(peek(va.base() + 2 * pg) == 2);
        // Mapping the hole again shows the file's bytes that were written there before.
        must(va.map_file(3 * pg, 2 * pg, shm, 3 * pg, false));
        CHECK(peek(va.base() + 3 * pg) == 3);
        CHECK(peek(va.base() + 4 * pg) == 4);
        CHECK_FALSE(poke(va.base() + 3 * pg, 9)); // read-only
        must(va.unmap(0, 8 * pg));
        for (std::uint64_t n = 0; n < 8; ++n)
            CHECK(F::reserved_and_inaccessible(va.base() + n * pg));
    }

    SUBCASE("protect: read-only and back, on files and private memory, keeping contents")
    {
        Va va = must(Va::reserve(8 * pg, 1));
        Mappable shm = must(Va::create_shared_memory(4 * pg, "protect"));
        must(va.map_file(0, 4 * pg, shm, 0, true));
        must(va.commit_private(4 * pg, 4 * pg));
        for (std::uint64_t n = 0; n < 8; ++n)
            REQUIRE(poke(va.base() + n * pg, static_cast<std::uint8_t>(0x10 + n)));
        must(va.protect(pg, 6 * pg, false)); // part of each
        CHECK(poke(va.base(), 0x20));
        for (std::uint64_t n = 1; n < 7; ++n) {
            CHECK_FALSE(poke(va.base() + n * pg, 0x20));
            CHECK(peek(va.base() + n * pg) == 0x10 + n);
        }
        CHECK(poke(va.base() + 7 * pg, 0x27));
        must(va.protect(0, 8 * pg, true));
        for (std::uint64_t n = 0; n < 8; ++n) {
            CHECK(peek(va.base() + n * pg) == (n == 0 ? 0x20 : n == 7 ? 0x27 : 0x10 + n));
            CHECK(poke(va.base() + n * pg, 0x30));
        }
    }

    SUBCASE("private memory: committed pages read zero (reference 32/33)")
    {
        Va va = must(Va::reserve(4 * pg, 1));
        must(va.commit_private(0, 2 * pg));
        va.base()[10] = std::byte{7};
        CHECK(va.base()[pg + 10] == std::byte{0});
        CHECK(va.base()[10] == std::byte{7});
    }

    SUBCASE("unmap keeps the range reserved, and an unmapped access faults")
    {
        Va va = must(Va::reserve(4 * pg, 1));
        must(va.commit_private(0, pg));
        must(va.unmap(0, pg));
        CHECK(F::reserved_and_inaccessible(va.base()));
        CHECK_FALSE(peek(va.base()));
        must(va.unmap(0, 4 * pg)); // unmapping nothing is fine
    }

    SUBCASE("bad offsets are errors, not faults")
    {
        Va va = must(Va::reserve(4 * pg, 1));
        CHECK(error_of(va.commit_private(1, pg)) == errc::invalid_range);
        CHECK(error_of(va.commit_private(0, 0)) == errc::invalid_range);
        CHECK(error_of(va.commit_private(3 * pg, 2 * pg)) == errc::out_of_range);
        CHECK(error_of(va.map_file(0, pg, Mappable(), 0, true)) == errc::invalid_argument);
        Mappable shm = must(Va::create_shared_memory(pg, "bad"));
        CHECK(error_of(va.map_file(0, pg, shm, 1, true)) == errc::invalid_argument);
        CHECK(error_of(va.unmap(pg, 0)) == errc::invalid_range);
    }

    SUBCASE("object_size: what the OS says the object holds, which bounds a mapping's file range")
    {
        CHECK(must(Va::object_size(must(Va::create_shared_memory(3 * pg, "sized")))) == 3 * pg);
        Mappable shm = must(Va::create_shared_memory(16 * pg, "sized16"));
        CHECK(must(Va::object_size(shm)) == 16 * pg);
        CHECK(error_of(Va::object_size(Mappable())) == errc::invalid_argument);
        CHECK(detail::check_object_covers<Va>(shm, 0, 16 * pg));
        CHECK(detail::check_object_covers<Va>(shm, 15 * pg, pg));
        auto beyond = detail::check_object_covers<Va>(shm, 15 * pg, 2 * pg);
        REQUIRE_FALSE(beyond);
        CHECK(beyond.error().code() == errc::invalid_range);
        CHECK(beyond.error().message() ==
              "object range " + MemoryRange::hex(15 * pg) + "-" + MemoryRange::hex(17 * pg) +
                  " lies beyond the end of the object (" + MemoryRange::hex(16 * pg) + " bytes)");
        CHECK(error_of(detail::check_object_covers<Va>(shm, ~std::uint64_t{0} & ~(pg - 1),
                                                       2 * pg)) == errc::invalid_range);
    }
}
