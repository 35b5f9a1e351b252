#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: installs what it needs (apt-get, as root), builds,
# and runs the example VMM against a real /dev/kvm:
#   - the host's, where it is usable;
#   - otherwise one inside a software-emulated x86 VM (tests/kvm/run-in-vm.sh: QEMU, AMD SVM, a
#     Debian kernel with KVM), so the guest really runs; it says so, and costs a few seconds;
#   - and only where neither works, the mock partition (no guest code runs; it says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=tests/deps.sh
source tests/deps.sh
install_deps
[ -d build-example ] || meson setup build-example --wrap-mode=nodownload -Dtests=disabled -Dbenchmarks=disabled >/dev/null
meson compile -C build-example >/dev/null
vmm=./build-example/examples/vmm

# run-in-vm.sh runs the VMM directly where the host's /dev/kvm is usable, and in the VM otherwise
# (it prints which, and why). MEMBACKING_REQUIRE_KVM: inside, a KVM that does not work is an error,
# not a silent mock run.
status=0
MEMBACKING_REQUIRE_KVM=1 bash tests/kvm/run-in-vm.sh "$vmm" || status=$?
if [ "$status" -ne 77 ]; then
    exit "$status"
fi
echo
echo "Neither this host nor an emulated VM can give the example a /dev/kvm (see above): running"
echo "it on the mock partition instead, the last resort."
echo
exec "$vmm"
