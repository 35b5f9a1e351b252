// MemoryRange::constant is consteval: an unaligned constant does not compile.
// expect: memory_range_constant_is_unaligned_or_reversed
#include <membacking/base/memory_range.hpp>

constexpr auto bad = membacking::MemoryRange::constant(0xc0000, 0xc4001);
