#!/usr/bin/env python3
"""Summarise criterion's console output: one line per benchmark, median throughput."""
import re
import sys

name = None
for line in sys.stdin:
    m = re.match(r"^(\S+/\S+)", line)
    if m and not line.startswith(" "):
        name = m.group(1)
    t = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if t and name:
        value, unit = float(t.group(1)), t.group(2)
        scale = {"Gelem/s": 1e3, "Melem/s": 1.0, "Kelem/s": 1e-3, "elem/s": 1e-6}[unit]
        print(f"{name:70s} {value * scale:8.2f} M/s")
        name = None
