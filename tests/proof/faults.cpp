// Exhaustive fault injection. Every underlying call a control operation makes (each system call
// through the Linux seam, each partition call) is numbered from the operation's start; for
// n = 1, 2, ... the n-th fails, until the operation succeeds without reaching n.
//
// After each single failure (transient: only the n-th call fails): the operation either failed
// and the memory-map dump, every partition's windows and the bytes seen through the primary
// and a lazy mapper are exactly as before, or it succeeded (the failure was absorbed: advice
// such as MADV_HUGEPAGE) and the state is the one the operation reaches without injection; then
// a retry without injection succeeds and reaches that state.
//
// Persistent failures (the n-th call and every later one fail, until the operation returns):
// each case runs in a forked child, so that a fatal() would be counted, not end the run; every
// one must survive (issue 10, defect 7). After each, either the state is exactly as before
// (rolled back) and a retry succeeds, or the manager reports what it took out of service
// (health(), and the memory map's "out of service" section) and then: the memory map without
// that section is as before, every other partition's windows and every other mapper's bytes are
// as before; after a retry (which succeeds) the others reach the state the operation reaches
// without injection, and every access through a quarantined mapper fails with
// errc::quarantined; then, the host accepting calls again, restore_mapper brings every
// quarantined mapper back, after which it too reads what a run without injection reads. The
// counts are printed per operation, so they are visible in every CI log.
#include <membacking/membacking.hpp>

#include "fake_kvm.hpp"
#include "platform.hpp"
#include "sweep_guest.hpp"
#include "test_support.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <dirent.h>
#include <fcntl.h>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

using namespace membacking;
using namespace membacking::test::sweep;
using test::must;
using test::range;

namespace {

/// One numbering of the calls, shared by the syscall seam and the partition.
struct Injector {
    static inline long calls = 0;
    static inline long fail_at = 0; ///< 0: nothing fails
    static inline bool persistent = false;
    static inline long fired = 0;

    static void arm(long n, bool keep_failing)
    {
        calls = 0;
        fired = 0;
        fail_at = n;
        persistent = keep_failing;
    }
    static void disarm() { fail_at = 0; }
    /// Counts one call; true if it is to fail.
    static bool hit()
    {
        if (fail_at == 0)
            return false;
        ++calls;
        if (calls == fail_at || (persistent && calls > fail_at)) {
            ++fired;
            return true;
        }
        return false;
    }
};

/// The Linux seam, every call that can fail numbered by the Injector.
struct FaultSyscalls : os::LinuxSyscalls {
    static void* mmap(void* addr, std::size_t len, int prot, int flags, int fd, off_t off) noexcept
    {
        if (Injector::hit()) {
            errno = ENOMEM;
            return MAP_FAILED;
        }
        return os::LinuxSyscalls::mmap(addr, len, prot, flags, fd, off);
    }
#define MEMBACKING_INJECT(call, params, args)                                                      \
    static auto call params noexcept                                                               \
    {                                                                                              \
        if (Injector::hit()) {                                                                     \
            errno = ENOMEM;                                                                        \
            return decltype(os::LinuxSyscalls::call args){-1};                                     \
        }                                                                                          \
        return os::LinuxSyscalls::call args;                                                       \
    }
    MEMBACKING_INJECT(munmap, (void* addr, std::size_t len), (addr, len))
    MEMBACKING_INJECT(mprotect, (void* addr, std::size_t len, int prot), (addr, len, prot))
    MEMBACKING_INJECT(madvise, (void* addr, std::size_t len, int advice), (addr, len, advice))
    MEMBACKING_INJECT(mincore, (void* addr, std::size_t len, unsigned char* vec), (addr, len, vec))
    MEMBACKING_INJECT(mlock, (const void* addr, std::size_t len), (addr, len))
    MEMBACKING_INJECT(munlock, (const void* addr, std::size_t len), (addr, len))
    MEMBACKING_INJECT(memfd_create, (const char* name, unsigned flags), (name, flags))
    MEMBACKING_INJECT(ftruncate, (int fd, off_t len), (fd, len))
    MEMBACKING_INJECT(fallocate, (int fd, int mode, off_t offset, off_t len),
                      (fd, mode, offset, len))
    MEMBACKING_INJECT(fstat, (int fd, struct stat* st), (fd, st))
    MEMBACKING_INJECT(mbind,
                      (void* addr, unsigned long len, int mode, const unsigned long* mask,
                       unsigned long maxnode, unsigned flags),
                      (addr, len, mode, mask, maxnode, flags))
    MEMBACKING_INJECT(prctl,
                      (int option, unsigned long a2, unsigned long a3, unsigned long a4,
                       unsigned long a5),
                      (option, a2, a3, a4, a5))
#undef MEMBACKING_INJECT
};

/// The mock partition, its calls numbered by the Injector.
struct FlakyPartition : MockPartition {
    static constexpr std::string_view name = "flaky";
    static Error injected() { return make_error(errc::resource_exhausted, "injected"); }
    Result<void> map_range(void* host_va, std::uint64_t gpa, std::uint64_t size, bool writable,
                           bool executable)
    {
        if (Injector::hit())
            return injected();
        return MockPartition::map_range(host_va, gpa, size, writable, executable);
    }
    Result<void> unmap_range(std::uint64_t gpa, std::uint64_t size)
    {
        if (Injector::hit())
            return injected();
        return MockPartition::unmap_range(gpa, size);
    }
    Result<void> pin_range(std::uint64_t gpa, std::uint64_t size)
    {
        if (Injector::hit())
            return injected();
        return MockPartition::pin_range(gpa, size);
    }
    Result<void> unpin_range(std::uint64_t gpa, std::uint64_t size)
    {
        if (Injector::hit())
            return injected();
        return MockPartition::unpin_range(gpa, size);
    }
};

using Va = LinuxMmap<FaultSyscalls>;
using Manager = GuestMemoryManager<NestedPriority, Va, FlakyPartition>;

/// The mock sweep's guest: a flaky mock partition attached, and a spare one to attach.
struct Fixture : GuestFixture<Manager> {
    using GuestFixture::GuestFixture;
    std::shared_ptr<FlakyPartition> partition = std::make_shared<FlakyPartition>();
    std::shared_ptr<FlakyPartition> spare = std::make_shared<FlakyPartition>(); // not attached
};

Manager build_guest()
{
    return must(Manager::builder()
                    .x86_legacy_support(true)
                    .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                    .build(Length{32 * MiB}));
}

std::unique_ptr<Fixture> make_fixture()
{
    Injector::disarm();
    auto f = std::make_unique<Fixture>(build_guest());
    f->id = must(f->m.attach_partition(Vtl::vtl0, f->partition));
    populate(*f);
    return f;
}

std::size_t occurrences(const std::string& text, const std::string& what)
{
    std::size_t n = 0;
    for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1))
        ++n;
    return n;
}

/// What must not change when an operation fails.
struct Snapshot {
    MemoryMap map; ///< compared as text, without its "out of service" section (dump())
    /// Per partition (attached, spare): its windows, host_va relative to the primary's base.
    std::vector<std::vector<MockPartition::Window>> windows;
    /// The fake KVM's memslots (the KVM sweep's partition), by GPA, slot numbers left out and
    /// userspace addresses relative to the primary's base.
    std::vector<test::FakeKvm::Slot> memslots;
    /// Per mapper (primary, lazy), per probe: the value read, or -errc.
    std::vector<std::vector<std::int64_t>> bytes;
    /// What the manager reports out of service: partitions failed, mappers quarantined (by
    /// position: primary, lazy); and whether health(), the dump's section and each mapper's own
    /// quarantined() agree.
    std::vector<bool> partition_failed, mapper_quarantined;
    bool reported_consistently = true;

    std::vector<PartitionId> failed_ids;

    /// The memory map's text without what `failed` lists: a failed partition stays attached
    /// (reported, then detachable), so a dump taken before it failed lists it as attached.
    /// `renumber`: partition ids read 0 (a failed attach takes an id, so the retry gets another).
    [[nodiscard]] std::string dump(const std::vector<PartitionId>& failed, bool renumber) const
    {
        MemoryMap m = map;
        m.health = {};
        const auto is_failed = [&](PartitionId id) { return std::ranges::count(failed, id) > 0; };
        std::erase_if(m.partitions, [&](const MemoryMap::Partition& p) { return is_failed(p.id); });
        for (MemoryMap::Region& r : m.regions)
            std::erase_if(r.given, [&](const MemoryMap::PartitionAccess& g) {
                return is_failed(g.partition);
            });
        if (renumber) {
            for (MemoryMap::Partition& p : m.partitions)
                p.id = PartitionId{0};
            for (MemoryMap::Region& r : m.regions)
                for (MemoryMap::PartitionAccess& g : r.given)
                    g.partition = PartitionId{0};
        }
        return m.to_text();
    }
    [[nodiscard]] bool healthy() const
    {
        return std::ranges::none_of(partition_failed, std::identity{}) &&
               std::ranges::none_of(mapper_quarantined, std::identity{});
    }
};

/// What every manager type shows: the dump, health() and the bytes through `lazy` and the
/// primary; `attached` is the partition attached first (any other is the spare).
template <class M>
Snapshot snapshot_of(const M& m, const typename M::Memory& lazy, PartitionId attached)
{
    Injector::disarm();
    Snapshot s;
    s.map = m.memory_map();
    const std::string text = s.map.to_text();
    const std::size_t section = text.find("out of service:\n");
    const std::string out_of_service = section == std::string::npos ? "" : text.substr(section);
    const std::string json = s.map.to_json();
    const Health health = m.health();
    for (const Health::FailedPartition& p : health.failed_partitions)
        s.failed_ids.push_back(p.id);
    // The JSON lists the same: entries with a "cause" exist only in those two lists.
    s.reported_consistently =
        health.ok() == (section == std::string::npos) &&
        health.ok() == (json.find("\"quarantined_mappers\":[]") != std::string::npos &&
                        json.find("\"failed_partitions\":[]") != std::string::npos) &&
        health.quarantined_mappers.size() + health.failed_partitions.size() ==
            occurrences(json, ",\"cause\":");
    const auto failed = [&](PartitionId id) {
        return std::ranges::any_of(health.failed_partitions,
                                   [&](const Health::FailedPartition& p) { return p.id == id; });
    };
    // The spare is attached only by attach_partition, under the next id, failed or not.
    s.partition_failed = {
        failed(attached),
        std::ranges::any_of(health.failed_partitions,
                            [&](const Health::FailedPartition& p) { return p.id != attached; })};
    for (const Health::FailedPartition& p : health.failed_partitions)
        s.reported_consistently = s.reported_consistently &&
                                  out_of_service.find("partition #" + std::to_string(p.id.value) +
                                                      " failed: ") != std::string::npos;
    const typename M::Memory primary = m.guest_memory();
    for (const auto* mem : {&primary, &lazy}) {
        const auto& mapper = *mem->mapper();
        const bool listed = std::ranges::any_of(
            health.quarantined_mappers,
            [&](const Health::QuarantinedMapper& q) { return q.id == mapper.id(); });
        s.mapper_quarantined.push_back(listed);
        s.reported_consistently = s.reported_consistently && listed == mapper.quarantined();
        if (listed)
            s.reported_consistently =
                s.reported_consistently &&
                out_of_service.find("VA mapper " + std::to_string(mapper.id()) + " quarantined") !=
                    std::string::npos;
        auto& out = s.bytes.emplace_back();
        for (const std::uint64_t g : probe_gpas()) {
            auto v = mem->template read_plain<std::uint64_t>(Gpa{g});
            out.push_back(v ? static_cast<std::int64_t>(*v)
                            : -static_cast<std::int64_t>(v.error().code));
        }
    }
    return s;
}

Snapshot snapshot(const Fixture& f)
{
    Snapshot s = snapshot_of(f.m, f.lazy, f.id);
    const std::byte* base = f.m.guest_memory().mapper()->base();
    for (const auto* p : {f.partition.get(), f.spare.get()}) {
        auto& out = s.windows.emplace_back();
        for (auto w : p->windows()) {
            w.host_va = reinterpret_cast<const void*>( // NOLINT(performance-no-int-to-ptr)
                static_cast<std::byte const*>(w.host_va) - base);
            out.push_back(w);
        }
    }
    return s;
}

/// Compares two snapshots, leaving out what `got` reports out of service (quarantine == true)
/// and the failed partitions the test `detached` since, or demanding that everything matches,
/// the health included; prints where they differ first (to stderr), for the failure report.
bool diverged(const Snapshot& got, const Snapshot& want, bool quarantine = false,
              const std::vector<PartitionId>& detached = {})
{
    std::vector<PartitionId> left_out = got.failed_ids;
    left_out.insert(left_out.end(), detached.begin(), detached.end());
    if (!got.reported_consistently) {
        std::fprintf(stderr, "health(), the memory map and the mappers disagree\n");
        return true;
    }
    if (const std::string g = got.dump(left_out, quarantine), w = want.dump(left_out, quarantine);
        g != w) {
        std::fprintf(stderr, "dump differs:\n%s\n--- expected:\n%s\n", g.c_str(), w.c_str());
        return true;
    }
    if (!quarantine && !(got.healthy() && want.healthy())) {
        std::fprintf(stderr, "something is out of service\n");
        return true;
    }
    for (std::size_t p = 0; p < got.windows.size(); ++p)
        if (!got.partition_failed[p] && got.windows[p] != want.windows[p]) {
            std::fprintf(stderr, "partition %zu's windows differ (%zu, expected %zu)\n", p,
                         got.windows[p].size(), want.windows[p].size());
            return true;
        }
    // The KVM sweep attaches one partition (or, for attach, only that one): failed, its
    // memslots are what it could not undo, reported by health().
    if (std::ranges::none_of(got.partition_failed, std::identity{}) && detached.empty() &&
        got.memslots != want.memslots) {
        std::fprintf(stderr, "the KVM memslots differ (%zu, expected %zu)\n", got.memslots.size(),
                     want.memslots.size());
        return true;
    }
    for (std::size_t m = 0; m < got.bytes.size(); ++m) {
        if (got.mapper_quarantined[m])
            continue;
        for (std::size_t i = 0; i < got.bytes[m].size(); ++i)
            if (got.bytes[m][i] != want.bytes[m][i]) {
                std::fprintf(stderr, "mapper %zu: bytes differ at probe %zu: %llx, expected %llx\n",
                             m, i, static_cast<unsigned long long>(got.bytes[m][i]),
                             static_cast<unsigned long long>(want.bytes[m][i]));
                return true;
            }
    }
    return false;
}

/// After a persistent failure that took something out of service, and a retry: every access
/// through a quarantined mapper fails with errc::quarantined.
bool quarantine_holds(const Snapshot& s)
{
    for (std::size_t m = 0; m < s.bytes.size(); ++m)
        if (s.mapper_quarantined[m])
            for (const std::int64_t v : s.bytes[m])
                if (v != -static_cast<std::int64_t>(errc::quarantined)) {
                    std::fprintf(stderr, "mapper %zu is quarantined, but an access gave %llx\n", m,
                                 static_cast<unsigned long long>(v));
                    return false;
                }
    return true;
}

using Operation = SweepOperation<Fixture>;

std::vector<Operation> operations()
{
    std::vector<Operation> ops = {
        {"attach_partition",
         {},
         [](Fixture& f) { return drop_value(f.m.attach_partition(Vtl::vtl0, f.spare)); }},
    };
    std::ranges::move(shared_operations<Fixture>(""), std::back_inserter(ops));
    return ops;
}

std::size_t open_fds()
{
    std::size_t n = 0;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (::readdir(d) != nullptr)
            ++n;
        ::closedir(d);
    }
    return n;
}

/// The builder's variants: each is an operation with no fixture.
template <class M>
struct BuildVariant {
    std::string name;
    std::function<Result<M>()> build;
};
/// For manager type M (the KVM sweep's is dirty-tracked: its build also makes the dirty map);
/// `tag` ends each name.
template <class M>
std::vector<BuildVariant<M>> builds(const std::string& tag)
{
    std::vector<BuildVariant<M>> variants = {
        {"build (memfd RAM)",
         [] {
             return M::builder()
                 .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                 .build(Length{8 * MiB});
         }},
        {"build (x86 legacy)",
         [] {
             return M::builder()
                 .x86_legacy_support(true)
                 .add_backing(RamBackingRequest({range(0, 2 * MiB)}))
                 .build(Length{8 * MiB});
         }},
        {"build (private memory, THP)",
         [] {
             return M::builder()
                 .add_backing(RamBackingRequest({range(0, 2 * MiB)})
                                  .private_memory(true)
                                  .transparent_hugepages(true))
                 .build(Length{8 * MiB});
         }},
        {"build (an existing mappable, its size checked first)",
         [] {
             return M::builder()
                 .add_backing(RamBackingRequest({range(0, 2 * MiB)})
                                  .existing_mappable(test::make_object(2 * MiB)))
                 .build(Length{8 * MiB});
         }},
        {"build (two backings)",
         [] {
             return M::builder()
                 .add_backing(RamBackingRequest({range(0, MiB)}))
                 .add_backing(RamBackingRequest({range(2 * MiB, 3 * MiB)}))
                 .build(Length{8 * MiB});
         }},
    };
    for (BuildVariant<M>& b : variants)
        b.name += tag;
    return variants;
}

// ---- The same sweep through the KVM policy: KvmPartition over a fake kernel (FakeKvm) whose
// VM ioctls are numbered by the Injector together with the VA seam's system calls.

using KvmPart = KvmPartition<test::FakeKvm>;
using KvmManager = TrackedGuestMemoryManager<NestedPriority, Va, KvmPart>;

/// The fake kernel's generation for the next fixtures (test::FakeKvm::modern): the sweeps run
/// against both. The modern one's partition clears its dirty log in chunks of 64 pages, so a
/// take of a window issues several KVM_CLEAR_DIRTY_LOG calls for the sweep to fail.
bool kvm_modern = false;

/// Pages a guest writes before the take sweep (test::FakeKvm::dirty): in RAM below 640 KiB and
/// three chunks of RAM above 1 MiB.
constexpr std::uint64_t guest_dirty_pages[] = {0x10000, 0x105000, 0x246000, 0x3c8000};

/// The mock's guest (populate()) with a KVM partition over the fake kernel attached, dirty
/// tracking built in, and a ROM region (unmapped) for the operations to map read-only.
struct KvmFixture : GuestFixture<KvmManager> {
    using GuestFixture::GuestFixture;
    std::shared_ptr<KvmPart> partition;
    RegionId rom{};
    std::vector<std::uint64_t> taken; ///< pages the take operation's successful runs returned
    /// The tracked variants: pages the guest (the fake kernel's log) and the VMM (the tracked
    /// GuestMemory) wrote before the operation.
    std::vector<std::uint64_t> guest_written, vmm_written;
};

std::unique_ptr<KvmFixture> make_kvm_fixture()
{
    Injector::disarm();
    test::FakeKvm::reset();
    test::FakeKvm::modern = kvm_modern;
    test::FakeKvm::inject = &Injector::hit;
    auto f =
        std::make_unique<KvmFixture>(must(KvmManager::builder()
                                              .x86_legacy_support(true)
                                              .add_backing(RamBackingRequest({range(0, 4 * MiB)}))
                                              .build(Length{32 * MiB})));
    const int vm = ::open("/dev/null", O_RDONLY | O_CLOEXEC); // stands for the VM's descriptor
    REQUIRE(vm >= 0);
    f->partition = must(KvmPart::create(vm));
    ::close(vm);
    REQUIRE(f->partition->capabilities().manual_dirty_log_protect == kvm_modern);
    if (kvm_modern)
        f->partition->set_clear_chunk_pages(64);
    f->id = must(f->m.attach_partition(Vtl::vtl0, f->partition));
    populate(*f);
    f->rom = must(f->m.add_region("rom", range(rom_at, rom_at + 0x10000), 1, MappingType::Ram));
    must(f->m.add_mapping(f->rom, {range(0, 0x10000),
                                   MappingBacking::file(test::make_object(0x10000), Offset{0}),
                                   false,
                                   {}}));
    return f;
}

Snapshot snapshot(const KvmFixture& f)
{
    Snapshot s = snapshot_of(f.m, f.lazy, f.id);
    const auto base = reinterpret_cast<std::uint64_t>(f.m.guest_memory().mapper()->base());
    for (const auto& [slot, info] : test::FakeKvm::slots) {
        test::FakeKvm::Slot relative = info;
        relative.userspace_addr -= base;
        s.memslots.push_back(relative);
    }
    std::ranges::sort(s.memslots, {}, &test::FakeKvm::Slot::gpa);
    return s;
}

using KvmOperation = SweepOperation<KvmFixture>;

/// The pages of `runs`, in order.
std::vector<std::uint64_t> pages_of(const std::vector<DirtyRun>& runs)
{
    std::vector<std::uint64_t> pages;
    for (const DirtyRun& r : runs)
        for (std::uint64_t g = r.gpa.value(); g < r.gpa.value() + r.length.value(); g += page_size)
            pages.push_back(g);
    return pages;
}

/// What the tracked variants' guest writes before the operation (where a logging memslot holds
/// the page): RAM, a PAM segment, each stack's visible region and the BAR. The VMM writes the
/// page after each.
constexpr std::uint64_t tracked_guest_pages[] = {0x10000,         0x105000,        0xc0000,
                                                 stack1 + 0x1000, stack2 + 0x2000, stack3 + 0x5000,
                                                 stack4 + 0x1000, stack4 + 0x4000, bar_at + 0x3000};

/// The tracked variant of `op`: the same operation during a migration pass (tracking on, pages
/// written by the guest and by the VMM), after which, failed and retried or not, the next take
/// returns every one of those pages still visible, the guest's and the VMM's, whatever failed: a
/// partition that failed is detached here (the documented recovery), which keeps its log (or,
/// a failed partition's log untrusted, every page it could write).
KvmOperation tracked(KvmOperation op)
{
    op.name += ", tracking";
    op.prepare = [prepare = std::move(op.prepare)](KvmFixture& f) -> Result<void> {
        if (prepare)
            MEMBACKING_TRY(prepare(f));
        MEMBACKING_TRY(f.m.start_dirty_tracking());
        for (const std::uint64_t g : tracked_guest_pages) {
            if (test::FakeKvm::dirty(g))
                f.guest_written.push_back(g);
            else if (!test::FakeKvm::slots.empty()) // none: detached (attach's preparation)
                return make_error(errc::not_found,
                                  "no logging memslot holds " + MemoryRange::hex(g));
            if (!f.m.guest_memory().write_plain<std::uint64_t>(Gpa{g + page_size}, g))
                return make_error(errc::invalid_range,
                                  "the VMM cannot write " + MemoryRange::hex(g + page_size));
            f.vmm_written.push_back(g + page_size);
        }
        return {};
    };
    op.verify = [](KvmFixture& f) -> Result<void> {
        const Health health = f.m.health();
        for (const Health::FailedPartition& p : health.failed_partitions)
            MEMBACKING_TRY(f.m.detach_partition(p.id));
        std::vector<DirtyRun> runs;
        MEMBACKING_TRY(f.m.take_dirty_runs(range(0, 32 * MiB), runs));
        const std::vector<std::uint64_t> pages = pages_of(runs);
        // A page hidden now (a PAM segment unmapped, a region removed) is not copied, so it
        // need not be reported: when it shows again it is dirty whole (README, "Regions
        // toggled, moved or removed during a pass"). Whether it shows is the snapshot's to check.
        const auto visible = [&](std::uint64_t g) {
            return f.m.guest_memory().template read_plain<std::uint8_t>(Gpa{g}).has_value();
        };
        const auto lost = [&](const std::vector<std::uint64_t>& written,
                              const char* by) -> Result<void> {
            for (const std::uint64_t g : written)
                if (visible(g) && std::ranges::find(pages, g) == pages.end())
                    return make_error(errc::conflict, std::string("the page ") +
                                                          MemoryRange::hex(g) + " written by " +
                                                          by + " was not reported");
            return {};
        };
        MEMBACKING_TRY(lost(f.vmm_written, "the VMM"));
        MEMBACKING_TRY(lost(f.guest_written, "the guest"));
        return {};
    };
    return op;
}

/// Every operation of the mock's table but attaching the spare (here: the partition, detached
/// first), and those only a KVM guest has: a ROM, and the dirty log.
std::vector<KvmOperation> kvm_operations()
{
    const auto start_tracking = [](KvmFixture& f) { return f.m.start_dirty_tracking(); };
    std::vector<KvmOperation> ops = {
        {"attach_partition (KVM)", [](KvmFixture& f) { return f.m.detach_partition(f.id); },
         [](KvmFixture& f) { return drop_value(f.m.attach_partition(Vtl::vtl0, f.partition)); }},
    };
    std::ranges::move(shared_operations<KvmFixture>(" (KVM)"), std::back_inserter(ops));
    std::vector<KvmOperation> own = {
        {"map_region read-only: a ROM (KVM)",
         {},
         [](KvmFixture& f) {
             return f.m.map_region(f.rom, {false, false, false});
         }},
        {"start_dirty_tracking (KVM)", {}, start_tracking},
        {"take_dirty_runs (KVM)",
         [start_tracking](KvmFixture& f) -> Result<void> {
             MEMBACKING_TRY(start_tracking(f));
             for (const std::uint64_t g : guest_dirty_pages)
                 if (!test::FakeKvm::dirty(g))
                     return make_error(errc::not_found,
                                       "no logging memslot holds " + MemoryRange::hex(g));
             return {};
         },
         // A take that fails loses no page: the one that succeeds after it (the sweep's retry)
         // returns every page the guest wrote.
         [](KvmFixture& f) -> Result<void> {
             std::vector<DirtyRun> runs;
             MEMBACKING_TRY(f.m.take_dirty_runs(range(0, 32 * MiB), runs));
             std::ranges::copy(pages_of(runs), std::back_inserter(f.taken));
             for (const std::uint64_t g : guest_dirty_pages)
                 if (std::ranges::find(f.taken, g) == f.taken.end())
                     return make_error(errc::conflict, "the guest's page " + MemoryRange::hex(g) +
                                                           " was lost by a failed take");
             return {};
         }},
        {"stop_dirty_tracking (KVM)", start_tracking,
         [](KvmFixture& f) { return f.m.stop_dirty_tracking(); }},
    };
    // The topology operations again, during a migration pass.
    const std::size_t topology = ops.size() + 1; // those so far and the ROM's
    std::ranges::move(own, std::back_inserter(ops));
    for (std::size_t i = 0; i < topology; ++i)
        ops.push_back(tracked(ops[i]));
    return ops;
}

/// The outcome of one injected run, as the checks see it.
enum class Verdict { consistent, quarantined, restored, diverged, retry_failed };

/// A new fixture of `op`'s type, prepared for it.
template <class F>
std::unique_ptr<F> fresh(const SweepOperation<F>& op)
{
    std::unique_ptr<F> f;
    if constexpr (std::is_same_v<F, KvmFixture>)
        f = make_kvm_fixture();
    else
        f = make_fixture();
    if (op.prepare)
        must(op.prepare(*f));
    return f;
}

/// Runs `op` on `f` with the n-th call failing (and, if `persistent`, every later one), and
/// judges the state it leaves, a retry's and a restore's (see the file comment).
template <class Op, class F>
Verdict judge(const Op& op, F& f, const Snapshot& reference_after, long n, bool persistent,
              bool& succeeded, bool& reached)
{
    const Snapshot before = snapshot(f);
    Injector::arm(n, persistent);
    Result<void> r = op.run(f);
    reached = Injector::fired > 0;
    Injector::disarm();
    succeeded = r.has_value();
    if (r)
        return diverged(snapshot(f), reference_after) ? Verdict::diverged : Verdict::consistent;
    const Snapshot failed = snapshot(f);
    // Only a persistent failure may take something out of service.
    const bool quarantine = persistent && !failed.healthy();
    if (diverged(failed, before, quarantine))
        return Verdict::diverged;
    auto again = op.run(f);
    std::vector<PartitionId> detached;
    if (!again && quarantine) {
        // A failed partition keeps what it could not undo (a retried attach of it overlaps), and
        // a migration refuses to start while it is attached: the documented recovery is to
        // detach it, then retry.
        // One the operation itself attached (a failed attach) is attached again by the retry:
        // only those attached before are missing from the state it reaches.
        for (const PartitionId id : failed.failed_ids)
            if (f.m.detach_partition(id) &&
                std::ranges::any_of(before.map.partitions,
                                    [&](const MemoryMap::Partition& p) { return p.id == id; }))
                detached.push_back(id);
        again = op.run(f);
    }
    if (!again) {
        std::fprintf(stderr, "the retry failed: %s\n", again.error().full_message().c_str());
        return Verdict::retry_failed;
    }
    const Snapshot retried = snapshot(f);
    if (diverged(retried, reference_after, quarantine, detached))
        return Verdict::diverged;
    if (!quarantine)
        return Verdict::consistent;
    if (!quarantine_holds(retried))
        return Verdict::diverged;
    if (std::ranges::none_of(retried.mapper_quarantined, std::identity{}))
        return Verdict::quarantined;
    // The host accepts calls again: each quarantined mapper is put back in service, and then
    // reads what a run without injection reads (failed partitions stay out of service).
    for (const Health::QuarantinedMapper& q : f.m.health().quarantined_mappers)
        if (auto back = f.m.restore_mapper(q.id); !back) {
            std::fprintf(stderr, "restoring VA mapper %llu failed: %s\n",
                         static_cast<unsigned long long>(q.id),
                         back.error().full_message().c_str());
            return Verdict::diverged;
        }
    const Snapshot restored = snapshot(f);
    if (std::ranges::any_of(restored.mapper_quarantined, std::identity{})) {
        std::fprintf(stderr, "a mapper is still quarantined after restore_mapper\n");
        return Verdict::diverged;
    }
    return diverged(restored, reference_after, !restored.healthy(), detached) ? Verdict::diverged
                                                                              : Verdict::restored;
}

/// judge() on a fresh fixture, then the operation's own check of what must hold after it.
template <class Op>
Verdict run_injected(const Op& op, const Snapshot& reference_after, long n, bool persistent,
                     bool& succeeded, bool& reached)
{
    auto f = fresh(op);
    const Verdict v = judge(op, *f, reference_after, n, persistent, succeeded, reached);
    if (v == Verdict::diverged || v == Verdict::retry_failed || !op.verify)
        return v;
    Injector::disarm();
    if (auto r = op.verify(*f); !r) {
        std::fprintf(stderr, "%s\n", r.error().full_message().c_str());
        return Verdict::diverged;
    }
    return v;
}

/// The single-failure sweep of `ops`: counts its points (and those the operation absorbed).
template <class Op>
void sweep_single(const std::vector<Op>& ops, long& points, long& absorbed)
{
    for (const Op& op : ops) {
        Snapshot after;
        {
            auto f = fresh(op);
            must(op.run(*f));
            after = snapshot(*f);
            if (op.verify)
                must(op.verify(*f));
        }
        long n = 1;
        for (;; ++n) {
            bool succeeded = false, reached = false;
            const Verdict v = run_injected(op, after, n, false, succeeded, reached);
            if (!reached) {
                CHECK_MESSAGE(succeeded, op.name);
                break;
            }
            ++points;
            absorbed += succeeded ? 1 : 0;
            CHECK_MESSAGE(v == Verdict::consistent,
                          op.name << ": call " << n << " failing: "
                                  << std::string(v == Verdict::diverged ? "state diverged"
                                                                        : "the retry failed"));
        }
        MESSAGE(op.name << ": " << n - 1 << " injection points");
    }
}

/// The single-failure sweep of the builder's variants for manager type M.
template <class M>
void sweep_builds_single(const std::vector<BuildVariant<M>>& variants, long& points, long& absorbed)
{
    for (const BuildVariant<M>& b : variants) {
        long n = 1;
        for (;; ++n) {
            const std::size_t fds = open_fds();
            Injector::arm(n, false);
            auto r = b.build();
            const bool reached = Injector::fired > 0;
            Injector::disarm();
            if (!reached) {
                CHECK_MESSAGE(r.has_value(), b.name);
                break;
            }
            ++points;
            absorbed += r ? 1 : 0;
            if (!r) {
                CHECK_MESSAGE(open_fds() == fds, b.name << ": call " << n << ": an fd leaked");
                CHECK_MESSAGE(b.build().has_value(), b.name << ": the retry failed");
            }
        }
        MESSAGE(b.name << ": " << n - 1 << " injection points");
    }
}

} // namespace

TEST_CASE("fault injection: every single failure of every control operation is all-or-nothing")
{
    long points = 0, absorbed = 0;
    sweep_single(operations(), points, absorbed);
    sweep_builds_single(builds<Manager>(""), points, absorbed);
    MESSAGE("operations: " << operations().size() + builds<Manager>("").size()
                           << ", single-failure injection points: " << points
                           << " (absorbed, the operation succeeding anyway: " << absorbed << ")");
    CHECK(points > 100);
}

namespace {

/// Tallies of the persistent-failure runs, over every operation.
struct PersistentTally {
    long points = 0, rolled_back = 0, quarantined = 0, restored = 0, fatal = 0, inconsistent = 0;
};

/// Runs `child_body(n)` in a forked child for n = 1, 2, ... until it exits 2 (the n-th call is
/// never reached) and classifies each exit: 0 rolled back, 3 survived with something reported
/// out of service and checked (4: a quarantined mapper among it, restored and checked again),
/// SIGABRT fatal(), anything else inconsistent (a failed check).
template <class ChildBody>
void run_persistent(const std::string& name, PersistentTally& tally, ChildBody child_body)
{
    long op_points = 0, op_quarantined = 0, op_fatal = 0;
    for (long n = 1;; ++n) {
        std::fflush(nullptr);
        const pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            // A failed check's report (stderr) names the operation and the failure point.
            const int status = child_body(n);
            if (status == 1)
                std::fprintf(stderr, "(%s, calls %ld.. failing)\n", name.c_str(), n);
            std::fflush(nullptr);
            ::_exit(status);
        }
        int status = 0;
        REQUIRE(::waitpid(child, &status, 0) == child);
        if (WIFEXITED(status) && WEXITSTATUS(status) == 2)
            break;
        ++tally.points;
        ++op_points;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            ++tally.rolled_back;
        } else if (WIFEXITED(status) && (WEXITSTATUS(status) == 3 || WEXITSTATUS(status) == 4)) {
            ++tally.quarantined;
            ++op_quarantined;
            tally.restored += WEXITSTATUS(status) == 4 ? 1 : 0;
        } else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT) {
            ++tally.fatal;
            ++op_fatal;
            FAIL_CHECK(name << ": calls " << n << ".. failing: reached fatal()");
        } else {
            ++tally.inconsistent;
            FAIL_CHECK(name << ": calls " << n << ".. failing: inconsistent (status " << status
                            << ")");
        }
    }
    MESSAGE(name << ": " << op_points << " persistent injection points, " << op_quarantined
                 << " took something out of service, " << op_fatal << " reached fatal()");
}

/// The persistent-failure sweep of `ops`, each point in a forked child.
template <class Op>
void sweep_persistent(const std::vector<Op>& ops, PersistentTally& tally)
{
    for (const Op& op : ops) {
        Snapshot after;
        {
            auto f = fresh(op);
            must(op.run(*f));
            after = snapshot(*f);
            if (op.verify)
                must(op.verify(*f));
        }
        run_persistent(op.name, tally, [&](long n) {
            // 0: rolled back; 3: out of service, checked; 4: the same with a mapper restored;
            // 1: diverged, retry or restore failed; 2: not
            // reached (the end).
            bool succeeded = false, reached = false;
            const Verdict v = run_injected(op, after, n, true, succeeded, reached);
            if (!reached)
                return 2;
            switch (v) {
            case Verdict::consistent: return 0;
            case Verdict::quarantined: return 3;
            case Verdict::restored: return 4;
            default: return 1;
            }
        });
    }
}

/// The persistent-failure sweep of the builder's variants for manager type M.
template <class M>
void sweep_builds_persistent(const std::vector<BuildVariant<M>>& variants, PersistentTally& tally)
{
    for (const BuildVariant<M>& b : variants) {
        run_persistent(b.name, tally, [&](long n) {
            const std::size_t fds = open_fds();
            Injector::arm(n, true);
            bool ok = b.build().has_value();
            const bool reached = Injector::fired > 0;
            Injector::disarm();
            if (!reached)
                return 2;
            // Failed: no fd left behind, and a retry succeeds.
            ok = ok || (open_fds() == fds && b.build().has_value());
            return ok ? 0 : 1;
        });
    }
}

} // namespace

TEST_CASE("fault injection: persistent failures from the n-th call on (each in a forked child)")
{
    PersistentTally tally;
    sweep_persistent(operations(), tally);
    sweep_builds_persistent(builds<Manager>(""), tally);
    MESSAGE("persistent injection points: "
            << tally.points << ", rolled back: " << tally.rolled_back
            << ", survived with a mapper or partition out of service: " << tally.quarantined
            << " (a quarantined mapper restored in " << tally.restored << ")"
            << ", reached fatal(): " << tally.fatal << ", inconsistent: " << tally.inconsistent);
    CHECK(tally.points > 50);
    CHECK(tally.restored > 0); // restore_mapper is exercised, not only reachable
    CHECK(tally.fatal == 0);
    CHECK(tally.inconsistent == 0);
}

TEST_CASE("fault injection through the KVM policy: every single failure of a VM ioctl or a "
          "system call is all-or-nothing")
{
    for (const bool modern : {false, true}) {
        CAPTURE(modern);
        kvm_modern = modern;
        long points = 0, absorbed = 0;
        sweep_single(kvm_operations(), points, absorbed);
        sweep_builds_single(builds<KvmManager>(" (KVM, dirty-tracked)"), points, absorbed);
        MESSAGE(std::string(modern ? "modern" : "old")
                << " kernel: KVM operations: "
                << kvm_operations().size() + builds<KvmManager>("").size()
                << ", single-failure injection points: " << points << " (absorbed: " << absorbed
                << ")");
        CHECK(points > 20);
    }
    kvm_modern = false;
}

TEST_CASE("fault injection through the KVM policy: persistent failures from the n-th call on "
          "(each in a forked child)")
{
    for (const bool modern : {false, true}) {
        CAPTURE(modern);
        kvm_modern = modern;
        PersistentTally tally;
        sweep_persistent(kvm_operations(), tally);
        sweep_builds_persistent(builds<KvmManager>(" (KVM, dirty-tracked)"), tally);
        MESSAGE(std::string(modern ? "modern" : "old")
                << " kernel: KVM persistent injection points: " << tally.points
                << ", rolled back: " << tally.rolled_back
                << ", survived with a mapper or partition out of service: " << tally.quarantined
                << " (a quarantined mapper restored in " << tally.restored << ")"
                << ", reached fatal(): " << tally.fatal
                << ", inconsistent: " << tally.inconsistent);
        CHECK(tally.points > 20);
        CHECK(tally.restored > 0);
        CHECK(tally.fatal == 0);
        CHECK(tally.inconsistent == 0);
    }
    kvm_modern = false;
}
