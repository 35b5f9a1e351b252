#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: installs what it needs (apt-get, as root), builds,
# and runs the example.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/deps.sh
install_deps
[ -d build-example ] || meson setup build-example --wrap-mode=nodownload -Dtests=disabled -Dbenchmarks=disabled >/dev/null
meson compile -C build-example >/dev/null
exec ./build-example/examples/vmm
