/**
 * The partition-policy conformance suite: what every PartitionMapper must do, written once and
 * instantiated for each policy (MockPartition in test_partition, KvmPartition in test_kvm).
 *
 * A fixture F provides `std::shared_ptr<Partition> partition` and `std::byte* host(offset)`:
 * host memory (at least 64 pages, backed) to map. Nothing here looks inside a policy: only the
 * results of its calls say whether it behaved.
 */
#pragma once

#include <membacking/partition/partition_mapper.hpp>

#include "test_support.hpp"

#include <cstdint>

// At global scope: doctest's TEST_CASE_TEMPLATE_INVOKE must name the definition from the same
// namespace.
TEST_CASE_TEMPLATE_DEFINE("partition conformance", F, partition_conformance)
{
    using namespace membacking;
    using membacking::test::error_of;
    F f;
    auto& p = *f.partition;
    using P = std::remove_cvref_t<decltype(p)>;
    static_assert(PartitionMapper<P>);
    constexpr std::uint64_t pg = page_size;
    const std::uint64_t base = 0x100000;

    SUBCASE("windows map, and an overlapping one is refused without changing anything")
    {
        REQUIRE(p.map_range(f.host(0), base, 4 * pg, true, true).has_value());
        REQUIRE(p.map_range(f.host(8 * pg), base + 8 * pg, 4 * pg, false, false).has_value());
        CHECK(error_of(p.map_range(f.host(2 * pg), base + 2 * pg, 4 * pg, true, true)) ==
              errc::overlap);
        // The refused map left the first window whole: a partial unmap is still a split.
        CHECK(error_of(p.unmap_range(base, 2 * pg)) == errc::invalid_range);
        REQUIRE(p.unmap_range(base, 4 * pg).has_value());
        // The space it held is free again.
        REQUIRE(p.map_range(f.host(0), base + 2 * pg, 2 * pg, true, true).has_value());
        REQUIRE(p.unmap_range(base, 16 * pg).has_value()); // two windows and gaps at once
        REQUIRE(p.map_range(f.host(0), base, 16 * pg, true, false).has_value());
        REQUIRE(p.unmap_range(base, 16 * pg).has_value());
    }

    SUBCASE("unmapping nothing is fine; bad ranges are errors")
    {
        CHECK(p.unmap_range(base, 4 * pg).has_value());
        CHECK(error_of(p.map_range(f.host(0), base + 1, pg, true, true)) == errc::invalid_range);
        CHECK(error_of(p.map_range(f.host(0), base, 0, true, true)) == errc::invalid_range);
    }

    SUBCASE("many windows: slots or entries are reused after unmapping")
    {
        for (int round = 0; round < 3; ++round) {
            for (std::uint64_t i = 0; i < 16; ++i)
                REQUIRE(p.map_range(f.host(i * pg), base + i * 2 * pg, pg, true, true).has_value());
            REQUIRE(p.unmap_range(base, 32 * pg).has_value());
        }
    }

    if constexpr (partition_supports<PartitionFeatures::pin, P>) {
        SUBCASE("pin and unpin exact windows only")
        {
            REQUIRE(p.map_range(f.host(0), base, 4 * pg, true, true).has_value());
            REQUIRE(p.pin_range(base, 4 * pg).has_value());
            REQUIRE(p.unpin_range(base, 4 * pg).has_value());
            CHECK(error_of(p.pin_range(base, 2 * pg)) == errc::not_found);
            REQUIRE(p.unmap_range(base, 4 * pg).has_value());
        }
    }

    if constexpr (partition_supports<PartitionFeatures::dirty_log, P>) {
        SUBCASE("dirty logging yields one bit per page of a window")
        {
            REQUIRE(p.map_range(f.host(0), base, 65 * pg, true, true).has_value());
            REQUIRE(p.set_dirty_logging(true).has_value());
            auto log = p.take_dirty_log(base, 65 * pg);
            REQUIRE(log.has_value());
            CHECK(log->size() == 2);
            CHECK(error_of(p.take_dirty_log(base, pg)) == errc::not_found);
            REQUIRE(p.set_dirty_logging(false).has_value());
            REQUIRE(p.unmap_range(base, 65 * pg).has_value());
        }
    }

    if constexpr (partition_supports<PartitionFeatures::prefetch, P>) {
        SUBCASE("prefetch works or says it is unsupported, and changes no mapping")
        {
            REQUIRE(p.map_range(f.host(0), base, 4 * pg, true, true).has_value());
            auto r = p.prefetch_range(base, 4 * pg);
            CHECK((r.has_value() || error_of(r) == errc::unsupported));
            CHECK(error_of(p.unmap_range(base, 2 * pg)) == errc::invalid_range);
            REQUIRE(p.unmap_range(base, 4 * pg).has_value());
        }
    }
}
