#!/usr/bin/env python3
"""Reads a meson testlog.json and prints "<passed> <failed> <skipped>".

With --skipped, prints instead one line per skipped test: its name and why it skipped (the last
line of its output with "SKIPPED:", the way this project's tests that can skip say why)."""
import json
import sys

list_skipped = sys.argv[1] == '--skipped'
log_path = sys.argv[-1]

passed = failed = skipped = 0
with open(log_path) as log:
    for line in log:
        entry = json.loads(line)
        result = entry['result']
        if result in ('OK', 'EXPECTEDFAIL'):
            passed += 1
        elif result == 'SKIP':
            skipped += 1
            if list_skipped:
                output = (entry.get('stdout') or '') + '\n' + (entry.get('stderr') or '')
                reasons = [l.strip() for l in output.splitlines() if 'SKIPPED:' in l]
                print(f"{entry['name']}: {reasons[-1] if reasons else 'no reason given'}")
        else:  # FAIL, TIMEOUT, ERROR, UNEXPECTEDPASS
            failed += 1
if not list_skipped:
    print(passed, failed, skipped)
