#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what it needs (apt-get, as root),
# then builds and runs every test in three configurations:
#   build-ci        gcc, debugoptimized (unit, KVM, examples, install, lint, benchmark smoke runs)
#   build-ci-asan   clang, AddressSanitizer + UndefinedBehaviorSanitizer (so both compilers build
#                   everything with warnings as errors); also two libFuzzer runs: the IPC
#                   protocol decoder (40 s, tests/ipc) and the control/access harness (60 s, tests/fuzz)
#   build-ci-tsan   gcc, ThreadSanitizer (the concurrency tests)
#   build-ci-release gcc, --buildtype=release (-O3, NDEBUG): what a user's release build compiles
# then the Windows test set under Wine (tests/windows/run.sh), and ends with one line:
# "N passed, N failed, N skipped".
#
# The KVM tests (and the example VMM, and bench_kvm's smoke run) get a real /dev/kvm in every
# configuration: the host's where it is usable, otherwise one inside a software-emulated x86 VM
# (tests/kvm/run-in-vm.sh, which meson runs them through). A test that still skips is listed, with
# the reason, just before the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

# shellcheck source=tests/deps.sh
source tests/deps.sh
install_deps

# QEMU, the VM's kernel and busybox: installed and fetched (and cached) now, once, rather than
# inside the first KVM test's time limit. Where this fails, the KVM tests say why they skip.
echo "== KVM: where the KVM tests run"
bash tests/kvm/run-in-vm.sh --prepare || true

total_pass=0 total_fail=0 total_skip=0
skip_notes=()
summarise() { # $1 = build dir
    local counts note
    counts=$(python3 tests/lint/summarise.py "$1/meson-logs/testlog.json")
    read -r p f s <<<"$counts"
    echo "   $1: $p passed, $f failed, $s skipped"
    total_pass=$((total_pass + p)) total_fail=$((total_fail + f)) total_skip=$((total_skip + s))
    while IFS= read -r note; do
        skip_notes+=("$1 $note")
    done < <(python3 tests/lint/summarise.py --skipped "$1/meson-logs/testlog.json")
}

run_config() { # $1 = build dir, $2 = C++ compiler, rest = meson options
    local dir=$1 cxx=$2
    shift 2
    echo "== configuring $dir (CXX=$cxx $*)"
    if [ ! -d "$dir" ]; then
        if ! CXX=$cxx meson setup "$dir" --wrap-mode=nodownload "$@" >"$dir.setup.log" 2>&1; then
            cat "$dir.setup.log"
            echo "   $dir: configuring failed (counted as one failure)"
            total_fail=$((total_fail + 1))
            return 1
        fi
    fi
    echo "== building $dir"
    if ! meson compile -C "$dir" >"$dir.build.log" 2>&1; then
        grep -E "error|Error" "$dir.build.log" | head -20
        echo "   $dir: the build failed (counted as one failure)"
        total_fail=$((total_fail + 1))
        return 1
    fi
    echo "== testing $dir"
    meson test -C "$dir" --no-rebuild --print-errorlogs "${TEST_ARGS[@]}" || true
    summarise "$dir"
}

# Sanitizer findings must fail the test that triggered them, not scroll past.
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export ASAN_OPTIONS=abort_on_error=0:detect_leaks=1

status=0
TEST_ARGS=()
run_config build-ci g++ || status=1
TEST_ARGS=(--no-suite bench --no-suite lint --no-suite install)
run_config build-ci-asan clang++-14 -Db_sanitize=address,undefined -Db_lundef=false \
    -Dbenchmarks=disabled || status=1
# The fuzzer (tests/fuzz, a bounded 60 s run) exists only in the clang configuration: it must
# have run there, never dropped out silently.
if [ -f build-ci-asan/meson-logs/testlog.json ] && ! python3 -c '
import json, sys
sys.exit(0 if any(json.loads(l)["name"].endswith(" / fuzz") for l in open(sys.argv[1])) else 1)
' build-ci-asan/meson-logs/testlog.json; then
    echo "   build-ci-asan: the fuzz test did not run (counted as one failure)"
    total_fail=$((total_fail + 1))
fi
run_config build-ci-tsan g++ -Db_sanitize=thread -Dbenchmarks=disabled -Dheader_check=false || status=1
# What a user gets from `--buildtype=release` (-O3, NDEBUG): it must build with warnings as errors,
# and the unit tests and the example must pass there too.
TEST_ARGS=(--suite unit --suite examples)
run_config build-ci-release g++ --buildtype=release -Dbenchmarks=disabled -Dheader_check=false ||
    status=1

# The Windows policies: cross-built with MinGW and run under Wine 10 in a cached Debian 13 chroot
# (tests/windows/run.sh, whose last line is "N passed, N failed, N skipped"); its counts join
# the totals.
echo "== windows: MinGW cross build, run under Wine (tests/windows/run.sh)"
bash tests/windows/run.sh 2>&1 | tee build-windows.log || status=1
if read -r p f s < <(tail -1 build-windows.log |
    sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed, \([0-9]*\) skipped$/\1 \2 \3/p') &&
    [ -n "$p" ]; then
    echo "   windows: $p passed, $f failed, $s skipped"
    total_pass=$((total_pass + p)) total_fail=$((total_fail + f)) total_skip=$((total_skip + s))
else
    echo "   windows: no summary line (counted as one failure)"
    total_fail=$((total_fail + 1))
fi

echo
if [ ${#skip_notes[@]} -gt 0 ]; then
    echo "skipped, and why:"
    printf '   %s\n' "${skip_notes[@]}"
fi
echo "$total_pass passed, $total_fail failed, $total_skip skipped"
if [ "$status" -ne 0 ] || [ "$total_fail" -ne 0 ]; then
    exit 1
fi
