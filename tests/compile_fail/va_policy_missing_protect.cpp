// A VA policy without protect: the message gives the declaration it needs.
// expect: VA policy: needs `Result<void> protect(std::uint64_t off, std::uint64_t len, bool
// writable)`
#include <membacking/fwd.hpp>
#include <membacking/manager/guest_memory_manager.hpp>

#include <cstddef>
#include <cstdint>

using membacking::Mappable;
using membacking::Result;

struct NoProtect {
    static constexpr membacking::VaFeatures features = membacking::VaFeatures::none;
    static Result<NoProtect> reserve(std::uint64_t, std::uint64_t) { return NoProtect{}; }
    std::byte* base() const { return nullptr; }
    std::uint64_t size() const { return 0; }
    Result<void> map_file(std::uint64_t, std::uint64_t, const Mappable&, std::uint64_t, bool)
    {
        return {};
    }
    Result<void> commit_private(std::uint64_t, std::uint64_t) { return {}; }
    Result<void> unmap(std::uint64_t, std::uint64_t) { return {}; }
    Result<void> advise_hugepages(std::uint64_t, std::uint64_t) { return {}; }
    Result<void> bind_numa(std::uint64_t, std::uint64_t, std::uint32_t) { return {}; }
    Result<void> set_name(std::uint64_t, std::uint64_t, const char*) { return {}; }
    static Result<Mappable> create_shared_memory(std::uint64_t, const char*) { return Mappable(); }
    static Result<Mappable> create_hugetlb_memory(std::uint64_t, const char*, std::uint64_t)
    {
        return Mappable();
    }
};

void compose()
{
    using Manager = membacking::GuestMemoryManager<membacking::NestedPriority, NoProtect,
                                                   membacking::MockPartition>;
    auto builder = Manager::builder();
    (void)builder;
}
