// region_layout: a PC-like guest physical layout driven through the region manager, printing the
// visible memory map after each step.
//
// Layout: low RAM, a VGA window and twelve PAM segments as separately controllable RAM regions,
// the rest of RAM above 1 MiB, and a VGA device region at priority 0 under the VGA window. The
// program toggles the VGA window and a PAM segment, and shows the device memory showing through
// where RAM is unmapped, and what the (mock) partition was told at each step.
#include <membacking/partition/mock.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

using namespace membacking;

namespace {

/// Sends partition events to a MockPartition and counts VA events (no VA mapper in this example).
struct ExampleSink {
    MockPartition partition;
    std::size_t va_mappings = 0;
    Result<void> add_mapping(const ActiveMapping&)
    {
        ++va_mappings;
        return {};
    }
    Result<void> remove_mappings(const MemoryRange&) { return {}; }
    Result<void> map_region(const RegionActivation& a)
    {
        return partition.map_range(nullptr, a.gpa.start(), a.gpa.size(), a.params.writable,
                                   a.params.executable);
    }
    Result<void> unmap_region(const RegionActivation& a)
    {
        return partition.unmap_range(a.gpa.start(), a.gpa.size());
    }
};

using Manager = RegionManager<NestedPriority, ExampleSink>;

template <class T>
T must(Result<T> r, const char* what)
{
    if (!r) {
        std::fprintf(stderr, "%s: %s\n", what, r.error().full_message().c_str());
        std::exit(1);
    }
    if constexpr (!std::is_void_v<T>)
        return std::move(r).value();
}

void print_map(const Manager& rm, const ExampleSink& sink, const char* title)
{
    std::printf("\n== %s\n", title);
    std::map<std::uint64_t, const Manager::Region*> visible;
    for (const auto& [id, r] : rm.regions())
        for (const MemoryRange& seg : r.visible)
            visible.emplace(seg.start(), &r);
    for (const auto& [start, r] : visible)
        std::printf("  %-22s %-12s prio %3u  %s  %s\n", r->range.to_string().c_str(),
                    r->name.c_str(), unsigned{r->priority}, r->map_params->writable ? "rw" : "ro",
                    std::string(to_string(r->type)).c_str());
    std::printf("  partition windows: %zu\n", sink.partition.windows().size());
}

} // namespace

int main()
{
    ExampleSink sink;
    Manager rm(sink);
    const int fd = ::memfd_create("guest-ram", MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, 8 << 20) != 0) {
        std::perror("memfd");
        return 1;
    }
    const Mappable ram = Mappable::adopt(fd);
    const MapParams rw{true, true, false};
    const MapParams ro{false, true, false};

    // RAM split like the x86 legacy layout: each piece is its own region over one memfd.
    const std::vector<std::uint64_t> bounds = {
        0x0,     0xa0000, 0xc0000, 0xc4000, 0xc8000, 0xcc000, 0xd0000,  0xd4000, 0xd8000,
        0xdc000, 0xe0000, 0xe4000, 0xe8000, 0xec000, 0xf0000, 0x100000, 0x800000};
    std::map<std::string, RegionId> ids;
    for (std::size_t i = 0; i + 1 < bounds.size(); ++i) {
        const MemoryRange r = MemoryRange::unchecked(bounds[i], bounds[i + 1]);
        const std::string name = i == 0                   ? "ram-low"
                                 : i == 1                 ? "vga-window"
                                 : i + 2 == bounds.size() ? "ram-high"
                                                          : "pam-" + MemoryRange::hex(bounds[i]);
        const RegionId id = must(rm.add_region(name, r, 255, MappingType::Ram), "add RAM region");
        must(rm.add_mapping(id, {MemoryRange::unchecked(0, r.size()),
                                 MappingBacking::file(ram, r.start()),
                                 true,
                                 {}}),
             "add RAM mapping");
        must(rm.map_region(id, rw), "map RAM");
        ids[name] = id;
    }

    // The VGA device's framebuffer, at device priority under the VGA window.
    const int vram_fd = ::memfd_create("vga-vram", MFD_CLOEXEC);
    if (vram_fd < 0 || ::ftruncate(vram_fd, 0x20000) != 0) {
        std::perror("memfd");
        return 1;
    }
    const RegionId vga = must(
        rm.add_region("vga-vram", MemoryRange::unchecked(0xa0000, 0xc0000), 0, MappingType::Device),
        "add VGA device region");
    must(rm.add_mapping(vga, {MemoryRange::unchecked(0, 0x20000),
                              MappingBacking::file(Mappable::adopt(vram_fd), 0),
                              true,
                              {}}),
         "add VRAM mapping");
    must(rm.map_region(vga, rw), "map VGA"); // recorded only: RAM covers it
    print_map(rm, sink, "boot: all RAM visible, the VGA device hidden under the VGA window");

    must(rm.unmap_region(ids.at("vga-window")), "unmap VGA window");
    print_map(rm, sink, "VGA window unmapped: the device framebuffer shows through");

    must(rm.map_region(ids.at("pam-0xc0000"), ro), "PAM read-only");
    print_map(rm, sink, "PAM 0xc0000 write-protected (shadowed option ROM)");

    must(rm.unmap_region(ids.at("pam-0xc0000")), "PAM unmapped");
    print_map(rm, sink, "PAM 0xc0000 unmapped: accesses there go to MMIO");

    must(rm.map_region(ids.at("pam-0xc0000"), rw), "PAM read-write");
    must(rm.map_region(ids.at("vga-window"), rw), "map VGA window");
    print_map(rm, sink, "back to boot state");
    return 0;
}
