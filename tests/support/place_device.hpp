/**
 * A placed device region in one call: the setup that many tests need (a BAR, a ROM, a VRAM or
 * DAX window), so that it is written once.
 */
#pragma once

#include <membacking/membacking.hpp>

#include "test_support.hpp"

#include <optional>
#include <string>

namespace membacking::test {

/// A device region `name` of `length` bytes holding one mapping of `object` from its start (with
/// `protection`), placed at `gpa` with `placed` (by default `protection`).
template <class Manager>
typename Manager::Device place_device(Manager& m, const std::string& name, Gpa gpa, Length length,
                                      const Mappable& object,
                                      Protection protection = Protection::read_write,
                                      std::optional<Protection> placed = std::nullopt)
{
    auto device = must(m.device_memory_mapper().new_region(name, length));
    must(device.map({.offset = Offset{0},
                     .length = length,
                     .object = object,
                     .object_offset = Offset{0},
                     .protection = protection}));
    must(device.map_to_guest(gpa, placed.value_or(protection)));
    return device;
}

} // namespace membacking::test
