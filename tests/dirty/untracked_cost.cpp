// The instruction-count check of the untracked access path (tests/dirty/untracked_cost.sh runs
// this program under callgrind): with NoDirtyTracking a GuestMemoryView's write_plain, read_plain,
// write and fill must cost exactly what the access path costs without any tracking policy. The
// baseline is that path written out by hand in this same program, from the same primitives: the
// bounds check (len <= size && gpa <= size - len), one guarded instruction, a cold error path.
// The tracked view's loops run too: they must cost more (the check can see a mark).
//
// Each loop runs argv[1] iterations; the script runs the program twice and divides the
// difference of each function's inclusive instruction count by the difference of iterations.
#include <membacking/membacking.hpp>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

using namespace membacking;

namespace {

using Manager = TrackedMockGuestMemoryManager;
using Untracked = GuestMemoryView<Manager::Mapper, Gpa, NoDirtyTracking>;
using Tracked = GuestMemoryView<Manager::Mapper, Gpa, DirtyTracking>;

constexpr std::uint64_t hot_gpa = 0x12340;

template <class T>
inline void opaque(T& v)
{
    asm volatile("" : "+r"(v));
}

/// A cold, out-of-line error, as the handle's (the baseline's results are built the same way).
MEMBACKING_NOINLINE MEMBACKING_COLD AccessError raw_error(std::uint64_t gpa) noexcept
{
    return {errc::unmapped, AccessKind::write, Gpa{gpa}, Length{0}};
}

struct Raw {
    std::byte* base;
    std::uint64_t size;
    [[nodiscard]] bool in_bounds(std::uint64_t gpa, std::uint64_t len) const noexcept
    {
        return len <= size && gpa <= size - len;
    }
    /// The access path written out by hand: bounds check, one guarded primitive, a result.
    template <class Op>
    MEMBACKING_ALWAYS_INLINE AccessResult<> access(std::uint64_t gpa, std::uint64_t len,
                                                   Op op) const noexcept
    {
        if (!in_bounds(gpa, len)) [[unlikely]]
            return raw_error(gpa);
        if (op(base + gpa)) [[likely]]
            return {};
        return raw_error(gpa);
    }
};

template <class View>
MEMBACKING_ALWAYS_INLINE std::uint64_t handle_write_u64(const View& handle, std::uint64_t n)
{
    View m = handle; // not const: GCC 12 will not scalarise a const local aggregate
    std::uint64_t gpa = hot_gpa;
    std::uint64_t v = 0;
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        opaque(v);
        if (!m.template write_plain<std::uint64_t>(Gpa{gpa}, v)) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
    }
    return 0;
}
template <class View>
MEMBACKING_ALWAYS_INLINE std::uint64_t handle_write_64(const View& handle, std::uint64_t n)
{
    View m = handle; // not const: GCC 12 will not scalarise a const local aggregate
    std::uint64_t gpa = hot_gpa;
    std::array<std::byte, 64> buf{};
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        if (!m.write(Gpa{gpa}, buf)) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
    }
    return 0;
}
} // namespace

extern "C" {

MEMBACKING_NOINLINE std::uint64_t baseline_write_u64(const Raw& raw, std::uint64_t n)
{
    Raw r = raw;
    std::uint64_t gpa = hot_gpa;
    std::uint64_t v = 0;
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        opaque(v);
        if (!r.access(gpa, sizeof v,
                      [v](std::byte* p) noexcept { return access::try_store(p, v); })) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
    }
    return 0;
}

MEMBACKING_NOINLINE std::uint64_t untracked_write_u64(const Untracked& m, std::uint64_t n)
{
    return handle_write_u64(m, n);
}
MEMBACKING_NOINLINE std::uint64_t tracked_write_u64(const Tracked& m, std::uint64_t n)
{
    return handle_write_u64(m, n);
}

MEMBACKING_NOINLINE std::uint64_t baseline_read_u64(const Raw& raw, std::uint64_t n)
{
    Raw r = raw;
    std::uint64_t gpa = hot_gpa;
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        std::uint64_t v = 0;
        if (!r.in_bounds(gpa, sizeof v) || !access::try_load(r.base + gpa, v)) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
        opaque(v);
    }
    return 0;
}
MEMBACKING_NOINLINE std::uint64_t untracked_read_u64(const Untracked& handle, std::uint64_t n)
{
    Untracked m = handle;
    std::uint64_t gpa = hot_gpa;
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        auto v = m.read_plain<std::uint64_t>(Gpa{gpa});
        if (!v) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
        std::uint64_t x = v.value();
        opaque(x);
    }
    return 0;
}

MEMBACKING_NOINLINE std::uint64_t baseline_write_64(const Raw& raw, std::uint64_t n)
{
    Raw r = raw;
    std::uint64_t gpa = hot_gpa;
    std::array<std::byte, 64> buf{};
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        if (!r.in_bounds(gpa, buf.size()) ||
            !access::try_copy(r.base + gpa, buf.data(), buf.size())) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
    }
    return 0;
}
MEMBACKING_NOINLINE std::uint64_t untracked_write_64(const Untracked& m, std::uint64_t n)
{
    return handle_write_64(m, n);
}
MEMBACKING_NOINLINE std::uint64_t tracked_write_64(const Tracked& m, std::uint64_t n)
{
    return handle_write_64(m, n);
}

MEMBACKING_NOINLINE std::uint64_t baseline_fill_64(const Raw& raw, std::uint64_t n)
{
    Raw r = raw;
    std::uint64_t gpa = hot_gpa;
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        if (!r.in_bounds(gpa, 64) || !access::try_fill(r.base + gpa, 0x5a, 64)) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
    }
    return 0;
}
MEMBACKING_NOINLINE std::uint64_t untracked_fill_64(const Untracked& handle, std::uint64_t n)
{
    Untracked m = handle;
    std::uint64_t gpa = hot_gpa;
    for (std::uint64_t i = 0; i < n; ++i) {
        opaque(gpa);
        if (!m.fill(Gpa{gpa}, 0x5a, Length{64})) [[unlikely]]
            return 1; // as the benchmarks do: an error ends the loop
    }
    return 0;
}

} // extern "C"

int main(int argc, char** argv)
{
    if (argc != 2)
        return 2;
    const auto n = std::strtoull(argv[1], nullptr, 10);
    auto manager = Manager::builder()
                       .add_backing(RamBackingRequest({MemoryRange::constant(0, 2 << 20)}))
                       .build(Length{4 << 20});
    if (!manager)
        return 1;
    const auto memory = manager->guest_memory();
    Manager::Mapper& mapper = *memory.owner();
    const Untracked untracked(mapper);
    const Tracked tracked(mapper);
    const Raw raw{mapper.base(), mapper.size()};
    std::uint64_t errors = 0;
    errors += baseline_write_u64(raw, n) + untracked_write_u64(untracked, n) +
              tracked_write_u64(tracked, n);
    errors += baseline_read_u64(raw, n) + untracked_read_u64(untracked, n);
    errors +=
        baseline_write_64(raw, n) + untracked_write_64(untracked, n) + tracked_write_64(tracked, n);
    errors += baseline_fill_64(raw, n) + untracked_fill_64(untracked, n);
    std::printf("%llu errors\n", static_cast<unsigned long long>(errors));
    return errors == 0 ? 0 : 1;
}
