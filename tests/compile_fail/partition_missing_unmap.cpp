// A partition policy without unmap_range: the compiler must name the member and its declaration
// (GCC 12 used to say only that the concept "evaluated to false").
// expect: missing `Result<void> unmap_range(std::uint64_t gpa, std::uint64_t size)`
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

#include <cstdint>
#include <string_view>

struct NoUnmap {
    static constexpr std::string_view name = "no-unmap";
    static constexpr membacking::PartitionFeatures features = membacking::PartitionFeatures::none;
    membacking::Result<void> map_range(void*, std::uint64_t, std::uint64_t, bool, bool)
    {
        return {};
    }
};

void compose()
{
    auto builder = membacking::LinuxGuestMemoryManager<NoUnmap>::builder();
    (void)builder;
}
