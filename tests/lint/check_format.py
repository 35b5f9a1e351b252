#!/usr/bin/env python3
"""Fails if any C++ source of the project is not formatted per .clang-format (clang-format 14)."""
import pathlib
import subprocess
import sys

clang_format, root = sys.argv[1], pathlib.Path(sys.argv[2])
version = subprocess.run([clang_format, '--version'], capture_output=True, text=True).stdout
if 'version 14.' not in version:
    sys.exit(f'.clang-format is pinned to clang-format 14, found: {version.strip()}')
files = [p for d in ('include', 'tests', 'bench', 'examples') for p in sorted((root / d).rglob('*'))
         if p.suffix in ('.hpp', '.cpp')]
result = subprocess.run([clang_format, '--dry-run', '--Werror', *map(str, files)])
print(f'{len(files)} files checked')
sys.exit(result.returncode)
