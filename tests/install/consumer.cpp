// The one program that every consumer build in tests/install compiles (CMake package, pkg-config,
// Meson subproject): a user's first program against the library as that build system delivers it.
// It uses the headers, the declared dependencies and the generated version header, and nothing
// else. Kept tiny on purpose, so that an API change touches this one file.
#include <membacking/membacking.hpp>

#include <cstdint>
#include <cstdio>

int main()
{
    using namespace membacking;
    auto manager = MockGuestMemoryManager::builder()
                       .add_backing(RamBackingRequest({MemoryRange::constant(0, 0x10000)}))
                       .build(Length{0x10000});
    if (!manager) {
        std::fprintf(stderr, "build failed: %s\n", manager.error().full_message().c_str());
        return 1;
    }
    auto memory = manager->guest_memory();
    constexpr std::uint32_t value = 0x1234abcd;
    if (!memory.write_plain<std::uint32_t>(Gpa{0x100}, value)) {
        std::fputs("write_plain failed\n", stderr);
        return 1;
    }
    const auto back = memory.read_plain<std::uint32_t>(Gpa{0x100});
    if (!back || *back != value) {
        std::fputs("read_plain did not return what was written\n", stderr);
        return 1;
    }
    // The script compares this line with the project version: both spellings must agree with it.
    std::printf("membacking %s (%d.%d.%d): read back 0x%x\n", MEMBACKING_VERSION_STRING,
                MEMBACKING_VERSION_MAJOR, MEMBACKING_VERSION_MINOR, MEMBACKING_VERSION_PATCH,
                *back);
    return 0;
}
