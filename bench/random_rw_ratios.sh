#!/usr/bin/env bash
# BM_RandomRW ratios that survive a noisy machine: N runs (default 5) of the RandomRW set, each
# with interleaved repetitions; per run the guest's median against raw, raw_layout and the gapped
# plain buffer; then the median of each ratio over the runs.
#   bench/random_rw_ratios.sh build/bench/bench_guest_access 5
set -euo pipefail
bench=$1 runs=${2:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in $(seq 1 "$runs"); do
    "$bench" --benchmark_filter=RandomRW --benchmark_repetitions=10 --benchmark_min_time=0.1 \
        --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true \
        --benchmark_format=json 2>/dev/null >"$work/run_$i.json"
done
python3 - "$work" "$runs" <<'PY'
import json, statistics, sys
work, runs = sys.argv[1], int(sys.argv[2])
rows = []
for i in range(1, runs + 1):
    with open(f"{work}/run_{i}.json") as f:
        data = json.load(f)
    m = {b["run_name"].removeprefix("BM_RandomRW/"): b["real_time"]
         for b in data["benchmarks"] if b.get("aggregate_name") == "median"}
    rows.append(m)
    print(f"run {i}: raw {m['raw']:.2f} ns | " + " | ".join(
        f"{k}: {m[k]:.2f} ns ({m[k] / m['raw']:.2f}x raw, {m[k] / m['raw_layout/' + k]:.2f}x raw_layout,"
        f" gapped {m['raw_gapped/' + k] / m['raw']:.2f}x raw)" for k in ("1", "64", "1024")))
for k in ("1", "64", "1024"):
    med = lambda f: statistics.median(f(r) for r in rows)
    print(f"{k} regions, median over runs: guest/raw {med(lambda r: r[k] / r['raw']):.2f}x, "
          f"guest/raw_layout {med(lambda r: r[k] / r['raw_layout/' + k]):.2f}x, "
          f"raw_gapped/raw {med(lambda r: r['raw_gapped/' + k] / r['raw']):.2f}x")
PY
