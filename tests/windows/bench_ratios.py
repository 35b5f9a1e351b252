#!/usr/bin/env python3
"""Reads Google Benchmark JSON (with repetitions) from bench_windows_va and prints, per size, the
median time of each placeholder-policy benchmark and its ratio to the raw MapViewOfFile3 +
UnmapViewOfFile2 pair of the same run. Under Wine only the ratios mean anything."""
import json
import sys

medians = {}
with open(sys.argv[1]) as f:
    for b in json.load(f)['benchmarks']:
        if b.get('aggregate_name') == 'median':
            # run_name carries the options too: BM_RawMapUnmap/2/min_time:0.200/real_time
            name = '/'.join(b['run_name'].split('/')[:2])
            medians[name] = b['real_time'], b['time_unit']
for size in ('2', '1024'):
    raw = medians.get(f'BM_RawMapUnmap/{size}')
    if raw is None:
        sys.exit(f'no median for BM_RawMapUnmap/{size}')
    label = '2 MiB' if size == '2' else '1 GiB'
    print(f'{label}: raw MapViewOfFile3+UnmapViewOfFile2 median {raw[0]:.1f} {raw[1]}')
    for name in ('BM_PlaceholderMapUnmap', 'BM_PlaceholderMapUnmapInGap'):
        t = medians[f'{name}/{size}']
        print(f'  {name}/{size}: median {t[0]:.1f} {t[1]}, {t[0] / raw[0]:.2f}x raw')
