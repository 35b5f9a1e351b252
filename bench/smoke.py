#!/usr/bin/env python3
"""A benchmark's smoke run that fails when a benchmark fails.

Usage: smoke.py PROGRAM [ARGS...]

Runs PROGRAM ARGS... --benchmark_format=json (PROGRAM is a Google Benchmark binary, or a runner
such as tests/kvm/run-in-vm.sh followed by one) and reads the JSON report from its stdout. Google
Benchmark exits 0 even when a benchmark called state.SkipWithError(...), so its exit status alone
would let a broken benchmark pass. The report is read from stdout, not from a --benchmark_out
file, because under run-in-vm.sh the program runs inside a VM whose files are lost; there its
stderr comes back merged into stdout, so the report is found among other lines, which are passed
through.

Exit status:
  0   the program exited 0, its report lists at least one benchmark, and none reported an error
      other than an allowed one (ALLOWED_HARDWARE_ERRORS) for hardware this machine lacks
  77  (skipped) every benchmark reported an allowed hardware error, or the program itself exited
      77 (run-in-vm.sh's "nowhere to run": no /dev/kvm and no VM)
  1   anything else: the program exited non-zero, printed no report, a report with no
      benchmarks, or a benchmark reported an error that is not allowed
"""
import json
import subprocess
import sys

# The errors a benchmark may report and still let its smoke run pass: each says that this machine
# lacks a piece of hardware or a kernel feature, never that the code is wrong. Each entry is the
# exact error_message its benchmark prints (compared whole: nothing before or after it); the
# second item is the short reason printed when every benchmark of a binary skips.
ALLOWED_HARDWARE_ERRORS = [
    # bench/kvm.cpp, BM_KvmGuestTouch/prefetch: the kernel has no KVM_PRE_FAULT_MEMORY (Linux
    # 6.10; the emulated VM's Debian 12 kernel is 6.1).
    ('KVM_PRE_FAULT_MEMORY is not supported on this host', 'no KVM_PRE_FAULT_MEMORY'),
    # bench/kvm.cpp, BM_KvmMapRegion/raw: the kernel has no KVM_SET_USER_MEMORY_REGION2
    # (KVM_CAP_USER_MEMORY2, Linux 6.8), the only ioctl that baseline calls.
    ('KVM_SET_USER_MEMORY_REGION2 is not supported on this host (no KVM_CAP_USER_MEMORY2)',
     'no KVM_SET_USER_MEMORY_REGION2'),
    # bench/kvm.cpp, every benchmark: there is no /dev/kvm at all (bench_kvm run by hand on a
    # host without KVM; meson's smoke run goes through run-in-vm.sh, which finds one). A
    # /dev/kvm that exists but cannot be opened is not allowed: that is a setup to fix.
    ('KVM is not usable here: /dev/kvm: No such file or directory', 'no /dev/kvm'),
]


def allowed_reason(message):
    """The short reason of the allowlist entry that is exactly message, or None."""
    for allowed, reason in ALLOWED_HARDWARE_ERRORS:
        if message == allowed:
            return reason
    return None


def find_report(text):
    """The JSON report in text, and the text around it (as a list of lines).

    The report starts with a line that is exactly "{" and is one JSON object with a "benchmarks"
    key; everything before and after it is other output (run-in-vm.sh's lines, the program's own
    stderr when it comes merged)."""
    decoder = json.JSONDecoder()
    start = 0
    while True:
        start = text.find('{\n', start)
        if start < 0:
            return None, text
        if start == 0 or text[start - 1] == '\n':
            try:
                report, end = decoder.raw_decode(text, start)
            except ValueError:
                report = None
            if isinstance(report, dict) and 'benchmarks' in report:
                return report, text[:start] + text[end:]
        start += 1


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    command = argv[1:] + ['--benchmark_format=json']
    name = ' '.join(argv[1:])
    try:
        run = subprocess.run(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             check=False)
    except OSError as e:
        print(f'FAILED: cannot run {argv[1]}: {e.strerror}')
        return 1
    stdout = run.stdout.decode('utf-8', errors='replace')
    report, other = find_report(stdout)
    if other.strip():
        print(other.rstrip('\n'))
    sys.stdout.flush()

    if run.returncode == 77:
        # The runner's own skip (run-in-vm.sh: nowhere to run the program); it said why.
        return 77
    if run.returncode != 0:
        print(f'FAILED: {name} exited with status {run.returncode}')
        return 1
    if report is None:
        print(f'FAILED: {name} printed no JSON benchmark report')
        return 1
    benchmarks = report['benchmarks']
    if not benchmarks:
        print(f'FAILED: {name} ran no benchmarks (its report lists none)')
        return 1

    failed = allowed = 0
    reasons = []
    for b in benchmarks:
        bench_name = b.get('name', '?')
        if b.get('error_occurred'):
            message = b.get('error_message', '')
            reason = allowed_reason(message)
            if reason is not None:
                print(f'allowed (hardware): {bench_name}: {message}')
                allowed += 1
                if reason not in reasons:
                    reasons.append(reason)
            else:
                print(f'FAILED: {bench_name}: {message}')
                failed += 1
        else:
            unit = b.get('time_unit', '')
            print(f"ok: {bench_name}: {b.get('iterations', '?')} iterations, "
                  f"{b.get('real_time', 0):.4g} {unit} real")
    print(f'{len(benchmarks)} benchmarks: {len(benchmarks) - failed - allowed} ran, '
          f'{allowed} allowed hardware errors, {failed} errors')
    if failed:
        return 1
    if allowed == len(benchmarks):
        print(f"SKIPPED: every benchmark lacks hardware: {', '.join(reasons)}")
        return 77
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
