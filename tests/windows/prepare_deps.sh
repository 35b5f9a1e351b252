#!/usr/bin/env bash
# Runs inside the Debian 13 chroot (tests/windows/run.sh): puts the test dependencies where the
# MinGW cross build finds them, under /opt/win-deps, with pkg-config files.
#   prepare_deps.sh headers     doctest and range-v3 (once per environment build). Debian's own
#                               copies live in /usr/include next to glibc's headers, which a MinGW
#                               build must never see, so they are copied.
#   prepare_deps.sh benchmark   Google Benchmark, which has no MinGW package: built from Debian's
#                               source package with the cross compiler (only for the benchmark run).
set -euo pipefail
deps=/opt/win-deps
mkdir -p "$deps/include" "$deps/lib/pkgconfig"
cxx=x86_64-w64-mingw32-g++-posix
ar=x86_64-w64-mingw32-ar

if [ "${1:-}" = headers ]; then
    cp -r /usr/include/doctest "$deps/include/"
    cp -r /usr/include/range /usr/include/meta /usr/include/concepts /usr/include/std "$deps/include/"
    cat >"$deps/lib/pkgconfig/doctest.pc" <<PC
Name: doctest
Description: doctest headers (copied for MinGW)
Version: $(dpkg-query -W -f='${Version}' doctest-dev | cut -d- -f1)
Cflags: -I$deps/include
PC
    cat >"$deps/lib/pkgconfig/range-v3.pc" <<PC
Name: range-v3
Description: range-v3 headers (copied for MinGW)
Version: $(dpkg-query -W -f='${Version}' librange-v3-dev | cut -d- -f1)
Cflags: -I$deps/include
PC
    echo "win-deps headers ready"
    exit 0
fi
[ "${1:-}" = benchmark ] || { echo "usage: prepare_deps.sh headers|benchmark" >&2; exit 2; }

cd /tmp
apt-get source --download-only benchmark
src=$(find . -maxdepth 1 -name 'benchmark_*.orig.tar.*' | head -1)
mkdir bm && tar -xf "$src" -C bm --strip-components=1
cd bm
mkdir obj
for f in src/*.cc; do
    "$cxx" -std=c++17 -O2 -DNDEBUG -DBENCHMARK_STATIC_DEFINE -DHAVE_STD_REGEX -DHAVE_STEADY_CLOCK \
        -Iinclude -Isrc -c "$f" -o "obj/$(basename "$f" .cc).o" &
    while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done
done
wait
rm -f obj/benchmark_main.o
"$ar" rcs "$deps/lib/libbenchmark.a" obj/*.o
cp -r include/benchmark "$deps/include/"
version=$(sed -n 's/^Version: *//p' ../benchmark_*.dsc | head -1)

cat >"$deps/lib/pkgconfig/benchmark.pc" <<PC
Name: benchmark
Description: Google Benchmark built with MinGW from Debian's source package
Version: ${version%%-*}
Cflags: -I$deps/include -DBENCHMARK_STATIC_DEFINE
Libs: -L$deps/lib -lbenchmark -lshlwapi
PC
echo "win-deps ready: $(ls "$deps/lib")"
