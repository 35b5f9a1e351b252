// MappingManager and VaMapper: the reference's mapping-manager tests that apply (§11, 15-30),
// the private-memory single-mapper rule, and every rollback path, driven through the real Linux
// VA policy with failures injected at the syscall seam.
#include <membacking/guest_memory.hpp>
#include <membacking/manager/guest_memory_manager.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/partition/mock.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/va/linux_mmap.hpp>

#include "injecting_syscalls.hpp"
#include "test_support.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <sys/mman.h>
#include <vector>

using namespace membacking;
using test::InjectingSyscalls;
using test::must;
using test::range;
using Va = LinuxMmap<InjectingSyscalls>;
using Mapper = VaMapper<Va>;
using Memory = GuestMemory<Mapper>;
using Ids = std::vector<std::uint64_t>;

namespace {

struct Fixture {
    Fixture() { InjectingSyscalls::reset(); }
    ~Fixture() { InjectingSyscalls::reset(); }

    MappingManager<Va> mm = must(MappingManager<Va>::create(0x100000));
    Mappable shm = must(Va::create_shared_memory(0x100000, "mm-test"));

    ActiveMapping file(std::uint64_t start, std::uint64_t end, std::uint64_t file_offset = 0,
                       bool writable = true)
    {
        return {range(start, end),
                MappingBacking::file(shm, Offset{file_offset}),
                writable,
                MappingType::Ram,
                {},
                RegionId{1}};
    }
    static ActiveMapping private_memory(std::uint64_t start, std::uint64_t end,
                                        bool writable = true)
    {
        return {range(start, end), MappingBacking::private_memory(), writable, MappingType::Ram, {},
                RegionId{1}};
    }
    /// What a raw look at the mapper's VA says: is gpa accessible right now (no fault handling)?
    static bool resident(const std::shared_ptr<Mapper>& m, std::uint64_t gpa)
    {
        std::uint8_t v = 0;
        return access::try_load(m->base() + gpa, v);
    }
};

} // namespace

TEST_CASE("reference 15/30: an eager mapper gets existing mappings replayed")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto eager = must(f.mm.new_mapper(MapperMode::eager));
    CHECK(eager->is_eager());
    CHECK(Fixture::resident(eager, 0x8000));
    CHECK(f.mm.holders_at(0) == Ids{eager->id()});
}

TEST_CASE("reference 16/17: a lazy mapper gets nothing until it faults; adds go to eager only")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto lazy = must(f.mm.new_mapper(MapperMode::lazy));
    auto eager = must(f.mm.new_mapper(MapperMode::eager));
    CHECK_FALSE(Fixture::resident(lazy, 0));
    must(f.mm.add_mapping(f.file(0x20000, 0x30000, 0x20000)));
    CHECK(Fixture::resident(eager, 0x20000));
    CHECK_FALSE(Fixture::resident(lazy, 0x20000));
    CHECK(f.mm.holders_at(0x20000) == Ids{eager->id()});
}

TEST_CASE("reference 21/29: a lazy fault fetches the mapping and the access is retried")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto lazy = must(f.mm.new_mapper(MapperMode::lazy));
    auto eager = must(f.mm.new_mapper(MapperMode::eager));
    REQUIRE(Memory(eager).write_plain<std::uint32_t>(Gpa{0x1000}, 0xfeedf00d).has_value());
    auto v = Memory(lazy).read_plain<std::uint32_t>(Gpa{0x1000});
    REQUIRE(v.has_value());
    CHECK(*v == 0xfeedf00d);
    CHECK(Fixture::resident(lazy, 0x1000));
    CHECK(f.mm.stats().lazy_faults == 1);
    // The whole mapping came in (as in the reference), so the next page costs no fault.
    CHECK(Memory(lazy).read_plain<std::uint8_t>(Gpa{0xf000}).has_value());
    CHECK(f.mm.stats().lazy_faults == 1);
}

TEST_CASE("reference 22/27: a gap is no mapping, for lazy and eager mappers alike")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto lazy = must(f.mm.new_mapper(MapperMode::lazy));
    auto eager = must(f.mm.new_mapper(MapperMode::eager));
    CHECK(lazy->resolve_fault(0x10000, false) == errc::unmapped);
    CHECK(eager->resolve_fault(0x10000, false) == errc::unmapped);
    auto r = Memory(lazy).read_plain<std::uint8_t>(Gpa{0x18000});
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::unmapped);
    CHECK(r.error().gpa == Gpa{0x18000});
}

TEST_CASE("reference 18/19/20: upgrading a lazy mapper replays, then it gets every change")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto m = must(f.mm.new_mapper(MapperMode::lazy));
    must(f.mm.upgrade_to_eager(*m));
    CHECK(m->is_eager());
    CHECK(Fixture::resident(m, 0));
    must(f.mm.upgrade_to_eager(*m)); // already eager: nothing to do
    must(f.mm.add_mapping(f.file(0x40000, 0x41000)));
    CHECK(Fixture::resident(m, 0x40000));
}

TEST_CASE("reference 23: removing a mapping invalidates it in eager and lazy mappers")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto eager = must(f.mm.new_mapper(MapperMode::eager));
    auto lazy = must(f.mm.new_mapper(MapperMode::lazy));
    REQUIRE(Memory(lazy).read_plain<std::uint8_t>(Gpa{0}).has_value()); // fault it in
    must(f.mm.remove_mappings(range(0, 0x10000)));
    CHECK_FALSE(Fixture::resident(eager, 0));
    CHECK_FALSE(Fixture::resident(lazy, 0));
    CHECK(membacking::test::error_of(Memory(lazy).read_plain<std::uint8_t>(Gpa{0})) ==
          errc::unmapped);
    CHECK(membacking::test::error_of(Memory(eager).read_plain<std::uint8_t>(Gpa{0})) ==
          errc::unmapped);
}

TEST_CASE("removing part of a mapping splits it and keeps the rest mapped with its offsets")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x4000, 0x8000)));
    auto eager = must(f.mm.new_mapper(MapperMode::eager));
    must(f.mm.remove_mappings(range(0x1000, 0x2000)));
    const auto maps = f.mm.mappings();
    REQUIRE(maps.size() == 2);
    CHECK(maps[1].gpa == range(0x2000, 0x4000));
    CHECK(maps[1].backing.file_offset == 0xa000);
    CHECK(Fixture::resident(eager, 0));
    CHECK_FALSE(Fixture::resident(eager, 0x1000));
    CHECK(Fixture::resident(eager, 0x2000));
}

TEST_CASE("reference 24: a failed replay into a new eager mapper leaves no trace")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x1000)));
    must(f.mm.add_mapping(f.file(0x2000, 0x3000)));
    InjectingSyscalls::fail_mmap(3); // reserve, replay #1, replay #2 <- fails
    auto failed = f.mm.new_mapper(MapperMode::eager);
    REQUIRE_FALSE(failed);
    CHECK(membacking::test::error_of(failed) == std::errc::not_enough_memory);
    CHECK(f.mm.mapper_count() == 0);
    CHECK(f.mm.holders_at(0).empty());
    auto ok = must(f.mm.new_mapper(MapperMode::eager));
    CHECK(Fixture::resident(ok, 0));
    CHECK(Fixture::resident(ok, 0x2000));
}

TEST_CASE("reference 25: a failed add in the second eager mapper is undone in the first")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    auto b = must(f.mm.new_mapper(MapperMode::eager));
    InjectingSyscalls::fail_mmap(2);
    auto r = f.mm.add_mapping(f.file(0, 0x1000));
    REQUIRE_FALSE(r);
    CHECK_FALSE(Fixture::resident(a, 0));
    CHECK_FALSE(Fixture::resident(b, 0));
    CHECK(f.mm.mappings().empty());
}

TEST_CASE("a failed replacement gives the first mapper its old memory back")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    auto b = must(f.mm.new_mapper(MapperMode::eager));
    must(f.mm.add_mapping(f.file(0, 0x3000, 0)));
    REQUIRE(Memory(a).write_plain<std::uint8_t>(Gpa{0x1000}, 0x11).has_value());
    Mappable other = must(Va::create_shared_memory(0x1000, "other"));
    InjectingSyscalls::fail_mmap(2);
    auto r = f.mm.add_mapping({range(0x1000, 0x2000),
                               MappingBacking::file(other, Offset{0}),
                               true,
                               MappingType::Ram,
                               {},
                               RegionId{1}});
    REQUIRE_FALSE(r);
    CHECK(test::value_of(Memory(a).read_plain<std::uint8_t>(Gpa{0x1000})) == 0x11);
    CHECK(test::value_of(Memory(b).read_plain<std::uint8_t>(Gpa{0x1000})) == 0x11);
    REQUIRE(f.mm.mappings().size() == 1);
    // Without the failure the replacement lands in both, atomically.
    must(f.mm.add_mapping({range(0x1000, 0x2000),
                           MappingBacking::file(other, Offset{0}),
                           true,
                           MappingType::Ram,
                           {},
                           RegionId{1}}));
    CHECK(test::value_of(Memory(b).read_plain<std::uint8_t>(Gpa{0x1000})) == 0);
    CHECK(f.mm.mappings().size() == 3);
}

TEST_CASE("a failed invalidation in the second mapper is undone in the first")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    auto b = must(f.mm.new_mapper(MapperMode::eager));
    must(f.mm.add_mapping(f.file(0, 0x1000)));
    InjectingSyscalls::fail_mmap(2);
    REQUIRE_FALSE(f.mm.remove_mappings(range(0, 0x1000)));
    CHECK(Fixture::resident(a, 0));
    CHECK(Fixture::resident(b, 0));
    CHECK(f.mm.mappings().size() == 1);
}

TEST_CASE("reference 26: a failed upgrade leaves the mapper lazy with what it already has")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x1000)));
    must(f.mm.add_mapping(f.file(0x2000, 0x3000)));
    auto m = must(f.mm.new_mapper(MapperMode::lazy));
    InjectingSyscalls::fail_mmap(2);
    REQUIRE_FALSE(f.mm.upgrade_to_eager(*m));
    CHECK_FALSE(m->is_eager());
    CHECK(f.mm.holders_at(0) == Ids{m->id()});
    CHECK(f.mm.holders_at(0x2000).empty());
    must(f.mm.add_mapping(f.file(0x4000, 0x5000)));
    CHECK_FALSE(Fixture::resident(m, 0x4000)); // still lazy: nothing pushed
}

TEST_CASE("reference 28: dropping a mapper deregisters it")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x1000)));
    auto m = must(f.mm.new_mapper(MapperMode::eager));
    CHECK(f.mm.mapper_count() == 1);
    m.reset();
    CHECK(f.mm.mapper_count() == 0);
    CHECK(f.mm.holders_at(0).empty());
}

TEST_CASE("mapper ids are never reused (the reference's slab reuses keys)")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::lazy));
    const std::uint64_t first = a->id();
    a.reset();
    auto b = must(f.mm.new_mapper(MapperMode::lazy));
    CHECK(b->id() != first);
}

TEST_CASE("private memory lives in exactly one mapper")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    must(f.mm.add_mapping(Fixture::private_memory(0, 0x2000)));
    auto second = f.mm.new_mapper(MapperMode::lazy);
    REQUIRE_FALSE(second);
    CHECK(membacking::test::error_of(second) == errc::conflict);
    REQUIRE(Memory(a).write_plain<std::uint64_t>(Gpa{0x1000}, 5).has_value());
    CHECK(test::value_of(Memory(a).read_plain<std::uint64_t>(Gpa{0x1000})) == 5);
    must(f.mm.remove_mappings(range(0, 0x2000)));
    auto b = must(f.mm.new_mapper(MapperMode::lazy)); // no private memory any more
    auto priv = f.mm.add_mapping(Fixture::private_memory(0, 0x1000));
    REQUIRE_FALSE(priv);
    CHECK(membacking::test::error_of(priv) == errc::conflict);
}

TEST_CASE("read-only private memory is mapped read-only (it is committed read-write first)")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    must(f.mm.add_mapping(Fixture::private_memory(0, 0x2000, false)));
    CHECK(test::error_of(Memory(a).write_plain<std::uint64_t>(Gpa{0x1000}, 5)) == errc::read_only);
    CHECK(test::value_of(Memory(a).read_plain<std::uint64_t>(Gpa{0x1000})) == 0);
    // The protection step fails: nothing stays mapped, and the error says why.
    must(f.mm.remove_mappings(range(0, 0x2000)));
    InjectingSyscalls::fail_mprotect(1, ENOMEM);
    auto failed = f.mm.add_mapping(Fixture::private_memory(0, 0x2000, false));
    REQUIRE_FALSE(failed);
    CHECK(membacking::test::error_of(failed) == std::errc::not_enough_memory);
    CHECK_FALSE(Fixture::resident(a, 0x1000));
}

TEST_CASE("a mapping outside the guest address space is refused")
{
    Fixture f;
    auto r = f.mm.add_mapping(f.file(0xff000, 0x101000));
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::out_of_range);
}

TEST_CASE("a mapper outliving its manager sees nothing: shutdown unmaps everything")
{
    std::shared_ptr<Mapper> survivor;
    {
        Fixture f;
        must(f.mm.add_mapping(f.file(0, 0x1000)));
        survivor = must(f.mm.new_mapper(MapperMode::eager));
        CHECK(Fixture::resident(survivor, 0));
    }
    CHECK_FALSE(Fixture::resident(survivor, 0));
    auto r = Memory(survivor).read_plain<std::uint8_t>(Gpa{0});
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::unmapped);
}

TEST_CASE("an explicit NUMA binding that fails fails the mapping; THP advice is best effort")
{
    Fixture f;
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    ActiveMapping m = f.file(0, 0x2000);
    m.policy.numa_node = 0;
    InjectingSyscalls::mbind_plan = test::Plan{0, EINVAL};
    REQUIRE_FALSE(f.mm.add_mapping(m));
    CHECK_FALSE(Fixture::resident(a, 0));
    InjectingSyscalls::reset();
    m.policy.transparent_hugepages = true;
    InjectingSyscalls::madvise_plan = test::Plan{0, EINVAL};
    must(f.mm.add_mapping(m));
    CHECK(Fixture::resident(a, 0));
    CHECK(f.mm.stats().hint_failures == 1);
}

TEST_CASE("a mapper the host refuses to invalidate at shutdown (mmap and mprotect both fail) is "
          "left mapped and counted in teardown_leaks(): a surviving handle reads the memory as "
          "it was, nothing is fatal, and its range is never a hole")
{
    std::shared_ptr<Mapper> survivor;
    const std::uint64_t leaks = MappingManager<Va>::teardown_leaks();
    {
        Fixture f;
        must(f.mm.add_mapping(f.file(0, 0x1000)));
        survivor = must(f.mm.new_mapper(MapperMode::eager));
        REQUIRE(Memory(survivor).write_plain<std::uint32_t>(Gpa{0x10}, 0x5eed));
        InjectingSyscalls::fail_mmap(1);     // the whole-range replacement
        InjectingSyscalls::fail_mprotect(1); // and the in-place PROT_NONE
        f.mm.shut_down();
        CHECK(InjectingSyscalls::mmap_plan.fired);
        CHECK(InjectingSyscalls::mprotect_plan.fired);
    }
    CHECK(MappingManager<Va>::teardown_leaks() == leaks + 1);
    CHECK(survivor->quarantined());
    // Still mapped, the bytes as they were; the part that was never mapped faults to an error.
    CHECK(Memory(survivor).read_plain<std::uint32_t>(Gpa{0x10}).value() == 0x5eed);
    auto r = Memory(survivor).read_plain<std::uint8_t>(Gpa{0x2000});
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::quarantined);
    // No hole: the whole reservation is still mapped (madvise fails with ENOMEM on a gap).
    CHECK(::madvise(survivor->base(), 0x100000, MADV_NORMAL) == 0);
}

TEST_CASE("a manager refused at shutdown by the host counts only the mappers it could not "
          "invalidate in teardown_leaks()")
{
    std::shared_ptr<Mapper> first, second;
    const std::uint64_t leaks = MappingManager<Va>::teardown_leaks();
    {
        Fixture f;
        must(f.mm.add_mapping(f.file(0, 0x1000)));
        first = must(f.mm.new_mapper(MapperMode::eager));
        second = must(f.mm.new_mapper(MapperMode::eager));
        InjectingSyscalls::fail_mmap(1);     // only the first mapper's replacement fails, and the
        InjectingSyscalls::fail_mprotect(1); // in-place PROT_NONE too
        f.mm.shut_down();
    }
    CHECK(MappingManager<Va>::teardown_leaks() == leaks + 1);
    CHECK(first->quarantined());
    CHECK(Fixture::resident(first, 0));
    CHECK_FALSE(second->quarantined());
    CHECK_FALSE(Fixture::resident(second, 0));
    // Without a failure nothing is counted.
    {
        Fixture f;
        must(f.mm.add_mapping(f.file(0, 0x1000)));
        auto third = must(f.mm.new_mapper(MapperMode::eager));
        f.mm.shut_down();
        CHECK_FALSE(Fixture::resident(third, 0));
    }
    CHECK(MappingManager<Va>::teardown_leaks() == leaks + 1);
}

TEST_CASE("GuestMemoryManager: a teardown the host refuses leaves a surviving GuestMemory "
          "handle reading the memory as it was, and GuestMemoryManager::teardown_leaks() "
          "counts it")
{
    using Manager = GuestMemoryManager<NestedPriority, Va, MockPartition>;
    InjectingSyscalls::reset();
    const std::uint64_t leaks = Manager::teardown_leaks();
    std::optional<Manager::Memory> survivor;
    {
        auto m = must(Manager::builder()
                          .add_backing(RamBackingRequest({range(0, 0x100000)}))
                          .build(Length{0x200000}));
        survivor = m.guest_memory();
        REQUIRE(survivor->write_plain<std::uint64_t>(Gpa{0x1000}, 0xfeedface));
        InjectingSyscalls::fail_mmap(1);     // the primary's whole-range replacement
        InjectingSyscalls::fail_mprotect(1); // and its in-place PROT_NONE
    }                                        // ~GuestMemoryManager: not fatal
    InjectingSyscalls::reset();
    CHECK(Manager::teardown_leaks() == leaks + 1);
    CHECK(survivor->mapper()->quarantined());
    CHECK(survivor->read_plain<std::uint64_t>(Gpa{0x1000}).value() == 0xfeedface);
    auto r = survivor->read_plain<std::uint8_t>(Gpa{0x180000}); // beyond RAM: never mapped
    REQUIRE_FALSE(r);
    CHECK(membacking::test::error_of(r) == errc::quarantined);
}

// restore_mapper: a quarantined mapper back in service once the host accepts calls again.

namespace {

/// Quarantines eager mapper `a` (holding a mapping at [0, 0x10000)) with an add_mapping at
/// [0x20000, 0x30000) whose NUMA binding fails, and whose clean-up and rollback (making that
/// piece inaccessible) the host refuses; the whole-range invalidation then succeeds.
void quarantine_by_failed_add(Fixture& f, const std::shared_ptr<Mapper>& a)
{
    ActiveMapping bound = f.file(0x20000, 0x30000, 0x20000);
    bound.policy.numa_node = 0;
    InjectingSyscalls::mbind_plan = test::Plan{0, EINVAL};
    InjectingSyscalls::refused_unmap_at = a->base() + 0x20000;
    InjectingSyscalls::refused_unmap_len = 0x10000;
    REQUIRE_FALSE(f.mm.add_mapping(bound));
    InjectingSyscalls::reset();
    REQUIRE(a->quarantined());
    REQUIRE(f.mm.quarantined_mappers().size() == 1);
    REQUIRE(f.mm.quarantined_mappers()[0].invalidated);
}

} // namespace

TEST_CASE("restore_mapper puts a quarantined eager mapper back: every current mapping replayed, "
          "its accesses no longer fail, later changes reach it")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    auto b = must(f.mm.new_mapper(MapperMode::eager));
    REQUIRE(Memory(b).write_plain<std::uint64_t>(Gpa{0x8000}, 0xabcdef));
    quarantine_by_failed_add(f, a);
    CHECK_FALSE(b->quarantined());
    CHECK(f.mm.holders_at(0) == Ids{b->id()});
    CHECK(test::error_of(Memory(a).read_plain<std::uint64_t>(Gpa{0x8000})) == errc::quarantined);
    // While quarantined, a change reaches b only.
    must(f.mm.add_mapping(f.file(0x40000, 0x50000, 0x40000)));
    REQUIRE(Memory(b).write_plain<std::uint64_t>(Gpa{0x40010}, 0x5eed));

    must(f.mm.restore_mapper(a->id()));
    CHECK_FALSE(a->quarantined());
    CHECK(f.mm.quarantined_mappers().empty());
    CHECK(Fixture::resident(a, 0x8000)); // replayed, not faulted in
    CHECK(Fixture::resident(a, 0x40000));
    CHECK(Memory(a).read_plain<std::uint64_t>(Gpa{0x8000}).value() == 0xabcdef);
    CHECK(Memory(a).read_plain<std::uint64_t>(Gpa{0x40010}).value() == 0x5eed);
    CHECK(f.mm.holders_at(0) == Ids{b->id(), a->id()});
    // The failed add never entered the books: nothing is mapped there.
    CHECK(test::error_of(Memory(a).read_plain<std::uint8_t>(Gpa{0x20000})) == errc::unmapped);
    // Later changes reach it again.
    must(f.mm.add_mapping(f.file(0x20000, 0x30000, 0x20000)));
    CHECK(Fixture::resident(a, 0x20000));
    must(f.mm.remove_mappings(range(0, 0x10000)));
    CHECK_FALSE(Fixture::resident(a, 0x8000));
    // Restoring a mapper in service is nothing to do; an unknown id is an error.
    must(f.mm.restore_mapper(a->id()));
    CHECK(test::error_of(f.mm.restore_mapper(999)) == errc::not_found);
}

TEST_CASE("restore_mapper is all or nothing: a replay the host refuses part way leaves the "
          "mapper quarantined and inaccessible, and a later restore succeeds")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    must(f.mm.add_mapping(f.file(0x40000, 0x50000, 0x40000)));
    auto a = must(f.mm.new_mapper(MapperMode::eager));
    quarantine_by_failed_add(f, a);

    InjectingSyscalls::fail_mmap(2); // the second mapping's replay
    auto r = f.mm.restore_mapper(a->id());
    REQUIRE_FALSE(r);
    CHECK(test::error_of(r) == std::errc::not_enough_memory);
    CHECK(r.error().full_message().find("failed to restore VA mapper") != std::string::npos);
    InjectingSyscalls::reset();
    CHECK(a->quarantined());
    REQUIRE(f.mm.quarantined_mappers().size() == 1);
    CHECK(f.mm.quarantined_mappers()[0].invalidated);
    CHECK_FALSE(Fixture::resident(a, 0)); // the part replayed before the failure is gone again
    CHECK(test::error_of(Memory(a).read_plain<std::uint8_t>(Gpa{0})) == errc::quarantined);
    CHECK(f.mm.holders_at(0).empty());

    must(f.mm.restore_mapper(a->id()));
    CHECK(Fixture::resident(a, 0));
    CHECK(Fixture::resident(a, 0x40000));
    CHECK(f.mm.holders_at(0x40000) == Ids{a->id()});
}

TEST_CASE("restore_mapper refuses while the host still refuses to invalidate the mapper's range, "
          "and while private memory is mapped")
{
    {
        Fixture f;
        must(f.mm.add_mapping(f.file(0, 0x10000)));
        auto a = must(f.mm.new_mapper(MapperMode::eager));
        REQUIRE(Memory(a).write_plain<std::uint64_t>(Gpa{0x100}, 0x77));
        ActiveMapping bound = f.file(0x20000, 0x30000, 0x20000);
        bound.policy.numa_node = 0;
        InjectingSyscalls::mbind_plan = test::Plan{0, EINVAL};
        InjectingSyscalls::refuse_every_unmap = true; // clean-up, rollback, invalidation
        InjectingSyscalls::fail_mprotect(1);          // and the in-place PROT_NONE
        REQUIRE_FALSE(f.mm.add_mapping(bound));
        REQUIRE(a->quarantined());
        REQUIRE_FALSE(f.mm.quarantined_mappers()[0].invalidated);
        InjectingSyscalls::fail_mprotect(1); // the retry: the whole-range mmap and PROT_NONE
        auto r = f.mm.restore_mapper(a->id());
        REQUIRE_FALSE(r);
        CHECK(test::error_of(r) == errc::quarantined);
        CHECK(r.error().full_message().find("refuses to invalidate") != std::string::npos);
        CHECK(a->quarantined());
        InjectingSyscalls::reset(); // the host recovers: the retry invalidates, then the replay
        must(f.mm.restore_mapper(a->id()));
        CHECK(Memory(a).read_plain<std::uint64_t>(Gpa{0x100}).value() == 0x77);
    }
    {
        Fixture f;
        must(f.mm.add_mapping(Fixture::private_memory(0, 0x10000)));
        auto a = must(f.mm.new_mapper(MapperMode::eager));
        quarantine_by_failed_add(f, a);
        auto r = f.mm.restore_mapper(a->id());
        REQUIRE_FALSE(r);
        CHECK(test::error_of(r) == errc::conflict);
        CHECK(a->quarantined());
    }
}

TEST_CASE("restore_mapper puts a quarantined lazy mapper back: it faults mappings in again")
{
    Fixture f;
    must(f.mm.add_mapping(f.file(0, 0x10000)));
    auto b = must(f.mm.new_mapper(MapperMode::eager));
    REQUIRE(Memory(b).write_plain<std::uint64_t>(Gpa{0x2000}, 0x1234));
    auto lazy = must(f.mm.new_mapper(MapperMode::lazy));
    ActiveMapping bound = f.file(0x20000, 0x30000, 0x20000);
    bound.policy.numa_node = 0;
    must(f.mm.add_mapping(bound)); // b takes it; the lazy mapper faults it in below
    InjectingSyscalls::mbind_plan = test::Plan{0, EINVAL};
    InjectingSyscalls::refused_unmap_at = lazy->base() + 0x20000; // the fault's clean-up
    InjectingSyscalls::refused_unmap_len = 0x10000;
    CHECK(test::error_of(Memory(lazy).read_plain<std::uint8_t>(Gpa{0x20000})) ==
          errc::resource_exhausted);
    InjectingSyscalls::reset();
    REQUIRE(lazy->quarantined());
    CHECK(test::error_of(Memory(lazy).read_plain<std::uint64_t>(Gpa{0x2000})) == errc::quarantined);

    must(f.mm.restore_mapper(lazy->id()));
    CHECK_FALSE(lazy->quarantined());
    CHECK_FALSE(lazy->is_eager());
    CHECK_FALSE(Fixture::resident(lazy, 0x2000)); // nothing replayed: lazy
    CHECK(Memory(lazy).read_plain<std::uint64_t>(Gpa{0x2000}).value() == 0x1234);
    CHECK(f.mm.holders_at(0x2000) == Ids{b->id(), lazy->id()});
    CHECK(Memory(lazy).read_plain<std::uint8_t>(Gpa{0x20000}));
}

TEST_CASE("GuestMemoryManager::restore_mapper: health() lists the quarantined primary, and after "
          "the restore it is ok and the primary's handles read the guest memory again")
{
    using Manager = GuestMemoryManager<NestedPriority, Va, MockPartition>;
    InjectingSyscalls::reset();
    auto m = must(Manager::builder()
                      .add_backing(RamBackingRequest({range(0, 0x100000)}))
                      .build(Length{0x400000}));
    auto memory = m.guest_memory();
    REQUIRE(memory.write_plain<std::uint64_t>(Gpa{0x1000}, 0xfeedface));
    const Mappable rom = must(Va::create_shared_memory(0x10000, "restore-rom"));
    const RegionId id = must(m.add_region("rom", range(0x200000, 0x210000), 1, MappingType::Ram));
    MemoryPolicy on_node0;
    on_node0.numa_node = 0;
    must(m.add_mapping(id,
                       {range(0, 0x10000), MappingBacking::file(rom, Offset{0}), false, on_node0}));
    InjectingSyscalls::mbind_plan = test::Plan{0, EINVAL};
    InjectingSyscalls::refused_unmap_at = memory.mapper()->base() + 0x200000;
    InjectingSyscalls::refused_unmap_len = 0x10000;
    REQUIRE_FALSE(m.map_region(id, {false, true, false}));
    InjectingSyscalls::reset();
    const Health sick = m.health();
    REQUIRE(sick.quarantined_mappers.size() == 1);
    CHECK(sick.quarantined_mappers[0].id == memory.mapper()->id());
    CHECK(test::error_of(memory.read_plain<std::uint64_t>(Gpa{0x1000})) == errc::quarantined);

    must(m.restore_mapper(memory.mapper()->id()));
    CHECK(m.health().ok());
    CHECK(memory.read_plain<std::uint64_t>(Gpa{0x1000}).value() == 0xfeedface);
    must(m.map_region(id, {false, true, false})); // the host binds it now
    CHECK(memory.read_plain<std::uint8_t>(Gpa{0x200000}).value() == 0);
}
