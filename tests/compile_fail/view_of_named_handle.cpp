// The control for the view_of_temporary cases: views of a handle kept in a variable, and calls
// through `->` on a Result kept in a variable, compile.
// expect: success
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

using Manager = membacking::MockGuestMemoryManager;

bool fine(const Manager::Client& client)
{
    auto memory = client.lazy_guest_memory();
    if (!memory)
        return false;
    Manager::MemoryView a = memory->view();
    Manager::MemoryView b = *memory;
    Manager::Memory owned = *std::move(memory);
    Manager::MemoryView c = owned.view();
    return a.size() == b.size() && b.size() == c.size();
}
