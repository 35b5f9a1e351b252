// The control case: a complete partition policy composes, with the same flags the failing cases
// get (so that they fail for their own reason, not for the harness's).
// expect: success
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

#include <cstdint>
#include <string_view>

struct Complete {
    static constexpr std::string_view name = "complete";
    static constexpr membacking::PartitionFeatures features = membacking::PartitionFeatures::none;
    membacking::Result<void> map_range(void*, std::uint64_t, std::uint64_t, bool, bool)
    {
        return {};
    }
    membacking::Result<void> unmap_range(std::uint64_t, std::uint64_t) { return {}; }
};

void compose()
{
    auto builder = membacking::LinuxGuestMemoryManager<Complete>::builder();
    (void)builder;
}
