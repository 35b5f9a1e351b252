#!/usr/bin/env bash
# Runs PROGRAM [ARGS...] against a real /dev/kvm on any x86-64 Debian machine:
#   - directly, where the host's /dev/kvm is usable;
#   - otherwise inside a small Linux VM that QEMU emulates in software (TCG, `-cpu max`: an AMD CPU
#     with SVM and nested paging), whose kernel loads kvm.ko and kvm-amd.ko and so gives the
#     program a /dev/kvm of its own. Many CI machines are VMs without vmx/svm; this is how the KVM
#     tests and the example VMM run a real guest there.
#
# Usage:
#   tests/kvm/run-in-vm.sh [OPTIONS] PROGRAM [ARGS...]
#   tests/kvm/run-in-vm.sh --prepare     install QEMU, fetch the guest's kernel and busybox, say
#                                        where KVM programs will run; exit 0, or 77 if nowhere
# Options:
#   --shadow-paging   load kvm_amd with npt=0, so KVM shadows the guest's page tables instead of
#                     using nested paging (the other MMU). Always in the VM: a host's module
#                     parameters are not ours to change.
#   --vm              use the VM even where the host's /dev/kvm is usable
#   --timeout SECONDS the VM's time limit, boot included (default: $MEMBACKING_VM_TIMEOUT or 300)
#
# PROGRAM is an x86-64 ELF executable, static or dynamic: it goes into the VM's initramfs at its
# own absolute path with the shared libraries `ldd` lists (sanitizer runtimes included), and runs
# as root in the same working directory, with stdin from /dev/null and stdout and stderr (merged)
# coming back over the serial console. Files it writes inside the VM are lost. Passed into the VM
# from the environment: MEMBACKING_*, *SAN_OPTIONS, BENCHMARK_*, MALLOC_PERTURB_, LD_LIBRARY_PATH.
# Kernel warnings raised while it runs (a KVM WARN_ON, say) are printed after its output.
#
# Exit status: the program's own (77 stays "skipped"), or
#   77   this machine can run neither: no usable /dev/kvm, and no VM (not an x86-64 Linux host, or
#        QEMU, the guest kernel or busybox cannot be installed or fetched); the reason is printed
#   124  the VM ran out of time (QEMU is killed)
#   125  the VM failed: QEMU did not start, the guest did not boot, or it got no /dev/kvm
#
# What it needs: root (or sudo) the first time, to `apt-get install qemu-system-x86`; the guest's
# kernel (linux-image-cloud-amd64's image package) and busybox-static come from Debian's archive
# with `apt-get download` and are unpacked with `dpkg-deb -x` into a cache, never into /boot:
# $MEMBACKING_VM_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/membacking/vm (delete it to refresh).
# Other settings: MEMBACKING_VM_MEMORY (the VM's RAM, default 2G).
set -euo pipefail

prog_name=run-in-vm
say() { echo "$prog_name: $*" >&2; }

shadow_paging=0 force_vm=0 prepare_only=0
time_limit=${MEMBACKING_VM_TIMEOUT:-300}
while [ $# -gt 0 ]; do
    case $1 in
    --shadow-paging) shadow_paging=1 ;;
    --vm) force_vm=1 ;;
    --timeout)
        [ $# -ge 2 ] || { say "--timeout needs a number of seconds"; exit 2; }
        time_limit=$2
        shift
        ;;
    --prepare) prepare_only=1 ;;
    --help | -h)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    --) shift; break ;;
    -*) say "unknown option $1 (see --help)"; exit 2 ;;
    *) break ;;
    esac
    shift
done
case $time_limit in
'' | *[!0-9]*) say "the time limit must be a whole number of seconds, not '$time_limit'"; exit 2 ;;
esac
program=
if [ "$prepare_only" -eq 0 ]; then
    if [ $# -eq 0 ]; then
        say "usage: $0 [--shadow-paging] [--vm] [--timeout SECONDS] PROGRAM [ARGS...] (see --help)"
        exit 2
    fi
    program=$1
    shift
    case $program in
    */*) ;;
    *) program=$(command -v "$program") || { say "no program $program on PATH"; exit 2; } ;;
    esac
    if [ ! -f "$program" ] || [ ! -x "$program" ]; then
        say "$program is not an executable file"
        exit 2
    fi
fi

# Is the host's /dev/kvm usable (a device that opens, answers the API version, creates a VM)?
# Sets kvm_why when it is not.
kvm_why=
host_kvm_usable() {
    # Most hosts without KVM have no /dev/kvm at all: no need to start Python to see that.
    if [ ! -e /dev/kvm ]; then
        kvm_why="/dev/kvm: No such file or directory"
        return 1
    elif [ ! -c /dev/kvm ] || [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        kvm_why="/dev/kvm: not a device this user may read and write"
        return 1
    fi
    command -v python3 >/dev/null || return 0 # without Python, that is all we can check
    kvm_why=$(python3 - <<'EOF' 2>&1
import fcntl, os, sys
try:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    if fcntl.ioctl(kvm, 0xAE00) != 12:  # KVM_GET_API_VERSION
        sys.exit("/dev/kvm: unexpected KVM API version")
    os.close(fcntl.ioctl(kvm, 0xAE01, 0))  # KVM_CREATE_VM
except OSError as e:
    sys.exit(f"/dev/kvm: {e.strerror}")
EOF
    ) && return 0
    kvm_why=${kvm_why:-/dev/kvm: not usable}
    return 1
}

if [ "$prepare_only" -eq 1 ] || [ "$shadow_paging" -eq 1 ] || [ "$force_vm" -eq 1 ]; then
    host_kvm_usable || true
elif host_kvm_usable; then
    exec "$program" "$@"
fi
# Why the VM, for the messages.
if [ "$shadow_paging" -eq 1 ]; then
    why_vm="shadow paging (kvm_amd npt=0) needs the emulated VM"
elif [ "$force_vm" -eq 1 ]; then
    why_vm="--vm asks for the emulated VM"
else
    why_vm="no usable KVM on this host (${kvm_why})"
fi

# This machine cannot run the program against KVM at all: a skip, with the reason on stdout
# (where tests/run.sh's summary finds it).
unavailable() {
    echo "$prog_name: SKIPPED: $why_vm, and $*"
    exit 77
}
vm_failed() {
    say "FAILED: $*"
    exit 125
}

# Everything this script starts or creates, undone on any exit: QEMU, the console relay, the
# folder where the guest's packages are unpacked, the folder where the initramfs is built.
qemu_pid='' relay_pid='' fetch_dir='' tmp=''
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    local pid
    for pid in "$qemu_pid" "$relay_pid"; do
        if [ -n "$pid" ]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$fetch_dir" "$tmp"
}
trap cleanup EXIT
trap 'say "hung up: stopping"; exit 129' HUP
trap 'say "interrupted: stopping"; exit 130' INT
trap 'say "terminated: stopping"; exit 143' TERM

# ---- The VM's ingredients ---------------------------------------------------------------------

if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    unavailable "it needs an x86-64 Linux host (this is $(uname -s) $(uname -m))"
fi

cache=${MEMBACKING_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/membacking/vm}
mkdir -p "$cache" 2>/dev/null || unavailable "its cache $cache cannot be created"

as_root=()
can_be_root() {
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        return 1
    fi
}

ensure_qemu() {
    command -v qemu-system-x86_64 >/dev/null && return 0
    command -v apt-get >/dev/null ||
        unavailable "qemu-system-x86_64 is missing and there is no apt-get to install it"
    can_be_root || unavailable "qemu-system-x86_64 is missing and installing it needs root"
    say "installing qemu-system-x86 (once)"
    local apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -qq
        --no-install-recommends)
    # The package lists may be missing or stale on a fresh machine: update if the install fails.
    if ! "${apt[@]}" install qemu-system-x86 >/dev/null 2>&1; then
        "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || true
        "${apt[@]}" install qemu-system-x86 >/dev/null ||
            unavailable "qemu-system-x86_64 is missing and apt-get could not install qemu-system-x86"
    fi
}

kernel_package() { # the image package linux-image-cloud-amd64 depends on, e.g. linux-image-6.1.0-57-cloud-amd64
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

# Fetches the guest kernel (with its three KVM modules) and a static busybox into $cache/guest,
# once. The cache is complete when $cache/ready exists; $cache/guest is assembled elsewhere and
# renamed into place, so an interrupted fetch leaves nothing half-written.
fetch_guest() {
    [ -f "$cache/ready" ] && return 0
    local tool
    for tool in apt-get apt-cache dpkg-deb; do
        command -v "$tool" >/dev/null ||
            unavailable "the VM's kernel and busybox are not in $cache and there is no $tool to fetch them"
    done
    local kernel_pkg
    kernel_pkg=$(kernel_package) || true
    if [ -z "$kernel_pkg" ] && can_be_root; then
        "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || true
        kernel_pkg=$(kernel_package) || true
    fi
    [ -n "$kernel_pkg" ] ||
        unavailable "apt knows no linux-image-cloud-amd64 (not Debian, or no package lists) for the VM's kernel"
    say "fetching the VM's kernel ($kernel_pkg) and busybox-static into $cache (once)"
    fetch_dir=$(mktemp -d "$cache/fetch.XXXXXX")
    # As root, apt downloads as its unprivileged _apt user: let that user write here.
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$fetch_dir"; fi
    local download=(apt-get download -qq "$kernel_pkg" busybox-static)
    if ! (cd "$fetch_dir" && "${download[@]}" >/dev/null 2>&1); then
        # Stale package lists name versions the archive no longer has: refresh them, retry once.
        if can_be_root; then "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || true; fi
        (cd "$fetch_dir" && "${download[@]}" >/dev/null) ||
            unavailable "'${download[*]}' failed (no network to Debian's archive?)"
    fi
    local deb
    for deb in "$fetch_dir"/*.deb; do dpkg-deb -x "$deb" "$fetch_dir/x"; done
    local ready=$fetch_dir/guest
    mkdir -p "$ready/modules"
    cp "$fetch_dir"/x/boot/vmlinuz-* "$ready/vmlinuz"
    cp "$fetch_dir/x/bin/busybox" "$ready/busybox"
    # kvm-amd needs kvm, which needs irqbypass; busybox's insmod takes them uncompressed.
    local mod path
    for mod in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
        path=$(find "$fetch_dir"/x/lib/modules/*/kernel/"${mod%/*}" -maxdepth 1 \
            -name "${mod##*/}.ko*" | head -1)
        case $path in
        *.ko) cp "$path" "$ready/modules/" ;;
        *.ko.xz) xz -dc "$path" >"$ready/modules/${mod##*/}.ko" ;;
        *.ko.zst) zstd -qdc "$path" >"$ready/modules/${mod##*/}.ko" ;;
        *) vm_failed "$kernel_pkg has no ${mod##*/}.ko" ;;
        esac
    done
    echo "${kernel_pkg#linux-image-}" >"$ready/kernel-version"
    rm -rf "$cache/guest"
    mv "$ready" "$cache/guest"
    touch "$cache/ready"
    rm -rf "$fetch_dir"
    fetch_dir=
}

# One preparation at a time: meson runs several wrapped tests at once, and neither apt nor the
# cache may be raced.
exec {lock_fd}>"$cache/lock"
flock "$lock_fd"
ensure_qemu
fetch_guest
exec {lock_fd}>&-
guest=$cache/guest
kernel_version=$(cat "$guest/kernel-version")

if [ "$prepare_only" -eq 1 ]; then
    if [ -z "$kvm_why" ]; then
        echo "$prog_name: the host's /dev/kvm is usable: KVM programs run on it; shadow paging runs in an emulated x86 VM (QEMU TCG, guest Linux $kernel_version)"
    else
        echo "$prog_name: no usable KVM on this host ($kvm_why): KVM programs run inside an emulated x86 VM (QEMU TCG with AMD SVM, guest Linux $kernel_version)"
    fi
    exit 0
fi

# ---- The initramfs ----------------------------------------------------------------------------

program=$(cd "$(dirname "$program")" && pwd -P)/$(basename "$program")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/membacking-vm.XXXXXX")
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,modules}
cp "$guest/busybox" "$root/bin/busybox"
cp "$guest"/modules/*.ko "$root/modules/"

# The program and its shared libraries, each at the path where the loader will look for it.
add_file() { # $1 = host path
    mkdir -p "$root$(dirname "$1")"
    cp -L "$1" "$root$1"
}
add_file "$program"
if libs=$(ldd "$program" 2>/dev/null); then # fails for a static program: nothing to add
    if grep -q 'not found' <<<"$libs"; then
        grep 'not found' <<<"$libs" >&2
        vm_failed "$program needs libraries that are not installed (above)"
    fi
    while read -r lib; do
        add_file "$lib"
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }' <<<"$libs")
fi

quote() { # single-quoted for the guest's shell
    printf "'%s'" "${1//\'/\'\\\'\'}"
}
for name in $(compgen -e); do
    case $name in
    MEMBACKING_* | *SAN_OPTIONS | BENCHMARK_* | MALLOC_PERTURB_ | LD_LIBRARY_PATH)
        printf 'export %s=%s\n' "$name" "$(quote "${!name}")" ;;
    esac
done >"$root/env"
command_line=$(quote "$program")
for arg in "$@"; do command_line+=" $(quote "$arg")"; done

# A random marker: the program's own output cannot fake the line that carries its exit status.
marker="@@membacking-vm-$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')"
npt_param=
[ "$shadow_paging" -eq 0 ] || npt_param=npt=0

cat >"$root/init" <<EOF
#!/bin/busybox sh
# Generated by tests/kvm/run-in-vm.sh: the VM's only process.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm
mount -t tmpfs shm /dev/shm
# The console, opened now that devtmpfs has it; LF stays LF on its way out.
exec </dev/console >/dev/console 2>&1
stty -onlcr
finish() {
    echo "$marker \$1"
    # stty waits until the UART has sent everything, before the power goes.
    stty -onlcr
    poweroff -f
}
load() {
    insmod "/modules/\$1.ko" \$2 || { echo "run-in-vm guest: insmod \$1 failed"; finish vm-failed; }
}
load irqbypass
load kvm
load kvm-amd $npt_param
[ -c /dev/kvm ] || { echo "run-in-vm guest: kvm-amd is loaded but there is no /dev/kvm"; finish vm-failed; }
npt=\$(cat /sys/module/kvm_amd/parameters/npt)
if [ -n "$npt_param" ] && [ "\$npt" != N ]; then
    echo "run-in-vm guest: shadow paging was asked for, but kvm_amd has npt=\$npt"
    finish vm-failed
fi
[ "\$npt" = Y ] && mmu="nested paging" || mmu="shadow paging"
echo "run-in-vm guest: Linux \$(uname -r), /dev/kvm from kvm_amd (\$mmu)"
. /env
mkdir -p $(quote "$PWD")
cd $(quote "$PWD")
kernel_lines=\$(dmesg | wc -l)
# Through a pipe, as under meson: the program sees no terminal (no colours, the same buffering).
set -o pipefail
$command_line </dev/null 2>&1 | cat
status=\$?
# The console is quiet (no boot chatter), so show what the kernel warned about while the program
# ran: a KVM WARN_ON it provoked, say.
dmesg -r | tail -n +\$((kernel_lines + 1)) | grep '^<[0-4]>' | sed 's/^<.>/run-in-vm guest kernel: /'
finish "exit \$status"
EOF
chmod +x "$root/init"
# The kernel opens /dev/console before /init runs, and warns if it cannot: root can make the node.
mknod "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . | "$guest/busybox" cpio -o -H newc 2>/dev/null) >"$tmp/initrd.cpio"

# ---- The run ----------------------------------------------------------------------------------

# Clang's sanitizer runtimes symbolize stack frames with llvm-symbolizer, which the VM does not
# have: they print "#N 0xADDR (/module+0xOFFSET)". The files are the host's, at the same paths, so
# the host's symbolizer can name those frames on their way out.
symbolizer=$(command -v llvm-symbolizer || command -v llvm-symbolizer-14 || true)
frame_re='^( *#[0-9]+ 0x[0-9a-f]+) +\((/[^+]+)\+(0x[0-9a-f]+)\)'
symbolize() { # $1 = a console line; prints it, with its frame named where that can be done
    local where
    if [ -n "$symbolizer" ] && [[ $1 =~ $frame_re ]]; then
        where=$("$symbolizer" --obj="${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}" 2>/dev/null |
            head -2 | paste -sd' ')
        if [ -n "$where" ] && [[ $where != '??'* ]]; then
            printf '%s in %s (%s+%s)\n' "${BASH_REMATCH[1]}" "$where" "${BASH_REMATCH[2]}" \
                "${BASH_REMATCH[3]}"
            return
        fi
    fi
    printf '%s\n' "$1"
}

# Relays the console to stdout and keeps what the status line says for the exit code (even when
# no one reads stdout any more, as with `| head`).
relay() {
    local line status=
    trap '' PIPE
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        # After the status line comes only the kernel's "reboot: Power down".
        [ -z "$status" ] || continue
        if [[ $line == *"$marker "* ]]; then
            status=${line##*"$marker "}
            line=${line%%"$marker "*}
            [ -n "$line" ] || continue
        fi
        symbolize "$line" 2>/dev/null || true
    done
    printf '%s' "$status" >"$tmp/status"
}

if [ "$shadow_paging" -eq 1 ] || [ "$force_vm" -eq 1 ]; then
    say "$why_vm: running $(basename "$program") there (QEMU TCG, guest Linux $kernel_version, kvm_amd ${npt_param:-npt=1})"
else
    say "$why_vm, so $(basename "$program") runs inside a software-emulated x86 VM that gives it a real /dev/kvm (QEMU TCG: an AMD CPU with SVM and nested paging; guest Linux $kernel_version); booting it takes a few seconds"
fi

mkfifo "$tmp/console"
relay <"$tmp/console" &
relay_pid=$!
# --foreground keeps QEMU in this process group, so whatever stops the group (meson's timeout,
# Ctrl-C) stops QEMU too; the traps cover a signal to this script alone. The command is built
# first: an expansion error inside a background job would run the EXIT trap there too.
qemu=(timeout --foreground --kill-after=10 "$time_limit"
    qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m "${MEMBACKING_VM_MEMORY:-2G}"
    -nodefaults -no-user-config -display none -serial stdio -no-reboot
    -kernel "$guest/vmlinuz" -initrd "$tmp/initrd.cpio"
    -append "console=ttyS0 rdinit=/init panic=-1 quiet")
started=$SECONDS
"${qemu[@]}" </dev/null >"$tmp/console" &
qemu_pid=$!
qemu_status=0
wait "$qemu_pid" || qemu_status=$?
qemu_pid=''
elapsed=$((SECONDS - started))
wait "$relay_pid" || true
relay_pid=''
status=$(cat "$tmp/status" 2>/dev/null || true)

if [ "$qemu_status" -eq 124 ] ||
    { [ "$qemu_status" -eq 137 ] && [ "$elapsed" -ge "$time_limit" ]; }; then
    say "FAILED: the VM ran out of time (${time_limit} s; QEMU was stopped)"
    exit 124
fi
case $status in
"exit "*)
    code=${status#exit }
    say "$(basename "$program") exited with status $code inside the VM (${elapsed} s, boot included)"
    exit "$code"
    ;;
vm-failed) vm_failed "the VM could not give the program a /dev/kvm (the guest said why, above)" ;;
*) vm_failed "the VM stopped after ${elapsed} s without reporting the program's exit status (QEMU status $qemu_status): QEMU did not start, or the guest did not boot or panicked (see above)" ;;
esac
