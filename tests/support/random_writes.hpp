/**
 * Random writes through a GuestMemory handle, errors ignored: the writers of the migration loop
 * (tests/support/migration_loop.hpp) and the remote scribbler (tests/ipc/helper.cpp, a process
 * without doctest). One draw, then one of the four write paths every GuestMemory has.
 */
#pragma once

#include <membacking/membacking.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace membacking::test {

/// Where one random write goes and what it writes.
struct RandomWrite {
    std::uint64_t gpa = 0;
    std::uint8_t value = 0;
    std::uint64_t length = 0;

    /// Whether the write may touch `r` (the 8 bytes a plain store or an atomic writes included).
    [[nodiscard]] bool touches(const MemoryRange& r) const
    {
        return !r.empty() && gpa < r.end() && r.start() < gpa + length + 8;
    }
};

/// Draws a write anywhere in [0, space), shorter than `max_length` bytes (in this order: the
/// GPA, the byte, the length).
template <class Rng>
RandomWrite draw_random_write(Rng& rng, std::uint64_t space, std::size_t max_length)
{
    RandomWrite w;
    w.gpa = rng() % space;
    w.value = static_cast<std::uint8_t>(rng());
    w.length = rng() % max_length;
    return w;
}

/// The write paths write_randomly picks from.
inline constexpr unsigned random_write_paths = 4;

/// Makes `w` through write path `path` (below random_write_paths): 0 a copy from `chunk` (at
/// least w.length bytes, filled with w.value), 1 a fill, 2 a plain u64 store of a value drawn
/// from `rng`, 3 an atomic u32 add at w.gpa rounded down to 4. The result is ignored: writing
/// where nothing is mapped (or read-only) is part of the test.
template <class Memory, class Rng>
void write_randomly(const Memory& mem, Rng& rng, std::span<std::uint8_t> chunk,
                    const RandomWrite& w, unsigned path)
{
    switch (path) {
    case 0:
        std::memset(chunk.data(), w.value, chunk.size());
        (void)mem.write(Gpa{w.gpa}, chunk.first(w.length));
        break;
    case 1: (void)mem.fill(Gpa{w.gpa}, w.value, Length{w.length}); break;
    case 2: (void)mem.template write_plain<std::uint64_t>(Gpa{w.gpa}, rng()); break;
    default: (void)mem.template fetch_add<std::uint32_t>(Gpa{w.gpa & ~std::uint64_t{3}}, 1); break;
    }
}

} // namespace membacking::test
