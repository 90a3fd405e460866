#!/usr/bin/env python3
"""Counts write system calls, bytes written and flushes in an `strace -f -o` log.

Usage: strace_writes.py LOG REQUESTS LABEL...  -> one markdown table row:
| LABEL... | write calls/request | flushes (whole run) | bytes written/request |

strace -f lines are "PID name(args) = ret", or, when threads interleave,
"PID name(args <unfinished ...>" followed later by "PID <... name resumed>...) = ret";
each call is counted once, at the line that carries its result.
"""
import re
import sys

calls = flushes = nbytes = 0
for line in open(sys.argv[1]):
    m = re.match(r"\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()", line)
    if not m or "<unfinished" in line:
        continue
    name = m.group(1) or m.group(2)
    r = re.search(r"= (-?\d+)", line)
    ret = int(r.group(1)) if r else 0
    if name in ("fdatasync", "fsync"):
        flushes += 1
    elif name in ("pwrite64", "pwritev", "pwritev2"):
        calls += 1
        nbytes += max(ret, 0)
n = int(sys.argv[2])
labels = " | ".join(sys.argv[3:])
print(f"| {labels} | {calls / n:.2f} | {flushes} | {nbytes / n:.0f} |")
