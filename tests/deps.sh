# Sourced by tests/run.sh and examples/run.sh: installs the Debian 12 packages the build needs,
# only those missing (so a second run costs nothing). Needs root for apt-get.
deps_packages=(meson ninja-build cmake pkg-config g++ clang-14 libclang-rt-14-dev python3 clang-format-14 clang-tidy-14
               librange-v3-dev doctest-dev libbenchmark-dev valgrind)

install_deps() {
    local missing=() p
    for p in "${deps_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== installing: ${missing[*]}"
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}
