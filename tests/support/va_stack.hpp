/**
 * VaStack<V>: the region manager wired to a real MappingManager<V> (the VA side) and a
 * MockPartition (the partition side), with one eager primary mapper and a GuestMemory handle
 * over it. The access-path and mapping tests drive guest memory through it.
 */
#pragma once

#include <membacking/guest_memory.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/partition/mock.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>

#include "platform.hpp"
#include "test_support.hpp"

#include <memory>
#include <string>

namespace membacking::test {

template <class V = PlatformVa>
struct VaStack {
    struct Sink {
        MappingManager<V>* va;
        MockPartition partition;
        Result<void> add_mapping(const ActiveMapping& m) { return va->add_mapping(m); }
        Result<void> remove_mappings(const MemoryRange& r) { return va->remove_mappings(r); }
        Result<void> map_region(const RegionActivation& a)
        {
            return partition.map_range(nullptr, a.gpa.start(), a.gpa.size(), a.params.writable,
                                       a.params.executable);
        }
        Result<void> unmap_region(const RegionActivation& a)
        {
            return partition.unmap_range(a.gpa.start(), a.gpa.size());
        }
    };

    explicit VaStack(std::uint64_t max_addr)
        : va(must(MappingManager<V>::create(max_addr))), sink{&va, {}}, regions(sink),
          primary(must(va.new_mapper(MapperMode::eager))), memory(primary)
    {}

    /// A region at [start, end) of priority prio, with `object` mapped over all of it from
    /// file_offset, then mapped with the given params.
    RegionId add_ram(std::string name, std::uint64_t start, std::uint64_t end,
                     const Mappable& object, std::uint64_t file_offset = 0,
                     MapParams params = {true, true, false}, std::uint8_t prio = 255)
    {
        const RegionId id =
            must(regions.add_region(std::move(name), range(start, end), prio, MappingType::Ram));
        REQUIRE(regions
                    .add_mapping(id, {range(0, end - start),
                                      MappingBacking::file(object, Offset{file_offset}),
                                      true,
                                      {}})
                    .has_value());
        REQUIRE(regions.map_region(id, params).has_value());
        return id;
    }

    MappingManager<V> va;
    Sink sink;
    RegionManager<NestedPriority, Sink> regions;
    std::shared_ptr<VaMapper<V>> primary;
    GuestMemory<VaMapper<V>> memory;
};

} // namespace membacking::test
