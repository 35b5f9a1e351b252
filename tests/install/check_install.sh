#!/usr/bin/env bash
# Installs the library into a scratch DESTDIR and builds a consumer against it through pkg-config,
# as a user of the installed package would: the headers and membacking.pc must be enough.
set -euo pipefail
build_dir=$1
cxx=$2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
meson install -C "$build_dir" --no-rebuild --destdir "$stage" >/dev/null
pc=$(find "$stage" -name membacking.pc | head -n1)
[ -n "$pc" ] || { echo "membacking.pc was not installed"; exit 1; }
hdr=$(find "$stage" -path '*/membacking/membacking.hpp' | head -n1)
[ -n "$hdr" ] || { echo "headers were not installed"; exit 1; }
cat >"$stage/consumer.cpp" <<'CPP'
#include <membacking/membacking.hpp>
int main()
{
    auto m = membacking::MockGuestMemoryManager::builder()
                 .add_backing(membacking::RamBackingRequest({membacking::MemoryRange::constant(0, 0x10000)}))
                 .build(membacking::Length{0x10000});
    if (!m)
        return 1;
    return m->guest_memory().write_plain<std::uint32_t>(membacking::Gpa{0x100}, 7) ? 0 : 1;
}
CPP
export PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_SYSROOT_DIR=$stage
# shellcheck disable=SC2046
"$cxx" $(pkg-config --cflags membacking) "$stage/consumer.cpp" -o "$stage/consumer"
"$stage/consumer"
echo "installed headers and membacking.pc build and run a consumer"
