#!/usr/bin/env bash
# Consumer 3 of 3: a Meson project with membacking in subprojects/ (this source tree, linked in,
# with the wrap file the README shows) and dependency('membacking'), built with the project's
# compiler and warning_level=3 plus werror in the consumer.
# Proves: the wrap's [provide] and the override give the dependency with a plain
# dependency('membacking') (forced to the subproject, so an installed membacking cannot stand in);
# the subproject configures without looking up the test-only dependencies (range-v3, doctest,
# benchmark: the setup log names none of them); the generated version.hpp is on the dependency's
# include path; the subproject adds no target; our headers (plain -I, not system) compile
# warning-free under -Wpedantic -Werror.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mkdir -p "$work/consumer/subprojects"
cp "$here/meson/meson.build" "$here/consumer.cpp" "$work/consumer/"
ln -s "$source_root" "$work/consumer/subprojects/membacking"
# The README's wrap, word for word but for the URL: the directory exists, so nothing is fetched.
cat >"$work/consumer/subprojects/membacking.wrap" <<'WRAP'
[wrap-git]
url = https://example.invalid/membacking.git
revision = main
depth = 1

[provide]
dependency_names = membacking
WRAP
cd "$work/consumer"
CXX=$cxx meson setup build --wrap-mode=nodownload --force-fallback-for=membacking >"$work/setup.log" ||
    { cat "$work/setup.log"; fail "meson could not configure the consumer"; }
grep -E 'Dependency membacking|range-v3|doctest|benchmark' "$work/setup.log" || true
if grep -qE 'range-v3|doctest|benchmark' "$work/setup.log"; then
    fail "the subproject looked up a test-only dependency"
fi
# The subproject brings only the dependency: the consumer is the one target, and our include
# directory reaches it as a plain -I (as -isystem, -Werror would not see our headers' warnings).
targets=$(meson introspect --targets build | python3 -c 'import json, sys; print(*[t["name"] for t in json.load(sys.stdin)])')
[ "$targets" = consumer ] || fail "the subproject added targets: $targets"
grep -qF -- '-I../subprojects/membacking/include' build/compile_commands.json ||
    fail "the subproject's include directory is not a plain -I"
! grep -qF -- '-isystem' build/compile_commands.json || fail "the consumer compiles with -isystem"
meson compile -C build
run_consumer build/consumer
echo "Meson consumer: dependency('membacking') from the subproject, warnings as errors"
