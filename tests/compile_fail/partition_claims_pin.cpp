// A partition policy that claims pinning without the members: the message names them.
// expect: claims PartitionFeatures::pin but lacks `Result<void> pin_range(std::uint64_t gpa
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

#include <cstdint>
#include <string_view>

struct ClaimsPin {
    static constexpr std::string_view name = "claims-pin";
    static constexpr membacking::PartitionFeatures features = membacking::PartitionFeatures::pin;
    membacking::Result<void> map_range(void*, std::uint64_t, std::uint64_t, bool, bool)
    {
        return {};
    }
    membacking::Result<void> unmap_range(std::uint64_t, std::uint64_t) { return {}; }
};

void compose()
{
    auto builder = membacking::LinuxGuestMemoryManager<ClaimsPin>::builder();
    (void)builder;
}
