#!/usr/bin/env python3
"""Compile-failure test: compiles one case with the exact command line the build uses for the
library's own code (taken from compile_commands.json: the compiler, flags and include paths of
this configuration, warnings as errors), and checks the compiler's verdict.

A case says what it expects in comments:
    // expect: success                      it must compile (a control for the harness)
    // expect: <text>                       it must fail, and the output must contain <text>
Several `expect:` lines must all hold.

    check.py <build root> <case.cpp>
"""
import json
import pathlib
import shlex
import subprocess
import sys

build_root, case = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).resolve()
reference = 'tests/lint/tidy_probe.cpp' # a library-only TU that every configuration builds

entries = json.loads((build_root / 'compile_commands.json').read_text())
entry = next(e for e in entries if e['file'].endswith(reference))
args = entry.get('arguments') or shlex.split(entry['command'])
cmd, skip = [], False
for a in args:
    if skip:
        skip = False
        continue
    if a in ('-o', '-MQ', '-MF'):
        skip = True
        continue
    if a in ('-c', '-MD') or a.endswith(reference):
        continue
    cmd.append(a)
cmd += ['-fsyntax-only', str(case)]

expects = [line.split('expect:', 1)[1].strip() for line in case.read_text().splitlines()
           if line.strip().startswith('// expect:')]
if not expects:
    sys.exit(f'{case.name}: no "// expect:" line')
run = subprocess.run(cmd, cwd=entry['directory'], capture_output=True, text=True)
output = run.stdout + run.stderr
print(' '.join(shlex.quote(c) for c in cmd))
if expects == ['success']:
    if run.returncode != 0:
        print(output)
        sys.exit(f'{case.name}: expected to compile, but it failed')
    print(f'{case.name}: compiles, as expected')
    sys.exit(0)
if run.returncode == 0:
    sys.exit(f'{case.name}: expected a compile error, but it compiled')
missing = [e for e in expects if e not in output]
if missing:
    print(output)
    sys.exit(f'{case.name}: the compiler output does not say: {missing}')
print(f'{case.name}: fails to compile, and the compiler says: {expects}')
