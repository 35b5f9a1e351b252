#!/usr/bin/env bash
# The Windows half of the test suite, on a Linux machine: cross-compiles the tests with MinGW and
# runs them under Wine 10, inside a Debian 13 (trixie) chroot that this script builds with
# debootstrap and keeps between runs. Needs root (debootstrap, chroot, mounts).
#
#   bash tests/windows/run.sh            # build (or reuse) the chroot, build, run; last line:
#                                        # "N passed, N failed, N skipped"
#   MEMBACKING_WINE_CACHE=DIR            # where the chroot lives (default below)
#   MEMBACKING_WINE_BENCH=1              # also build and run the Windows benchmark and print
#                                        # its ratios (builds Google Benchmark for MinGW once)
#
# The chroot (about 1.5 GiB) is cached in $MEMBACKING_WINE_CACHE, default
# /var/cache/membacking/wine-trixie, and rebuilt when the package list below changes (its hash is
# stored beside it). A run leaves no mount, no process and no build directory behind: a trap
# kills the run's wineserver, unmounts /proc and the source bind mount, and removes the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD

cache=${MEMBACKING_WINE_CACHE:-/var/cache/membacking/wine-trixie}
mirror=http://deb.debian.org/debian
# What the chroot holds: Wine 10 (wine64), MinGW-w64 with POSIX threads (GCC 14), the build tools,
# and the header-only test dependencies (copied out of their Debian paths for MinGW, below).
chroot_packages=(wine64 wine g++-mingw-w64-x86-64-posix meson ninja-build pkgconf python3
                 doctest-dev librange-v3-dev)
env_version="2 ${chroot_packages[*]}" # bump the number to force a rebuild
env_hash=$(printf '%s' "$env_version" | sha256sum | cut -c1-16)

log() { echo "== windows: $*"; }

# ---- cleanup: everything this run mounted or started inside the chroot ----
mounted=()
build_dir=
cleanup() {
    local rc=$? pids=() p
    # Processes whose root is our chroot were started by this run (wine, wineserver, compilers).
    if [ -d "${chroot_dir:-}" ]; then
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/root" 2>/dev/null)" = "$chroot_dir" ] && pids+=("${p#/proc/}")
        done
        [ ${#pids[@]} -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null
    fi
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" 2>/dev/null || true
    done
    [ -n "$build_dir" ] && rm -rf "$build_dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mount_in() { # $1 = chroot dir; mounts /proc, /sys (Wine reads the CPU topology there) and
    # /dev/shm inside it, recorded for cleanup
    mount -t proc proc "$1/proc" && mounted+=("$1/proc")
    mount -t sysfs sysfs "$1/sys" && mounted+=("$1/sys")
    mkdir -p "$1/dev/shm"
    mount -t tmpfs -o size=1g tmpfs "$1/dev/shm" && mounted+=("$1/dev/shm")
}
unmount_all() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}"; done
    mounted=()
}
in_chroot() { # $1 = chroot dir, rest = command (run with a clean environment)
    local dir=$1
    shift
    chroot "$dir" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# ---- the environment: Debian 13 + Wine 10 + MinGW, cached ----
build_env() {
    local new=$cache/root.new
    log "building the Wine environment in $cache (debootstrap trixie; a few minutes)"
    if ! command -v debootstrap >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
            >/dev/null
    fi
    rm -rf "$new"
    mkdir -p "$new"
    chroot_dir=$new
    debootstrap --variant=minbase trixie "$new" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        tail -20 "$cache/debootstrap.log"
        return 1
    }
    mount_in "$new"
    cat >"$new/etc/apt/sources.list" <<SOURCES
deb $mirror trixie main
deb-src $mirror trixie main
SOURCES
    # No fsync per unpacked file: the chroot is rebuilt from scratch if anything goes wrong.
    echo force-unsafe-io >"$new/etc/dpkg/dpkg.cfg.d/unsafe-io"
    in_chroot "$new" apt-get update -qq
    in_chroot "$new" apt-get install -y -qq --no-install-recommends "${chroot_packages[@]}" \
        >"$cache/apt.log" 2>&1 || {
        tail -20 "$cache/apt.log"
        return 1
    }
    cp "$root/tests/windows/prepare_deps.sh" "$new/tmp/prepare_deps.sh"
    in_chroot "$new" bash /tmp/prepare_deps.sh headers >"$cache/deps.log" 2>&1 || {
        tail -30 "$cache/deps.log"
        return 1
    }
    in_chroot "$new" apt-get clean
    rm -rf "$new/tmp/"* "$new/var/lib/apt/lists/"*
    unmount_all
    rm -rf "$cache/root"
    mv "$new" "$cache/root"
    echo "$env_hash" >"$cache/env.hash"
}

mkdir -p "$cache"
# One run at a time per machine: runs share the chroot, its /build, and the cleanup kills every
# process rooted in the chroot. A second run waits here (the lock goes with this process).
exec 9>"$cache/lock"
if ! flock -n 9; then
    log "another run holds $cache/lock: waiting for it"
    flock 9
fi
if [ "$(cat "$cache/env.hash" 2>/dev/null)" != "$env_hash" ] || [ ! -x "$cache/root/usr/lib/wine/wine64" ]; then
    SECONDS=0
    build_env
    log "environment ready in ${SECONDS}s"
else
    log "reusing the Wine environment in $cache"
fi
chroot_dir=$cache/root

# ---- cross-build the Windows test set and run it under Wine ----
mount_in "$chroot_dir"
bench=${MEMBACKING_WINE_BENCH:-0}
if [ "$bench" = 1 ] && [ ! -f "$chroot_dir/opt/win-deps/lib/libbenchmark.a" ]; then
    # Google Benchmark for MinGW, built once from Debian's source package (a few minutes) and
    # kept in the cached environment; only the benchmark run needs it.
    log "building Google Benchmark with MinGW (once)"
    cp "$root/tests/windows/prepare_deps.sh" "$chroot_dir/tmp/prepare_deps.sh"
    in_chroot "$chroot_dir" apt-get update -qq
    in_chroot "$chroot_dir" bash /tmp/prepare_deps.sh benchmark >"$cache/bench-deps.log" 2>&1 || {
        tail -30 "$cache/bench-deps.log"
        echo "0 passed, 1 failed, 0 skipped"
        exit 1
    }
    rm -rf "$chroot_dir/tmp/"* "$chroot_dir/var/lib/apt/lists/"*
fi
mkdir -p "$chroot_dir/src"
mount --bind "$root" "$chroot_dir/src" && mounted+=("$chroot_dir/src")
mount -o remount,bind,ro "$chroot_dir/src"
build_dir=$chroot_dir/build
rm -rf "$build_dir" "$chroot_dir/wineprefix"
wine_env=(WINEPREFIX=/wineprefix WINEDEBUG=-all WINEDLLOVERRIDES=mscoree,mshtml=
          XDG_RUNTIME_DIR=/tmp)

log "cross-compiling the tests with MinGW-w64"
SECONDS=0
bench_option=-Dbenchmarks=disabled
[ "$bench" = 1 ] && bench_option=-Dbenchmarks=enabled
# -O1 without debug information: the build is most of a warm run's time, and -O1 compiles the
# test program in about 60% of -O2's time (the benchmark, when asked for, gets -O2).
optimization=1
[ "$bench" = 1 ] && optimization=2
if ! in_chroot "$chroot_dir" meson setup /build /src --cross-file /src/tests/windows/mingw-w64.ini \
        --wrap-mode=nodownload -Dexamples=false "$bench_option" -Dbench_smoke=false -Ddebug=false \
        -Doptimization="$optimization" \
        >"$cache/setup.log" 2>&1; then
    cat "$cache/setup.log"
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
fi
if ! in_chroot "$chroot_dir" ninja -C /build >"$cache/build.log" 2>&1; then
    grep -E "error|Error" "$cache/build.log" | head -30
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
fi
log "built in ${SECONDS}s"

# A fresh Wine prefix for this run, created once before the tests start in parallel.
SECONDS=0
in_chroot "$chroot_dir" env "${wine_env[@]}" /usr/lib/wine/wine64 wineboot --init >/dev/null 2>&1 || true
in_chroot "$chroot_dir" env "${wine_env[@]}" /usr/lib/wine/wineserver -w || true
# One wineserver for all the tests (-p: persistent, it does not exit when its last client does;
# killed after them, and by the cleanup). Without it, a test whose wine connects just as the
# server of the tests before times out and exits fails with "wine client error:0: recvmsg:
# Connection reset by peer" (seen once in a run of this script, the test 0.01 s old). Its
# services (winedevice.exe) are started here, their output to /dev/null: started by a test they
# would hold that test's output pipe open, and meson would wait for it for ever.
if ! in_chroot "$chroot_dir" env "${wine_env[@]}" /usr/lib/wine/wineserver -p </dev/null >/dev/null 2>&1; then
    echo "== windows: the wineserver did not start"
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
fi
in_chroot "$chroot_dir" env "${wine_env[@]}" /usr/lib/wine/wine64 wineboot </dev/null >/dev/null 2>&1 ||
    true
log "Wine prefix ready in ${SECONDS}s"

SECONDS=0
in_chroot "$chroot_dir" env "${wine_env[@]}" meson test -C /build --no-rebuild --print-errorlogs \
    --num-processes 2 || true
in_chroot "$chroot_dir" env "${wine_env[@]}" /usr/lib/wine/wineserver -k || true
log "tests ran in ${SECONDS}s"
# The WHP fault sweep's counts, in every log (as proof_faults prints its own).
grep -ho "MESSAGE: operations: .*" "$build_dir/meson-logs/testlog.txt" | sed 's/^/== windows: whp_sweep: /' || true
read -r passed failed skipped <<<"$(python3 "$root/tests/lint/summarise.py" \
    "$build_dir/meson-logs/testlog.json")"

if [ "$bench" = 1 ]; then
    log "benchmark (ratios only: Wine timings are not Windows timings)"
    if in_chroot "$chroot_dir" env "${wine_env[@]}" /usr/lib/wine/wine64 \
        /build/bench/bench_windows_va.exe --benchmark_repetitions=10 \
        --benchmark_enable_random_interleaving=true \
        --benchmark_report_aggregates_only=true --benchmark_out=/build/bench.json \
        --benchmark_out_format=json >"$cache/bench.log" 2>&1; then
        python3 "$root/tests/windows/bench_ratios.py" "$build_dir/bench.json" || failed=$((failed + 1))
    else
        tail -20 "$cache/bench.log"
        failed=$((failed + 1))
    fi
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
