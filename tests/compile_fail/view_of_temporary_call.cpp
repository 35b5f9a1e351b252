// view() on a temporary owning handle (an rvalue) is deleted.
// expect: view
// expect: delete
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

using Manager = membacking::MockGuestMemoryManager;

Manager::MemoryView dangling(const Manager::Client& client)
{
    return client.lazy_guest_memory().value().view();
}
