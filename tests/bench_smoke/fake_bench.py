#!/usr/bin/env python3
"""A stand-in for a Google Benchmark binary, for tests/bench_smoke/check.py.

Usage: fake_bench.py CASE [ARGS...]: prints what a benchmark binary would print on stdout with
--benchmark_format=json (which ARGS must end with: bench/smoke.py adds it) in the situation CASE
names, and exits as that binary would."""
import json
import sys

case = sys.argv[1]
if sys.argv[-1] != '--benchmark_format=json':
    sys.exit(f'fake_bench.py: the last argument is {sys.argv[-1]!r}, not --benchmark_format=json')


def run(name, error=None):
    entry = {'name': name, 'run_name': name, 'run_type': 'iteration', 'iterations': 0 if error else 1000,
             'real_time': 0.0 if error else 12.5, 'cpu_time': 0.0 if error else 12.0, 'time_unit': 'ns'}
    if error is not None:
        entry['error_occurred'] = True
        entry['error_message'] = error
    return entry


NO_KVM = 'KVM is not usable here: /dev/kvm: No such file or directory'
NO_PREFAULT = 'KVM_PRE_FAULT_MEMORY is not supported on this host'
benchmarks = {
    'clean': [run('BM_A'), run('BM_B')],
    'error': [run('BM_A'), run('BM_Harvest', 'take_dirty_runs failed')],
    'allowed': [run('BM_A'), run('BM_Touch/prefetch', NO_PREFAULT)],
    'all_allowed': [run('BM_Map', NO_KVM), run('BM_Touch/prefetch', NO_KVM)],
    'allowed_and_error': [run('BM_Touch/prefetch', NO_PREFAULT), run('BM_B', 'setup failed')],
    # An allowed message with more after it is not the allowed message.
    'allowed_prefix': [run('BM_A'), run('BM_Touch/prefetch', NO_PREFAULT + ' (and the guest crashed)')],
    'no_benchmarks': [],
    'exit1': [run('BM_A')],
    'exit77': [],
    'merged': [run('BM_A')],
    'no_report': [],
}[case]
report = {'context': {'date': '2026-12-02T06:00:00+00:00', 'host_name': 'fake', 'num_cpus': 2,
                      'caches': [], 'library_build_type': 'release'},
          'benchmarks': benchmarks}
if case == 'exit77':
    print('run-in-vm: SKIPPED: no usable KVM on this host, and no VM')
    sys.exit(77)
if case == 'no_report':
    print('BM_A   12.5 ns   12.0 ns   1000')  # the console format, not JSON
    sys.exit(0)
if case == 'merged':
    # As run-in-vm.sh returns it: the guest's lines, the program's stderr, then the report, then
    # the kernel's warnings, all on one stream.
    print('run-in-vm guest: Linux 6.1.0-57-cloud-amd64, /dev/kvm from kvm_amd (nested paging)')
    print('{not json: a line of the program\'s own}')
print(json.dumps(report, indent=2))
if case == 'merged':
    print('run-in-vm guest kernel: a warning { with braces }')
sys.exit(1 if case == 'exit1' else 0)
