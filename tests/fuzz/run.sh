#!/usr/bin/env bash
# Runs the libFuzzer harness for a bounded time: $1 = the fuzzer, $2 = the corpus in the tree
# (read only), $3 = a work directory in the build tree (new inputs land there). Seconds from
# MEMBACKING_FUZZ_SECONDS (default 60). A crash or a divergence exits non-zero.
set -euo pipefail
fuzzer=$1 corpus=$2 work=$3
mkdir -p "$work"
exec "$fuzzer" -max_total_time="${MEMBACKING_FUZZ_SECONDS:-60}" -timeout=20 -rss_limit_mb=4096 \
    -print_final_stats=1 "$work" "$corpus"
