// One translation unit that includes every public header and instantiates the main templates, so
// that clang-tidy can check the whole library in a single pass (the 'clang-tidy' lint test).
#include <membacking/membacking.hpp>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

namespace membacking {
template class detail::ManagerCore<NoDirtyTracking, NestedPriority, LinuxMmap<>, KvmPartition<>,
                                   MockPartition>;
template class detail::ManagerCore<DirtyTracking, NestedPriority, LinuxMmap<>, KvmPartition<>,
                                   MockPartition>;
template class detail::PartitionSet<KvmPartition<>, MockPartition>;
template class BasicGuestMemoryManager<NoDirtyTracking, NestedPriority, LinuxMmap<>, KvmPartition<>,
                                       MockPartition>;
template class BasicGuestMemoryManager<DirtyTracking, NestedPriority, LinuxMmap<>, KvmPartition<>,
                                       MockPartition>;
template class BasicGuestMemoryManager<ByteMapDirtyTracking, NestedPriority, LinuxMmap<>,
                                       KvmPartition<>, MockPartition>;
template class MappingManager<LinuxMmap<>>;
template class VaMapper<LinuxMmap<>>;
template class GuestMemoryView<VaMapper<LinuxMmap<>>>;
template class GuestMemory<VaMapper<LinuxMmap<>>>;
template class GuestMemoryView<VaMapper<LinuxMmap<>>, Gpa, DirtyTracking>;
template class GuestMemory<VaMapper<LinuxMmap<>>, Gpa, DirtyTracking>;
template class GuestMemoryView<VaMapper<LinuxMmap<>>, Gpa, ByteMapDirtyTracking>;
template class GuestMemory<VaMapper<LinuxMmap<>>, Gpa, ByteMapDirtyTracking>;

template class LinuxMmap<os::LinuxSyscalls>;
template class KvmPartition<os::LinuxSyscalls>;
template class ipc::Channel<>;
template class ipc::RemoteMapper<>;
template class ipc::RemoteListener<>;
} // namespace membacking

/// The access path's member templates, instantiated for the common types, untracked and tracked.
template <class View>
bool tidy_probe_access(const View& m)
{
    using membacking::Gpa;
    auto a = m.template read_plain<std::uint64_t>(Gpa{0});
    auto b = m.template write_plain<std::uint32_t>(Gpa{8}, 1);
    auto c = m.template compare_exchange<std::uint64_t>(Gpa{16}, 0, 1);
    auto d = m.template fetch_or<std::uint16_t>(Gpa{24}, 1);
    auto e = m.template fetch_add<std::int64_t>(Gpa{32}, -1);
    std::array<std::uint8_t, 4> buf{};
    auto f = m.read(Gpa{40}, buf);
    auto g = m.write(Gpa{44}, std::string_view("abc"));
    const std::uint64_t h = m.template read_plain<std::uint64_t>(Gpa{48}).value_or(0);
    auto window = m.subrange(Gpa{0}, membacking::Length{0x1000});
    const bool i =
        window && window->template read_plain<std::uint8_t>(membacking::Offset{1}).has_value();
    return a && b && c && d && e && f && g && h != 0 && i;
}

template bool tidy_probe_access(
    const membacking::GuestMemoryView<membacking::VaMapper<membacking::LinuxMmap<>>>&);
template bool
tidy_probe_access(const membacking::GuestMemoryView<membacking::VaMapper<membacking::LinuxMmap<>>,
                                                    membacking::Gpa, membacking::DirtyTracking>&);
template bool tidy_probe_access(
    const membacking::GuestMemoryView<membacking::VaMapper<membacking::LinuxMmap<>>,
                                      membacking::Gpa, membacking::ByteMapDirtyTracking>&);

/// A worker's connection and a manager's service of it, in the byte map's layout.
template membacking::Result<membacking::GuestMemory<
    membacking::ipc::RemoteMapper<>, membacking::Gpa, membacking::ByteMapDirtyTracking>>
membacking::ipc::connect_guest_memory<membacking::ByteMapDirtyTracking>(
    int, membacking::ipc::RemoteMapperOptions);

/// The memory-table listener registration, instantiated with a minimal listener.
struct TidyProbeListener {
    [[nodiscard]] std::string name() const { return "probe"; }
    membacking::Result<void> apply(const membacking::MemoryTableChange& change)
    {
        return membacking::require_shareable(change.added);
    }
};

membacking::Result<membacking::ListenerId> tidy_probe_listener(
    membacking::GuestMemoryManager<membacking::NestedPriority, membacking::LinuxMmap<>,
                                   membacking::KvmPartition<>, membacking::MockPartition>& m,
    std::shared_ptr<TidyProbeListener> listener)
{
    return m.add_memory_listener(std::move(listener));
}
