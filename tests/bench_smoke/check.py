#!/usr/bin/env python3
"""bench/smoke.py has teeth: run against fake benchmark binaries (fake_bench.py), it fails on a
benchmark's error, on a non-zero exit and on a report with no benchmarks; it lets pass an error
from its hardware allowlist (and skips, exit 77, when every benchmark has one); and the README
lists every allowlisted message.

Usage: check.py SMOKE_PY FAKE_BENCH_PY README_MD"""
import importlib.util
import subprocess
import sys

smoke, fake, readme = sys.argv[1:4]

# case: (the exit status smoke.py must give, a line its output must hold)
cases = {
    'clean': (0, 'ok: BM_B: 1000 iterations'),
    'error': (1, 'FAILED: BM_Harvest: take_dirty_runs failed'),
    'allowed': (0, 'allowed (hardware): BM_Touch/prefetch: KVM_PRE_FAULT_MEMORY is not supported'),
    'all_allowed': (77, 'SKIPPED: every benchmark lacks hardware: no /dev/kvm'),
    'allowed_and_error': (1, 'FAILED: BM_B: setup failed'),
    'allowed_prefix': (1, 'FAILED: BM_Touch/prefetch: KVM_PRE_FAULT_MEMORY is not supported'),
    'no_benchmarks': (1, 'ran no benchmarks'),
    'no_report': (1, 'printed no JSON benchmark report'),
    'exit1': (1, 'exited with status 1'),
    'exit77': (77, 'SKIPPED: no usable KVM'),
    'merged': (0, 'ok: BM_A: 1000 iterations'),
}
failures = 0
for case, (want_status, want_line) in cases.items():
    run = subprocess.run([sys.executable, smoke, sys.executable, fake, case,
                          '--benchmark_min_time=0.01'],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    out = run.stdout.decode()
    if run.returncode != want_status or want_line not in out:
        failures += 1
        print(f'FAILED: case {case}: exit status {run.returncode} (want {want_status}), '
              f'output {"has" if want_line in out else "lacks"} {want_line!r}:\n{out}')
    else:
        print(f'ok: case {case}: exit status {run.returncode}')

# The merged stream's other lines are passed through, the report is not.
run = subprocess.run([sys.executable, smoke, sys.executable, fake, 'merged'],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
out = run.stdout.decode()
for want in ('run-in-vm guest: Linux', "{not json: a line of the program's own}",
             'run-in-vm guest kernel: a warning { with braces }'):
    if want not in out:
        failures += 1
        print(f'FAILED: case merged: the line {want!r} was not passed through:\n{out}')
if '"benchmarks"' in out:
    failures += 1
    print(f'FAILED: case merged: the JSON report was printed:\n{out}')

# The README lists every allowlisted message.
spec = importlib.util.spec_from_file_location('smoke', smoke)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with open(readme, encoding='utf-8') as f:
    text = ' '.join(f.read().split())
for message, _ in module.ALLOWED_HARDWARE_ERRORS:
    if f'`{message}`' not in text:
        failures += 1
        print(f'FAILED: README.md does not list the allowed message `{message}`')

print(f'{len(cases)} cases, {failures} failures')
sys.exit(1 if failures else 0)
