// A view of a temporary owning handle would dangle at the end of the statement (the handle's
// mapper and reservation go with it): `->` on a temporary Result<GuestMemory> does not compile.
// expect: operator->
// expect: delete
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

using Manager = membacking::MockGuestMemoryManager;

Manager::MemoryView dangling(const Manager::Client& client)
{
    Manager::MemoryView v = client.lazy_guest_memory()->view();
    return v;
}
