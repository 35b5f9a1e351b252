// MockPartition: it records calls, keeps a hypervisor-like view, is strict about overlaps and
// partial unmaps, and fails the N-th call, or the next call of one kind, on request without
// changing anything.
#include <membacking/partition/mock.hpp>

#include "test_support.hpp"

using namespace membacking;
using Op = MockPartition::Op;

namespace {
void* va(std::uintptr_t v)
{
    return reinterpret_cast<void*>(v);
}
} // namespace

TEST_CASE("MockPartition records calls and keeps the mapped view")
{
    MockPartition p;
    REQUIRE(p.map_range(va(0x10000), 0x0, 0x4000, true, false).has_value());
    REQUIRE(p.map_range(va(0x20000), 0x8000, 0x1000, false, true).has_value());
    const auto calls = p.calls();
    REQUIRE(calls.size() == 2);
    CHECK(calls[0] == MockPartition::Call{Op::map, 0x0, 0x4000, va(0x10000), true, false});
    CHECK(calls[1].executable);
    REQUIRE(p.lookup(0x3fff).has_value());
    CHECK(p.lookup(0x3fff)->host_va == va(0x10000));
    CHECK_FALSE(p.lookup(0x4000).has_value());
    CHECK_FALSE(p.lookup(0x8000)->writable);
}

TEST_CASE("MockPartition rejects overlapping maps and partial unmaps, changing nothing")
{
    MockPartition p;
    REQUIRE(p.map_range(va(0x10000), 0x0, 0x4000, true, false).has_value());
    auto overlap = p.map_range(va(0x30000), 0x2000, 0x4000, true, false);
    REQUIRE_FALSE(overlap);
    CHECK(membacking::test::error_of(overlap) == errc::overlap);
    auto partial = p.unmap_range(0x0, 0x2000);
    REQUIRE_FALSE(partial);
    CHECK(membacking::test::error_of(partial) == errc::invalid_range);
    CHECK(p.windows().size() == 1);
    // An unmap may cover several whole windows and gaps.
    REQUIRE(p.map_range(va(0x50000), 0x8000, 0x1000, true, false).has_value());
    REQUIRE(p.unmap_range(0x0, 0x10000).has_value());
    CHECK(p.windows().empty());
}

TEST_CASE("MockPartition fails the next call of one kind, whatever comes before it")
{
    MockPartition p;
    REQUIRE(p.map_range(va(0x1000), 0x0, 0x1000, true, false).has_value());
    p.fail_next(Op::unmap, make_error(errc::resource_exhausted, "busy"));
    // Calls of other kinds go through, however many.
    REQUIRE(p.map_range(va(0x2000), 0x1000, 0x1000, true, false).has_value());
    REQUIRE(p.pin_range(0x1000, 0x1000).has_value());
    auto unmap = p.unmap_range(0x0, 0x1000);
    REQUIRE_FALSE(unmap);
    CHECK(unmap.error().message() == "busy");
    CHECK(p.lookup(0x0).has_value()); // changed nothing
    CHECK(p.calls().back() ==
          MockPartition::Call{Op::unmap, 0x0, 0x1000, nullptr, false, false, true});
    CHECK(p.unmap_range(0x0, 0x1000).has_value()); // only once

    // The default error names the kind; clear_failure disarms.
    p.fail_next(Op::map);
    auto map = p.map_range(va(0x3000), 0x3000, 0x1000, true, false);
    REQUIRE_FALSE(map);
    CHECK(membacking::test::error_of(map) == errc::resource_exhausted);
    CHECK(map.error().message() == "mock partition: injected map failure");
    p.fail_next(Op::map);
    p.clear_failure();
    CHECK(p.map_range(va(0x3000), 0x3000, 0x1000, true, false).has_value());
}

TEST_CASE("MockPartition fails the N-th call with the given error")
{
    MockPartition p;
    p.fail_nth_call(2, make_error(errc::resource_exhausted, "out of slots"));
    REQUIRE(p.map_range(va(0x1000), 0x0, 0x1000, true, false).has_value());
    auto second = p.map_range(va(0x2000), 0x1000, 0x1000, true, false);
    REQUIRE_FALSE(second);
    CHECK(second.error().message() == "out of slots");
    CHECK_FALSE(p.lookup(0x1000).has_value());
    CHECK(p.calls().back().failed);
    CHECK(p.map_range(va(0x2000), 0x1000, 0x1000, true, false).has_value()); // only once
}

TEST_CASE("MockPartition optional capabilities: pin and dirty logging")
{
    MockPartition p;
    REQUIRE(p.map_range(va(0x1000), 0x0, 0x4000, true, false).has_value());
    REQUIRE(p.pin_range(0x0, 0x4000).has_value());
    CHECK(p.lookup(0x0)->pinned);
    CHECK(membacking::test::error_of(p.pin_range(0x0, 0x1000)) ==
          errc::not_found); // not a whole window
    REQUIRE(p.set_dirty_logging(true).has_value());
    p.mark_dirty(0x2010);
    auto log = p.take_dirty_log(0x0, 0x4000);
    REQUIRE(log.has_value());
    REQUIRE(log->size() == 1);
    CHECK((*log)[0] == 0b100);
    auto again = p.take_dirty_log(0x0, 0x4000);
    CHECK((*again)[0] == 0); // cleared as read
    // The log belongs to the pages: a window unmapped and mapped again still reports them.
    p.mark_dirty(0x3000);
    REQUIRE(p.unpin_range(0x0, 0x4000).has_value());
    REQUIRE(p.unmap_range(0x0, 0x4000).has_value());
    REQUIRE(p.map_range(va(0x1000), 0x0, 0x4000, false, false).has_value());
    CHECK((*p.take_dirty_log(0x0, 0x4000))[0] == 0b1000);
    // Turning logging off discards it.
    p.mark_dirty(0x1000);
    REQUIRE(p.set_dirty_logging(false).has_value());
    REQUIRE(p.set_dirty_logging(true).has_value());
    CHECK((*p.take_dirty_log(0x0, 0x4000))[0] == 0);
}

// The conformance suite, for the mock.
#include "partition_conformance.hpp"

#include <sys/mman.h>

namespace {
struct MockFixture {
    MockFixture()
    {
        void* p = ::mmap(nullptr, 80 * page_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(p != MAP_FAILED);
        memory = static_cast<std::byte*>(p);
    }
    ~MockFixture() { ::munmap(memory, 80 * page_size); }
    std::byte* host(std::uint64_t offset) { return memory + offset; }
    std::shared_ptr<MockPartition> partition = std::make_shared<MockPartition>();
    std::byte* memory = nullptr;
};
} // namespace

TEST_CASE_TEMPLATE_INVOKE(partition_conformance, MockFixture);
