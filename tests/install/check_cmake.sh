#!/usr/bin/env bash
# Consumer 2 of 3: a CMake project, find_package(membacking CONFIG REQUIRED) and
# target_link_libraries(... membacking::membacking), against the installed tree (the README's
# recipe, meson install --destdir), configured and built by cmake with the project's compiler.
# Proves: the installed membackingConfig.cmake is found under the prefix and is relocatable (the
# stage is not the configured prefix); the target alone carries the include path, C++20 and
# Threads::Threads (the consumer sets none of them, and CMake's default for g++ 12 is C++17, where
# the headers do not compile); the version file accepts this MAJOR.MINOR and, while 0.x, rejects
# other minors and majors; an unknown component fails. (CMake puts an imported target's include
# directory under -isystem, so warnings in our headers are the other two consumers' job.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stage_install
[ -f "$prefix/share/cmake/membacking/membackingConfig.cmake" ] || fail "membackingConfig.cmake was not installed"
[ -f "$prefix/share/cmake/membacking/membackingConfigVersion.cmake" ] ||
    fail "membackingConfigVersion.cmake was not installed"

IFS=. read -r major minor patch <<<"$version"
cases="$major.$minor.$patch=TRUE;$major.$minor=TRUE;$major.$minor.$((patch + 1))=FALSE"
cases+=";$major.$((minor + 1))=FALSE;$((major + 1)).$minor=FALSE"
if [ "$major" = 0 ] && [ "$minor" -gt 0 ]; then
    cases+=";0.$((minor - 1))=FALSE" # 0.x: an older minor is not compatible either
fi

mkdir "$work/consumer"
cp "$here/cmake/CMakeLists.txt" "$here/consumer.cpp" "$work/consumer/"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$work/consumer" -B "$work/consumer/build" "${generator[@]}" \
    -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF \
    -DMEMBACKING_REQUEST="$major.$minor" "-DMEMBACKING_VERSION_CASES=$cases" >"$work/configure.log" ||
    { cat "$work/configure.log"; fail "cmake could not configure the consumer"; }
grep -F 'membacking::membacking' "$work/configure.log"
cmake --build "$work/consumer/build"
run_consumer "$work/consumer/build/consumer"
echo "CMake consumer: find_package(membacking CONFIG) and membacking::membacking alone"
