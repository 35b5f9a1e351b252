#!/usr/bin/env bash
# Instructions per iteration of each benchmark a filter selects, counted by callgrind: immune to the
# machine's noise, so ratios against a baseline are exact and repeatable. Two runs with fixed
# iteration counts (MEMBACKING_BENCH_ITERATIONS) per benchmark; the difference of their totals over
# the difference of the counts cancels setup and teardown. (A fixed count adds
# "/iterations:N" to every name, which the filter below matches.)
#   bench/count_instructions.sh build/bench/bench_guest_access 'BM_RandomRW/(raw|64)$'
set -euo pipefail
bench=$1 filter=$2
small=20000 large=220000
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }

total() { # $1 = benchmark name, $2 = iterations: prints the program's total instruction count
    MEMBACKING_BENCH_ITERATIONS=$2 valgrind --tool=callgrind --callgrind-out-file="$work/out" \
        "$bench" --benchmark_filter="^$1/iterations:$2\$" >/dev/null 2>&1
    callgrind_annotate "$work/out" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}

"$bench" --benchmark_list_tests --benchmark_filter="$filter" | while read -r name; do
    a=$(total "$name" $small)
    b=$(total "$name" $large)
    awk -v n="$name" -v a="$a" -v b="$b" -v s=$small -v l=$large \
        'BEGIN { printf "%-40s %8.2f instructions/iteration\n", n, (b - a) / (l - s) }'
done
