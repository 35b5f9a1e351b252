// One translation unit that includes every public header and instantiates the main templates, so
// that clang-tidy can check the whole library in a single pass (the 'clang-tidy' lint test).
#include <membacking/membacking.hpp>

#include <cstdint>

namespace membacking {
template class detail::ManagerCore<NestedPriority, LinuxMmap<>, KvmPartition<>, MockPartition>;
template class GuestMemoryManager<NestedPriority, LinuxMmap<>, KvmPartition<>, MockPartition>;
template class MappingManager<LinuxMmap<>>;
template class VaMapper<LinuxMmap<>>;
template class GuestMemoryView<VaMapper<LinuxMmap<>>>;
template class GuestMemory<VaMapper<LinuxMmap<>>>;
template class LinuxMmap<os::LinuxSyscalls>;
template class KvmPartition<os::LinuxSyscalls>;
} // namespace membacking

/// The access path's member templates, instantiated for the common types.
bool tidy_probe_access(
    const membacking::GuestMemoryView<membacking::VaMapper<membacking::LinuxMmap<>>>& m)
{
    auto a = m.read_plain<std::uint64_t>(0);
    auto b = m.write_plain<std::uint32_t>(8, 1);
    auto c = m.compare_exchange<std::uint64_t>(16, 0, 1);
    auto d = m.fetch_or<std::uint16_t>(24, 1);
    auto e = m.fetch_add<std::int64_t>(32, -1);
    return a && b && c && d && e;
}
