// The same mistake without view(): slicing a temporary owning handle into a view does not
// compile either (GuestMemoryView's constructor from GuestMemory&& is deleted).
// expect: delete
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

using Manager = membacking::MockGuestMemoryManager;

Manager::MemoryView dangling(const Manager::Client& client)
{
    Manager::MemoryView v = client.lazy_guest_memory().value();
    return v;
}
