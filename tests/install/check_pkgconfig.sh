#!/usr/bin/env bash
# Consumer 1 of 3: a plain compiler line with `pkg-config --cflags` / `--libs membacking` against
# the installed tree (the README's recipe, meson install --destdir), as a user without any build
# system would write it.
# Proves: the headers and membacking.pc are all a consumer needs (include path, -std=c++20,
# -pthread), with our headers under -Wall -Wextra -Wpedantic -Werror; and that the compile reads no
# header but the staged ones and the toolchain's, libc's and the kernel's: range-v3 is installed
# on this machine, yet the compiler's own dependency list shows it was never opened.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stage_install

export PKG_CONFIG_PATH=$prefix/share/pkgconfig PKG_CONFIG_SYSROOT_DIR=$work/stage
pkg-config --exists --print-errors membacking
[ "$(pkg-config --modversion membacking)" = "$version" ] || fail "membacking.pc has the wrong version"
read -ra cflags <<<"$(pkg-config --cflags membacking)"
read -ra libs <<<"$(pkg-config --libs membacking)"
has() { # $1 = flag, rest = flags
    local want=$1
    shift
    printf '%s\n' "$@" | grep -qxF -- "$want" || fail "pkg-config gives no $want: $*"
}
has -std=c++20 "${cflags[@]}"
has "-I$prefix/include" "${cflags[@]}"
has -pthread "${cflags[@]}"
has -pthread "${libs[@]}"

mkdir "$work/consumer"
cp "$here/consumer.cpp" "$work/consumer/"
cd "$work/consumer"
"$cxx" -Wall -Wextra -Wpedantic -Werror -MD -MF consumer.d -c consumer.cpp "${cflags[@]}" -o consumer.o

# Every header the compiler opened: ours from the stage, the rest owned by the toolchain, libc or
# the kernel headers package (on Debian, where dpkg can tell).
mapfile -t read_files < <(sed -e 's/^[^:]*://' -e 's/\\$//' consumer.d | tr ' ' '\n' | grep . |
    xargs -r realpath | sort -u)
printf '%s\n' "${read_files[@]}" | grep -qxF "$(realpath "$prefix/include/membacking/version.hpp")" ||
    fail "the consumer did not use the staged headers"
mapfile -t headers < <(printf '%s\n' "${read_files[@]}" | grep -v "^$(realpath "$work")/")
! printf '%s\n' "${headers[@]}" | grep -q '/range/v3/' || fail "the consumer compile read range-v3 headers"
if command -v dpkg-query >/dev/null; then
    owners=$(dpkg -S "${headers[@]}" | sed 's/: .*//' | tr ',' '\n' | sed 's/^ *//; s/:.*//' | sort -u)
    undeclared=$(grep -vxE 'libc6-dev|linux-libc-dev|libstdc\+\+-[0-9]+-dev|libgcc-[0-9]+-dev|gcc-[0-9]+' \
        <<<"$owners" || true)
    [ -z "$undeclared" ] || fail "the consumer compile needed headers of undeclared packages: $undeclared"
fi
"$cxx" consumer.o "${libs[@]}" -o consumer
run_consumer ./consumer
echo "pkg-config consumer: built with the installed headers and membacking.pc alone"
