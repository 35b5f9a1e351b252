// DeviceRegion::map takes a DeviceMapping; the old positional form (offset, object, file offset,
// length, writable), where swapping the two integers compiled, does not compile any more.
// expect: map
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

void old_form(membacking::MockGuestMemoryManager::Device& bar, const membacking::Mappable& object)
{
    (void)bar.map(0, object, 0, 0x10000, true);
}
