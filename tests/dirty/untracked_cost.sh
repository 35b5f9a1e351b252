#!/bin/bash
# The untracked access path costs what the access costs written out by hand, instruction for
# instruction: runs tests/dirty/untracked_cost.cpp under callgrind with two iteration counts and
# compares the untracked write_plain<uint64_t> and read_plain<uint64_t> loops' instructions per
# iteration with their hand-written baselines from the same program (equal), and each tracked
# loop with its untracked one (more: the check sees a mark). The bulk loops (64-byte write and
# fill) are printed beside their hand-written baselines, which are not the same code: the
# library's bulk path costs 2-4 instructions more than the hand-written one, as it did before
# dirty tracking existed (README, "Dirty tracking"). No figure is hard-coded: both sides of every
# comparison are measured in the same build.
# Usage: untracked_cost.sh <untracked_cost program>
set -euo pipefail
prog=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n1=1000
n2=3000
for n in $n1 $n2; do
    valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$n" "$prog" $n >"$tmp/out.$n" 2>"$tmp/log.$n" || {
        cat "$tmp/log.$n" "$tmp/out.$n"
        exit 1
    }
    callgrind_annotate --inclusive=yes --threshold=100 "$tmp/cg.$n" >"$tmp/an.$n"
done

# Instructions of one call of function $1 with $2 iterations (inclusive).
count() {
    awk -v fn="$1" '
        { line = $0; gsub(/,/, "", line) }
        line ~ ("[:]" fn "( |$|\\[)") { split(line, f, " "); print f[1]; exit }
    ' "$tmp/an.$2"
}
per_iteration() {
    local a b
    a=$(count "$1" $n1)
    b=$(count "$1" $n2)
    if [ -z "$a" ] || [ -z "$b" ]; then
        echo "no callgrind count for $1" >&2
        exit 1
    fi
    # Exact: the loop body is the same each iteration.
    echo $(((b - a) / (n2 - n1)))
}

status=0
for op in write_u64 read_u64 write_64 fill_64; do
    base=$(per_iteration "baseline_$op")
    untracked=$(per_iteration "untracked_$op")
    echo "$op: baseline $base, untracked $untracked instructions per iteration"
    if [ "$op" != write_64 ] && [ "$op" != fill_64 ] && [ "$untracked" -ne "$base" ]; then
        echo "FAIL: the untracked $op costs $untracked instructions, the baseline $base"
        status=1
    fi
done
for op in write_u64 write_64; do
    untracked=$(per_iteration "untracked_$op")
    tracked=$(per_iteration "tracked_$op")
    echo "$op: tracked $tracked instructions per iteration (untracked $untracked)"
    if [ "$tracked" -le "$untracked" ]; then
        echo "FAIL: the tracked $op is not dearer than the untracked one: the check cannot see a mark"
        status=1
    fi
done
exit $status
