# Sourced by the consumer tests in tests/install: a scratch folder removed on exit, the expected
# output of consumer.cpp, and (for the installed-tree consumers) the README's install recipe into a
# DESTDIR, checked for what every consumer relies on.
#   $1 = C++ compiler, $2 = project version
cxx=$1
version=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
expected_output="membacking $version ($version): read back 0x1234abcd"

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# Runs a built consumer and checks what it printed.
run_consumer() { # $1 = program
    local out
    out=$("$1") || fail "$1 exited with $?"
    [ "$out" = "$expected_output" ] || fail "$1 printed '$out', expected '$expected_output'"
    echo "$out"
}

# The README's install recipe (a build dir of its own, tests, benchmarks and examples off), then
# meson install --destdir into $work/stage; sets $prefix (the staged prefix) and checks the tree.
stage_install() {
    local stage=$work/stage build=$work/build-install pc
    # From $work: Meson runs `cmake --system-information`, which works in the current directory.
    (cd "$work" && CXX=$cxx meson setup "$build" "$source_root" --wrap-mode=nodownload \
        -Dtests=disabled -Dbenchmarks=disabled -Dexamples=false >"$work/install-setup.log") ||
        { cat "$work/install-setup.log"; fail "meson setup for the install failed"; }
    [ "$(meson introspect --targets "$build")" = "[]" ] || fail "installing the headers builds targets"
    meson install -C "$build" --destdir "$stage" >/dev/null
    pc=$(find "$stage" -name membacking.pc) && [ -n "$pc" ] || fail "membacking.pc was not installed"
    prefix=${pc%/share/pkgconfig/membacking.pc}
    [ "$prefix" != "$pc" ] || fail "membacking.pc is not in <prefix>/share/pkgconfig: $pc"
    [ -f "$prefix/include/membacking/membacking.hpp" ] || fail "the headers were not installed"
    [ -f "$prefix/include/membacking/version.hpp" ] || fail "the generated version.hpp was not installed"
    [ -z "$(find "$prefix/include" -type f ! -name '*.hpp')" ] ||
        fail "non-header files installed: $(find "$prefix/include" -type f ! -name '*.hpp')"
    # The installed headers use nothing but the standard library, the OS headers and themselves:
    # no range-v3 (which has no .pc on Debian, so pkg-config could not declare it), even behind an
    # #if that this machine does not take.
    local hits
    hits=$(grep -rnE '#[[:space:]]*include[[:space:]]*[<"]range/|(^|[^:[:alnum:]_])ranges::' "$prefix/include" || true)
    [ -z "$hits" ] || fail "the installed headers use range-v3:"$'\n'"$hits"
}
