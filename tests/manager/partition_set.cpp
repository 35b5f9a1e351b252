// detail::PartitionSet, the partitions' fan-out, on its own: against mock partitions of two
// policies, without a manager, region manager or VA mapper (the host base is a made-up address,
// which partitions never dereference).
#include <membacking/manager/detail/partition_set.hpp>
#include <membacking/partition/mock.hpp>

#include "test_support.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

using namespace membacking;
using test::must;
using test::range;
using Op = MockPartition::Op;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t alias = std::uint64_t{1} << 40;

/// A second policy, so that fan-out across the tuple of lists is exercised.
struct OtherMock : MockPartition {
    static constexpr std::string_view name = "other";
};

/// A policy with no optional capability.
struct Plain : MockPartition {
    static constexpr std::string_view name = "plain";
    static constexpr PartitionFeatures features = PartitionFeatures::none;
};

using Set = detail::PartitionSet<MockPartition, OtherMock, Plain>;

std::byte* fake_base()
{
    return reinterpret_cast<std::byte*>(std::uintptr_t{0x7f0000000000});
}

Set::Options options(bool pin = false)
{
    return {fake_base(), alias, pin};
}

RegionActivation window(std::uint64_t start, std::uint64_t end, bool writable = true,
                        bool prefetch = false)
{
    return {range(start, end), MapParams{writable, true, prefetch}, RegionId{1}, MappingType::Ram};
}

/// Two visible windows: [0, 1 MiB) and [2 MiB, 3 MiB).
std::vector<RegionActivation> two()
{
    return {window(0, MiB), window(2 * MiB, 3 * MiB)};
}

} // namespace

TEST_CASE("PartitionSet: attach replays the visible windows at base + GPA, the VTL2 alias first")
{
    Set set(options());
    auto vtl0 = std::make_shared<MockPartition>();
    auto vtl2 = std::make_shared<OtherMock>();
    must(set.attach(Vtl::vtl0, vtl0, two()));
    const PartitionId id2 = must(set.attach(Vtl::vtl2, vtl2, two()));
    CHECK(set.size() == 3); // vtl2 counts twice: plain and alias

    REQUIRE(vtl0->windows().size() == 2);
    CHECK(vtl0->lookup(2 * MiB)->host_va == fake_base() + 2 * MiB);
    REQUIRE(vtl2->windows().size() == 4);
    CHECK(vtl2->lookup(alias + 2 * MiB)->host_va == fake_base() + 2 * MiB);
    const auto calls = vtl2->calls();
    CHECK(calls.front().gpa == alias); // the alias mapping is replayed first

    const auto described = set.describe();
    REQUIRE(described.size() == 3);
    CHECK(described[0].type == "mock");
    CHECK(described[1].id == id2);
    CHECK(described[1].offset == alias);
    CHECK(described[2].offset == 0);
}

TEST_CASE("PartitionSet: a failed attach leaves the partition with nothing mapped")
{
    Set set(options());
    auto p = std::make_shared<MockPartition>();
    p->fail_nth_call(4, make_error(errc::resource_exhausted, "no slots")); // alias 2, plain 2nd
    auto r = set.attach(Vtl::vtl2, p, two());
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::resource_exhausted); // the root's code stays
    CHECK(r.error().message() == "failed to attach partition to memory manager");
    CHECK(r.error().full_message().find("no slots") != std::string::npos);
    CHECK(p->windows().empty());
    CHECK(set.size() == 0);
    auto none = set.attach(Vtl::vtl0, std::shared_ptr<MockPartition>(), two());
    REQUIRE_FALSE(none);
    CHECK(none.error().code() == errc::invalid_argument);
    CHECK(none.error().full_message() ==
          "failed to attach partition to memory manager: no partition given");
}

TEST_CASE("PartitionSet: map and unmap reach every partition of every policy, all or nothing")
{
    Set set(options());
    auto a = std::make_shared<MockPartition>();
    auto b = std::make_shared<OtherMock>();
    auto c = std::make_shared<Plain>();
    must(set.attach(Vtl::vtl0, a, {}));
    must(set.attach(Vtl::vtl0, b, {}));
    must(set.attach(Vtl::vtl0, c, {}));

    const RegionActivation w = window(4 * MiB, 5 * MiB, false);
    must(set.map(w));
    for (const auto& seen : {a->lookup(4 * MiB), b->lookup(4 * MiB), c->lookup(4 * MiB)}) {
        REQUIRE(seen.has_value());
        CHECK_FALSE(seen->writable);
    }

    // The last partition fails to unmap: the others get the window back, as it was.
    c->fail_next(Op::unmap);
    REQUIRE_FALSE(set.unmap(w));
    CHECK(a->lookup(4 * MiB).has_value());
    CHECK_FALSE(b->lookup(4 * MiB)->writable);
    must(set.unmap(w));
    CHECK(a->windows().empty());
    CHECK(c->windows().empty());

    // The middle one fails to map: the first one's map is undone, the last one never sees it.
    b->fail_next(Op::map);
    auto failed = set.map(w);
    REQUIRE_FALSE(failed);
    CHECK(failed.error().code() == errc::resource_exhausted);
    CHECK(a->windows().empty());
    CHECK(b->windows().empty());
    CHECK(c->calls().size() == 3); // map, failed unmap, unmap: no new call
}

TEST_CASE("PartitionSet: prefetch is queued, given after the operation, and only advice")
{
    Set set(options());
    auto p = std::make_shared<MockPartition>();
    auto plain = std::make_shared<Plain>(); // cannot prefetch: never asked
    must(set.attach(Vtl::vtl0, p, {}));
    must(set.attach(Vtl::vtl0, plain, {}));
    must(set.map(window(0, MiB, true, true)));
    must(set.map(window(MiB, 2 * MiB, true, false)));
    auto ops = [&] {
        std::vector<Op> out;
        for (const auto& call : p->calls())
            out.push_back(call.op);
        return out;
    };
    CHECK(ops() == std::vector<Op>{Op::map, Op::map}); // nothing during the operations

    auto advice = set.take_deferred();
    REQUIRE(advice.size() == 1);
    CHECK(set.take_deferred().empty()); // taken once
    p->fail_next(Op::prefetch);
    for (const auto& give : advice)
        give(); // fails, and nothing comes of it
    CHECK(ops() == std::vector<Op>{Op::map, Op::map, Op::prefetch});
    CHECK(p->calls().back().gpa == 0);
    CHECK(p->windows().size() == 2); // the failed prefetch kept its window
    for (const auto& call : plain->calls())
        CHECK(call.op == Op::map);
}

TEST_CASE("PartitionSet: pinning pins after each map and unpins before each unmap")
{
    Set set(options(true));
    auto p = std::make_shared<MockPartition>();
    must(set.attach(Vtl::vtl0, p, two()));
    CHECK(p->lookup(0)->pinned);
    CHECK(p->lookup(2 * MiB)->pinned);

    // A pin failure unmaps what it just mapped.
    p->fail_next(Op::pin);
    REQUIRE_FALSE(set.map(window(4 * MiB, 5 * MiB)));
    CHECK_FALSE(p->lookup(4 * MiB).has_value());

    // A failed unmap re-pins.
    p->fail_next(Op::unmap);
    REQUIRE_FALSE(set.unmap(two()[0]));
    CHECK(p->lookup(0)->pinned);
    p->clear_calls();
    must(set.unmap(two()[0]));
    const auto calls = p->calls();
    REQUIRE(calls.size() == 2);
    CHECK(calls[0].op == Op::unpin);
    CHECK(calls[1].op == Op::unmap);

    // A policy that cannot pin is refused when pinning is on.
    auto refused = set.attach(Vtl::vtl0, std::make_shared<Plain>(), two());
    REQUIRE_FALSE(refused);
    REQUIRE(refused.error().source() != nullptr);
    CHECK(refused.error().source()->code() == errc::unsupported);
}

TEST_CASE("PartitionSet: detach unmaps and forgets one partition, all or nothing")
{
    Set set(options());
    auto a = std::make_shared<MockPartition>();
    auto b = std::make_shared<OtherMock>();
    const PartitionId ida = must(set.attach(Vtl::vtl2, a, two()));
    must(set.attach(Vtl::vtl0, b, two()));

    a->fail_nth_call(3, make_error(errc::resource_exhausted, "busy"));
    REQUIRE_FALSE(set.detach(ida, two()));
    CHECK(a->windows().size() == 4); // the two it had unmapped are back
    CHECK(set.size() == 3);

    must(set.detach(ida, two()));
    CHECK(a->windows().empty());
    CHECK(b->windows().size() == 2);
    CHECK(set.size() == 1);
    CHECK(test::error_of(set.detach(ida, two())) == errc::not_found);
}

TEST_CASE("PartitionSet: dirty logging goes to one partition, once, where the policy can")
{
    Set set(options());
    auto p = std::make_shared<MockPartition>();
    auto plain = std::make_shared<Plain>();
    const PartitionId id = must(set.attach(Vtl::vtl2, p, two())); // with an alias map
    const PartitionId plain_id = must(set.attach(Vtl::vtl0, plain, two()));

    must(set.set_dirty_logging(id, true));
    std::size_t logging_calls = 0;
    for (const auto& call : p->calls())
        logging_calls += call.op == Op::set_dirty_logging ? 1U : 0U;
    CHECK(logging_calls == 1);

    p->mark_dirty(2 * MiB + 0x3000);
    const auto bitmap = must(set.take_dirty_log(id, range(2 * MiB, 3 * MiB)));
    REQUIRE(bitmap.size() == 4); // 256 pages
    CHECK(bitmap[0] == 0b1000);
    CHECK(must(set.take_dirty_log(id, range(2 * MiB, 3 * MiB)))[0] == 0); // read and cleared

    CHECK(test::error_of(set.set_dirty_logging(plain_id, true)) == errc::unsupported);
    CHECK(test::error_of(set.take_dirty_log(plain_id, range(0, MiB))) == errc::unsupported);
    CHECK(test::error_of(set.set_dirty_logging(PartitionId{99}, true)) == errc::not_found);
    CHECK(test::error_of(set.take_dirty_log(PartitionId{99}, range(0, MiB))) == errc::not_found);
}

TEST_CASE("PartitionSet: unmap_all empties every partition and reports nothing")
{
    Set set(options());
    auto a = std::make_shared<MockPartition>();
    auto b = std::make_shared<OtherMock>();
    must(set.attach(Vtl::vtl2, a, two()));
    must(set.attach(Vtl::vtl0, b, two()));
    b->fail_next(Op::unmap); // one failure does not stop the rest
    set.unmap_all(two());
    CHECK(a->windows().empty());
    CHECK(b->windows().size() == 1);
}

// ---- the quiesce bracket ----

namespace {
/// A quiesce hook that counts, and records what a partition looked like when it ended.
struct HookLog {
    int begins = 0;
    int ends = 0;
    bool held = false;
    std::vector<MockPartition::Window> at_end; ///< the partition's windows when end() ran
    std::shared_ptr<MockPartition> watched;

    QuiesceHook hook()
    {
        return {[this] {
                    CHECK_FALSE(held); // never nested
                    held = true;
                    ++begins;
                },
                [this] {
                    CHECK(held);
                    held = false;
                    ++ends;
                    if (watched)
                        at_end = watched->windows();
                }};
    }
};
} // namespace

TEST_CASE("PartitionSet: one bracket per operation, opened by the first unmap, closed after it")
{
    Set set(options());
    HookLog log;
    auto p = std::make_shared<MockPartition>();
    log.watched = p;
    must(set.attach(Vtl::vtl2, p, two(), log.hook())); // maps only: no bracket
    CHECK(log.begins == 0);

    {
        const auto op = set.operation(); // what the manager does around one control call
        must(set.unmap(two()[0]));       // 2 windows (alias and plain): one begin
        must(set.map(window(0, MiB, false)));
        must(set.unmap(two()[1]));
        CHECK(log.begins == 1);
        CHECK(log.ends == 0); // still inside the operation
    }
    CHECK(log.ends == 1);
    // Every unmap was made with the vCPUs held, and the partition was told (quiesce-aware).
    bool told = false;
    for (const auto& call : p->calls()) {
        if (call.op == Op::unmap)
            CHECK(call.quiesced);
        told = told || (call.op == Op::set_quiesced && call.writable);
    }
    CHECK(told);
    CHECK(p->calls().back().op == Op::set_quiesced); // released before end()
    CHECK_FALSE(p->calls().back().writable);

    // A map-only operation does not quiesce.
    must(set.map(window(4 * MiB, 5 * MiB)));
    CHECK(log.begins == 1);
}

TEST_CASE("PartitionSet: the bracket ends after the rollback, and only hooked partitions stop")
{
    Set set(options());
    HookLog log;
    auto hooked = std::make_shared<MockPartition>();
    auto free_running = std::make_shared<OtherMock>();
    log.watched = hooked;
    must(set.attach(Vtl::vtl0, hooked, two(), log.hook()));
    must(set.attach(Vtl::vtl0, free_running, two()));

    free_running->fail_next(Op::unmap);
    REQUIRE_FALSE(set.unmap(two()[0]));
    CHECK(log.begins == 1);
    CHECK(log.ends == 1);
    // end() ran after the hooked partition got its window back.
    CHECK(log.at_end.size() == 2);
    const auto calls = hooked->calls();
    CHECK(calls[calls.size() - 2].op == Op::map); // the undo, still held
    CHECK(calls[calls.size() - 2].quiesced);
    for (const auto& call : free_running->calls())
        CHECK_FALSE(call.quiesced);
}

TEST_CASE("PartitionSet: dirty-logging changes and detach quiesce too; a half hook is refused")
{
    Set set(options());
    HookLog log;
    auto p = std::make_shared<MockPartition>();
    const PartitionId id = must(set.attach(Vtl::vtl0, p, two(), log.hook()));
    must(set.set_dirty_logging(id, true));
    CHECK(log.begins == 1);
    CHECK(log.ends == 1);
    must(set.take_dirty_log(id, range(0, MiB))); // reading the log needs no bracket
    CHECK(log.begins == 1);
    must(set.detach(id, two()));
    CHECK(log.begins == 2);
    CHECK(log.ends == 2); // the bracket of a partition that is gone ends too

    auto half = set.attach(Vtl::vtl0, std::make_shared<MockPartition>(), two(),
                           QuiesceHook{[] {}, nullptr});
    REQUIRE_FALSE(half);
    REQUIRE(half.error().source() != nullptr);
    CHECK(half.error().source()->code() == errc::invalid_argument);

    // Teardown does not call the hook.
    const PartitionId again = must(set.attach(Vtl::vtl0, p, two(), log.hook()));
    (void)again;
    set.unmap_all(two());
    CHECK(log.begins == 2);
    CHECK(p->windows().empty());
}

TEST_CASE("PartitionSet: a partition that refuses an undo step is marked failed, not fatal")
{
    Set set(options());
    auto a = std::make_shared<MockPartition>();
    auto b = std::make_shared<OtherMock>();
    const PartitionId ida = must(set.attach(Vtl::vtl0, a, {}));
    must(set.attach(Vtl::vtl0, b, {}));

    // b fails to map, and a refuses to take the window back out: a is marked failed, the
    // operation returns b's error.
    b->fail_next(Op::map);
    a->fail_next(Op::unmap, make_error(errc::resource_exhausted, "slot stuck"));
    auto r = set.map(window(0, MiB));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::resource_exhausted);
    REQUIRE(set.failed().size() == 1);
    CHECK(set.failed()[0].id == ida);
    CHECK(set.failed()[0].cause.find("slot stuck") != std::string::npos);
    CHECK(a->lookup(0).has_value()); // what it could not undo stays

    // Nothing more goes to a; b is served.
    const std::size_t a_calls = a->calls().size();
    must(set.map(window(2 * MiB, 3 * MiB)));
    CHECK(a->calls().size() == a_calls);
    CHECK(b->lookup(2 * MiB).has_value());

    // Dirty logging: on a failed partition, and across all (a migration), errc::quarantined.
    CHECK(set.set_dirty_logging(ida, true).error().code() == errc::quarantined);
    CHECK(set.set_dirty_logging_all(true).error().code() == errc::quarantined);
    CHECK(set.take_dirty_logs({window(2 * MiB, 3 * MiB)}, range(0, 4 * MiB),
                              [](std::uint64_t, const std::vector<std::uint64_t>&) {})
              .error()
              .code() == errc::quarantined);

    // Detaching it takes out what the host lets it and forgets it, failure included.
    must(set.detach(ida, {window(0, MiB), window(2 * MiB, 3 * MiB)}));
    CHECK(a->windows().empty());
    CHECK(set.failed().empty());
    must(set.set_dirty_logging_all(true));
}

TEST_CASE("PartitionSet: a partition that reports it could not undo its own part (errc::"
          "quarantined) is marked failed; any other error leaves it in service")
{
    Set set(options());
    auto a = std::make_shared<MockPartition>();
    auto b = std::make_shared<OtherMock>();
    const PartitionId ida = must(set.attach(Vtl::vtl0, a, {}));
    must(set.attach(Vtl::vtl0, b, {}));
    must(set.map(window(0, MiB)));

    // An ordinary failure: the operation fails, nobody is marked failed.
    a->fail_next(Op::unmap);
    REQUIRE_FALSE(set.unmap(window(0, MiB)));
    CHECK(set.failed().empty());

    // The policy's own report (KVM: a memslot it could not add back): a is marked failed with
    // the report, the operation returns it, b keeps its window and stays in service.
    a->fail_next(Op::unmap, make_error(errc::quarantined, "memslot 3 could not be added back"));
    auto r = set.unmap(window(0, MiB));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == errc::quarantined);
    REQUIRE(set.failed().size() == 1);
    CHECK(set.failed()[0].id == ida);
    CHECK(set.failed()[0].cause.find("memslot 3 could not be added back") != std::string::npos);
    CHECK(b->lookup(0).has_value());
    const std::size_t a_calls = a->calls().size();
    must(set.map(window(2 * MiB, 3 * MiB)));
    CHECK(a->calls().size() == a_calls);

    // The same report from an attach's map: the partition stays attached, failed, detachable.
    auto c = std::make_shared<MockPartition>();
    c->fail_next(Op::map, make_error(errc::quarantined, "window stuck"));
    auto idc = set.attach(Vtl::vtl0, c, {window(0, MiB)});
    REQUIRE_FALSE(idc);
    REQUIRE(set.failed().size() == 2);
    CHECK(set.failed()[1].cause.find("window stuck") != std::string::npos);
    must(set.detach(set.failed()[1].id, {window(0, MiB), window(2 * MiB, 3 * MiB)}));
    must(set.detach(ida, {window(0, MiB), window(2 * MiB, 3 * MiB)}));
    CHECK(set.failed().empty());
}
