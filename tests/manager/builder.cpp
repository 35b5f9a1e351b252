// GuestMemoryBuilder: one test per validation with its exact message (reference §2.4), the
// reference's memory-manager tests (§11, 39-48), the x86 legacy split, and the backing options
// verified where the kernel shows them (THP in smaps, NUMA with get_mempolicy).
#include <membacking/membacking.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#if MEMBACKING_OS_LINUX
#    include "injecting_syscalls.hpp"
#    include "smaps.hpp"
#endif

#include <string>
#include <vector>

using namespace membacking;
using test::must;
using test::range;

namespace {

constexpr std::uint64_t MiB = std::uint64_t{1} << 20;
constexpr std::uint64_t GiB = std::uint64_t{1} << 30;
constexpr std::uint64_t pg = page_size;

using Manager = MockGuestMemoryManager;
#if MEMBACKING_OS_LINUX
using InjectedManager =
    GuestMemoryManager<NestedPriority, LinuxMmap<test::InjectingSyscalls>, MockPartition>;
#endif

RamBackingRequest ram(std::vector<MemoryRange> ranges)
{
    return RamBackingRequest(std::move(ranges));
}

/// The build error's code and message, or a failing check if the build succeeded.
template <class M>
void check_build_error(const Result<M>& r, build_errc kind, const std::string& message)
{
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code() == kind);
    CHECK(r.error().message() == message);
}

/// A failure that wraps a cause: the root's code stays (base/result.hpp's rule), the step that
/// failed is the message.
template <class M>
void check_wrapped_error(const Result<M>& r, const std::error_code& root,
                         const std::string& message)
{
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code() == root);
    CHECK(r.error().message() == message);
    REQUIRE(r.error().source() != nullptr);
}

[[maybe_unused]] std::error_code os_code(int errno_value)
{
    return {errno_value, std::system_category()};
}

} // namespace

TEST_CASE("build validation: private memory and x86 legacy support")
{
    check_build_error(Manager::builder()
                          .x86_legacy_support(true)
                          .add_backing(ram({range(0, 2 * MiB)}).private_memory(true))
                          .build(Length{4 * MiB}),
                      build_errc::private_memory_with_legacy,
                      "private memory is incompatible with x86 legacy support");
}

TEST_CASE("build validation: private memory and an existing backing")
{
    Mappable existing = test::make_object(MiB);
    check_build_error(
        Manager::builder()
            .add_backing(ram({range(0, MiB)}).private_memory(true).existing_mappable(existing))
            .build(Length{MiB}),
        build_errc::private_memory_with_existing_backing,
        "private memory is incompatible with an existing memory backing");
}

TEST_CASE(
    "build validation: hugepages with private memory, existing backing (reference 39), legacy")
{
    check_build_error(Manager::builder()
                          .add_backing(ram({range(0, 2 * MiB)}).hugepages().private_memory(true))
                          .build(Length{2 * MiB}),
                      build_errc::hugepages_with_private_memory,
                      "hugepages require shared memory mode");
    check_build_error(
        Manager::builder()
            .add_backing(
                ram({range(0, 2 * MiB)}).hugepages().existing_mappable(test::make_object(2 * MiB)))
            .build(Length{2 * MiB}),
        build_errc::hugepages_with_existing_backing,
        "hugepages are incompatible with existing memory backing");
    check_build_error(Manager::builder()
                          .x86_legacy_support(true)
                          .add_backing(ram({range(0, 2 * MiB)}).hugepages())
                          .build(Length{2 * MiB}),
                      build_errc::hugepages_with_legacy,
                      "hugepages are incompatible with x86 legacy RAM splitting");
}

TEST_CASE("build validation: x86 legacy support needs RAM from 0 to at least 1 MiB")
{
    const std::string message = "x86 support requires RAM to start at 0 and contain at least 1MB";
    check_build_error(Manager::builder()
                          .x86_legacy_support(true)
                          .add_backing(ram({range(0, 512 * 1024)}))
                          .build(Length{MiB}),
                      build_errc::invalid_ram_for_x86, message);
    check_build_error(Manager::builder()
                          .x86_legacy_support(true)
                          .add_backing(ram({range(pg, 2 * MiB)}))
                          .build(Length{2 * MiB}),
                      build_errc::invalid_ram_for_x86, message);
}

TEST_CASE("reference 40: hugepage size validation")
{
    CHECK(detail::validate_hugepage_size(pg).has_value());
    CHECK(test::error_of(detail::validate_hugepage_size(pg / 2)) ==
          build_errc::invalid_hugepage_size);
    auto three = detail::validate_hugepage_size(3 * MiB);
    REQUIRE_FALSE(three);
    CHECK(three.error().code() == build_errc::invalid_hugepage_size);
    CHECK(three.error().message() ==
          "hugepage size 3 MB must be a power of two and at least the host page size");
    // And through build(), before anything is allocated.
    check_build_error(Manager::builder()
                          .add_backing(ram({range(0, 6 * MiB)}).hugepages(Length{3 * MiB}))
                          .build(Length{6 * MiB}),
                      build_errc::invalid_hugepage_size,
                      "hugepage size 3 MB must be a power of two and at least the host page size");
}

TEST_CASE("reference 41-43: hugepage RAM alignment and its exact messages")
{
    CHECK(detail::validate_hugepage_ram_alignment(
              4 * MiB, {range(0, 2 * MiB), range(4 * MiB, 6 * MiB)}, 2 * MiB)
              .has_value());
    auto size = detail::validate_hugepage_ram_alignment(257 * MiB, {range(0, 257 * MiB)}, 2 * MiB);
    REQUIRE_FALSE(size);
    CHECK(size.error().code() == build_errc::hugepage_ram_size_unaligned);
    CHECK(size.error().message() ==
          "RAM size 257 MB is not aligned to 2 MB hugepages; choose a memory size that is a "
          "multiple of the hugepage size");
    auto r = detail::validate_hugepage_ram_alignment(
        2 * MiB, {range(0, MiB), range(2 * MiB, 3 * MiB)}, 2 * MiB);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == build_errc::hugepage_ram_range_unaligned);
    CHECK(r.error().message() ==
          "RAM range 0x0-0x100000 (1 MB) is not aligned to 2 MB hugepages; range start and size "
          "must both be multiples of the hugepage size");
}

#if MEMBACKING_OS_LINUX // hugetlb memfds
TEST_CASE("reference 44: the hugetlb allocation failure message, from a failing build")
{
    test::InjectingSyscalls::reset();
    test::InjectingSyscalls::fallocate_plan = test::Plan{0, ENOMEM};
    auto r = InjectedManager::builder()
                 .add_backing(ram({range(0, GiB)}).hugepages(Length{2 * MiB}))
                 .build(Length{GiB});
    test::InjectingSyscalls::reset();
    check_wrapped_error(r, os_code(ENOMEM),
                        "failed to reserve 512 hugetlb pages of 2 MB each (1 GB total); increase "
                        "the hugetlb pool or reduce guest memory size");
    REQUIRE(r.error().source() != nullptr);
    CHECK(r.error().source()->message() == "Cannot allocate memory");
}
#endif

TEST_CASE("build validation: the VTL0 alias map must fit")
{
    check_build_error(Manager::builder()
                          .vtl0_alias_map(Length{MiB})
                          .add_backing(ram({range(0, MiB)}))
                          .build(Length{2 * MiB}),
                      build_errc::alias_map_wont_fit,
                      "not enough guest address space available for the vtl0 alias map");
    CHECK(Manager::builder()
              .vtl0_alias_map(Length{2 * MiB})
              .add_backing(ram({range(0, MiB)}))
              .build(Length{2 * MiB}));
    // Refused at build, not by every VTL2 attach later: an unaligned offset...
    auto unaligned = Manager::builder()
                         .vtl0_alias_map(Length{2 * MiB + 1})
                         .add_backing(ram({range(0, MiB)}))
                         .build(Length{2 * MiB});
    REQUIRE_FALSE(unaligned);
    CHECK(unaligned.error().code() == errc::invalid_range);
    CHECK(unaligned.error().full_message().find("0x200001") != std::string::npos);
    // ... and one whose alias of the address space would end beyond 2^64.
    const std::uint64_t top = ~std::uint64_t{0} & ~(page_size - 1);
    auto overflowing = Manager::builder()
                           .vtl0_alias_map(Length{top})
                           .add_backing(ram({range(0, MiB)}))
                           .build(Length{2 * MiB});
    REQUIRE_FALSE(overflowing);
    CHECK(overflowing.error().code() == build_errc::alias_map_wont_fit);
    CHECK(overflowing.error().full_message().find("2^64") != std::string::npos);
}

TEST_CASE("build failures: no address space, allocation, RAM too large, bad layout, enable")
{
    check_wrapped_error(Manager::builder().add_backing(ram({range(0, MiB)})).build(Length{0}),
                        make_error_code(errc::invalid_argument), "failed to create VA mapper");

#if MEMBACKING_OS_LINUX // memfd failure injection
    test::InjectingSyscalls::reset();
    test::InjectingSyscalls::memfd_plan = test::Plan{0, EMFILE};
    auto alloc = InjectedManager::builder().add_backing(ram({range(0, MiB)})).build(Length{MiB});
    check_wrapped_error(alloc, os_code(EMFILE), "failed to allocate memory");
    CHECK(alloc.error().full_message().find("Too many open files") != std::string::npos);
#endif

    const std::uint64_t half = std::uint64_t{1} << 63;
    auto big = Manager::builder()
                   .add_backing(ram({range(0, half), range(half, ~(page_size - 1))}))
                   .build(Length{MiB});
    REQUIRE_FALSE(big);
    CHECK(big.error().code() == build_errc::ram_too_large);

    auto overlap = Manager::builder()
                       .add_backing(ram({range(0, 2 * MiB)}))
                       .add_backing(ram({range(MiB, 3 * MiB)}))
                       .build(Length{4 * MiB});
    REQUIRE_FALSE(overlap);
    CHECK(overlap.error().code() == build_errc::invalid_ram_layout);
    CHECK(overlap.error().message() ==
          "RAM range 0x100000-0x300000 overlaps RAM range 0x0-0x200000");
    // Identical ranges too (equal priorities allow identical regions; RAM must not stack).
    auto twice = Manager::builder()
                     .add_backing(ram({range(0, 2 * MiB)}))
                     .add_backing(ram({range(0, 2 * MiB)}))
                     .build(Length{4 * MiB});
    REQUIRE_FALSE(twice);
    CHECK(twice.error().code() == build_errc::invalid_ram_layout);
    CHECK(test::error_of(Manager::builder()
                             .add_backing(ram({range(0, MiB), range(0, MiB)}))
                             .build(Length{4 * MiB})) == build_errc::invalid_ram_layout);
    auto beyond = Manager::builder().add_backing(ram({range(0, 2 * MiB)})).build(Length{MiB});
    check_wrapped_error(beyond, make_error_code(errc::out_of_range),
                        "invalid RAM range 0x0-0x200000");

#if MEMBACKING_OS_LINUX // mmap failure injection
    // Mapping RAM into the primary VA mapper fails: the RAM region cannot be enabled.
    test::InjectingSyscalls::reset();
    test::InjectingSyscalls::fail_mmap(2); // 1: the primary's reservation, 2: mapping the RAM
    auto enable = InjectedManager::builder().add_backing(ram({range(0, MiB)})).build(Length{MiB});
    test::InjectingSyscalls::reset();
    check_wrapped_error(enable, os_code(ENOMEM), "failed to enable RAM region 0x0-0x100000");
    CHECK(enable.error().full_message().find("Cannot allocate memory") != std::string::npos);
#endif
}

TEST_CASE("build: an existing mappable smaller than the RAM it backs is refused up front")
{
    auto small = Manager::builder()
                     .add_backing(ram({range(2 * MiB, 3 * MiB), range(0, MiB)})
                                      .existing_mappable(test::make_object(MiB)))
                     .build(Length{4 * MiB});
    REQUIRE_FALSE(small);
    CHECK(small.error().code() == errc::invalid_range);
    CHECK(small.error().full_message() ==
          "backing 0: the existing mappable for RAM ranges [0x0-0x100000, 0x200000-0x300000] "
          "(0x200000 bytes): object range 0x0-0x200000 lies beyond the end of the object "
          "(0x100000 bytes)");
    // Exactly the RAM's size (or more) is fine.
    CHECK(Manager::builder()
              .add_backing(ram({range(0, MiB), range(2 * MiB, 3 * MiB)})
                               .existing_mappable(test::make_object(2 * MiB)))
              .build(Length{4 * MiB}));
#if MEMBACKING_OS_LINUX // syscall injection
    // Refused before anything is allocated or mapped: no memfd, no mmap.
    test::InjectingSyscalls::reset();
    auto injected =
        InjectedManager::builder()
            .add_backing(ram({range(0, 2 * MiB)}).existing_mappable(test::make_object(MiB)))
            .add_backing(ram({range(2 * MiB, 3 * MiB)}))
            .build(Length{4 * MiB});
    const std::size_t memfds = test::InjectingSyscalls::memfd_plan.calls;
    const std::size_t mmaps = test::InjectingSyscalls::mmap_plan.calls;
    test::InjectingSyscalls::reset();
    CHECK(test::error_of(injected) == errc::invalid_range);
    CHECK(memfds == 0);
    CHECK(mmaps == 0);
    // The size cannot be learnt: the OS error's code, with the backing as context.
    test::InjectingSyscalls::reset();
    test::InjectingSyscalls::fstat_plan = test::Plan{0, EBADF};
    auto unknown = InjectedManager::builder()
                       .add_backing(ram({range(0, MiB)}).existing_mappable(test::make_object(MiB)))
                       .build(Length{4 * MiB});
    test::InjectingSyscalls::reset();
    REQUIRE_FALSE(unknown);
    CHECK(unknown.error().code() == os_code(EBADF));
    CHECK(unknown.error().message() ==
          "backing 0: the existing mappable for RAM ranges [0x0-0x100000] (0x100000 bytes)");
#endif
}

TEST_CASE("reference 45: a single backing")
{
    Manager m = must(Manager::builder().add_backing(ram({range(0, 4 * pg)})).build(Length{4 * pg}));
    auto mem = m.guest_memory();
    REQUIRE(mem.fill(Gpa{0}, 0xab, Length{pg}).has_value());
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{pg - 1})) == 0xab);
    CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{pg})) == 0);
}

TEST_CASE("reference 46-48: two backings, different sizes, and a gap")
{
    {
        Manager m = must(Manager::builder()
                             .add_backing(ram({range(0, 2 * pg)}))
                             .add_backing(ram({range(2 * pg, 4 * pg)}))
                             .build(Length{4 * pg}));
        auto mem = m.guest_memory();
        REQUIRE(mem.fill(Gpa{0}, 0x11, Length{pg}).has_value());
        REQUIRE(mem.fill(Gpa{2 * pg}, 0x22, Length{pg}).has_value());
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{0})) == 0x11);
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{2 * pg})) == 0x22);
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{pg})) == 0);
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{3 * pg})) == 0);
        CHECK_FALSE(m.shared_memory_backing().has_value()); // two backings: no restart
    }
    {
        Manager m = must(Manager::builder()
                             .add_backing(ram({range(0, pg)}))
                             .add_backing(ram({range(pg, 4 * pg)}))
                             .build(Length{4 * pg}));
        auto mem = m.guest_memory();
        for (std::uint64_t p : {0ULL, 1ULL, 3ULL})
            REQUIRE(mem.write_plain<std::uint8_t>(Gpa{p * pg}, static_cast<std::uint8_t>(p + 1))
                        .has_value());
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{0})) == 1);
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{pg})) == 2);
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{2 * pg})) == 0);
        CHECK(test::value_of(mem.read_plain<std::uint8_t>(Gpa{3 * pg})) == 4);
    }
    {
        Manager m = must(Manager::builder()
                             .add_backing(ram({range(0, 2 * pg)}))
                             .add_backing(ram({range(4 * pg, 6 * pg)}))
                             .build(Length{6 * pg}));
        auto mem = m.guest_memory();
        CHECK(mem.write_plain<std::uint64_t>(Gpa{pg}, 7).has_value());
        CHECK(mem.write_plain<std::uint64_t>(Gpa{5 * pg}, 9).has_value());
        CHECK(test::value_of(mem.read_plain<std::uint64_t>(Gpa{5 * pg})) == 9);
        CHECK(test::error_of(mem.read_plain<std::uint8_t>(Gpa{3 * pg})) == errc::unmapped);
    }
}

TEST_CASE("ranges of one backing are laid out back to back in its object")
{
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(0x10000, 0x12000), range(0x40000, 0x41000)}))
                         .build(Length{0x100000}));
    auto backing = m.shared_memory_backing();
    REQUIRE(backing.has_value());
    const MemoryMap map = m.memory_map();
    REQUIRE(map.regions.size() == 2);
    CHECK(map.regions[1].mappings.at(0).file_offset == 0x2000);
    CHECK(map.regions[1].mappings.at(0).object == backing->mappable().identity());
}

TEST_CASE("x86 legacy support splits low RAM into 16 controllable regions")
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(ram({range(0, 4 * MiB)}))
                         .build(Length{4 * MiB}));
    const MemoryMap map = m.memory_map();
    REQUIRE(map.regions.size() == 16);
    CHECK(map.regions[0].name == "ram-low");
    CHECK(map.regions[0].range == range(0, 0xa0000));
    CHECK(map.regions[1].name == "ram-vga");
    CHECK(map.regions[2].name == "ram-pam-0xc0000");
    CHECK(map.regions[2].range == range(0xc0000, 0xc4000));
    CHECK(map.regions[13].name == "ram-pam-0xec000");
    CHECK(map.regions[14].name == "ram-f-segment");
    CHECK(map.regions[14].range == range(0xf0000, 0x100000));
    CHECK(map.regions[15].range == range(0x100000, 4 * MiB));
    for (const auto& r : map.regions) {
        CHECK(r.active);
        CHECK(r.priority == 255);
    }
    // One object, laid out contiguously: GPA g is at file offset g.
    CHECK(map.regions[7].mappings.at(0).file_offset == map.regions[7].range.start());
}

TEST_CASE("x86 legacy RAM that ends exactly at 1 MiB creates no empty region (reference quirk)")
{
    Manager m = must(Manager::builder()
                         .x86_legacy_support(true)
                         .add_backing(ram({range(0, MiB)}))
                         .build(Length{MiB}));
    CHECK(m.memory_map().regions.size() == 15);
}

#if MEMBACKING_OS_LINUX // THP
TEST_CASE("transparent huge pages are advised on the RAM's VA (smaps shows the hg flag)")
{
    Manager thp = must(Manager::builder()
                           .add_backing(ram({range(0, 4 * MiB)}).transparent_hugepages(true))
                           .build(Length{4 * MiB}));
    const auto with = test::smaps_for(thp.guest_memory().mapper()->base());
    REQUIRE(with.found);
    CHECK(with.vm_flags.find(" hg") != std::string::npos);

    Manager plain =
        must(Manager::builder().add_backing(ram({range(0, 4 * MiB)})).build(Length{4 * MiB}));
    const auto without = test::smaps_for(plain.guest_memory().mapper()->base());
    REQUIRE(without.found);
    CHECK(without.vm_flags.find(" hg") == std::string::npos);
}
#endif

#if MEMBACKING_OS_LINUX // mbind
TEST_CASE("a host NUMA node binds the RAM (get_mempolicy reports MPOL_BIND to node 0)")
{
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(0, 2 * MiB)}).host_numa_node(0))
                         .build(Length{2 * MiB}));
    std::byte* base = m.guest_memory().mapper()->base();
    int mode = -1;
    unsigned long mask = 0;
    REQUIRE(os::LinuxSyscalls::get_mempolicy(&mode, &mask, sizeof(mask) * 8, base,
                                             2 /* MPOL_F_ADDR */) == 0);
    CHECK(mode == 2 /* MPOL_BIND */);
    CHECK(mask == 1);
}
#endif

TEST_CASE("private memory backs RAM in the primary mapper only")
{
    Manager m = must(Manager::builder()
                         .add_backing(ram({range(0, MiB)}).private_memory(true))
                         .build(Length{MiB}));
    auto mem = m.guest_memory();
    REQUIRE(mem.write_plain<std::uint32_t>(Gpa{0x100}, 0x12345678).has_value());
    CHECK(test::value_of(mem.read_plain<std::uint32_t>(Gpa{0x100})) == 0x12345678);
    CHECK_FALSE(m.shared_memory_backing().has_value());
    CHECK(test::error_of(m.client().lazy_guest_memory()) == errc::conflict); // one mapper only
}

TEST_CASE("prefetch is passed to partitions when RAM is mapped")
{
    Manager m = must(
        Manager::builder().add_backing(ram({range(0, MiB)}).prefetch(true)).build(Length{MiB}));
    auto part = std::make_shared<MockPartition>();
    REQUIRE(m.attach_partition(Vtl::vtl0, part).has_value());
    const auto calls = part->calls();
    REQUIRE(calls.size() == 2);
    CHECK(calls[1].op == MockPartition::Op::prefetch);
    CHECK(calls[1].gpa == 0);
    CHECK(calls[1].size == MiB);
}
