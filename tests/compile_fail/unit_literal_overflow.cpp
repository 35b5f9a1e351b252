// A unit literal that does not fit in 64 bits does not compile.
// expect: unit_literal_overflows_64_bits
#include <membacking/base/units.hpp>

using namespace membacking::literals;
constexpr auto too_big = 17179869184_GiB; // 2^34 GiB = 2^64 bytes
