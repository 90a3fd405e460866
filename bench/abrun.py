#!/usr/bin/env python3
"""Interleaved A/B/C benchmark runner shared by the bench scripts.

Reads a JSON list of cases on stdin. Each case:
  {"name": str, "prepare": shell (optional, run before every timed run),
   "check": shell (optional, run after the first run of each tool; must succeed),
   "cmds": [[label, shell], ...]}

Every round runs each command once, in an order rotated from round to round (so no
tool always runs first, right after the prepare step, or last), for RUNS rounds (env,
default 5). Wall time is measured around the process; CPU (user + system) and peak RSS
come from the kernel's rusage of the finished child (os.wait4), so they cover exactly
that command. Prints a markdown table of medians (peak RSS: the largest seen) and, for
every label other than the first, the ratio label-time / first-label-time: above 1
means the first label (the tool under test) is faster. The last column is the 1-minute
load average when the case started and when it ended: wall-clock ratios taken on a
loaded machine are not to be trusted, CPU time much less so.

Output goes to stdout; progress to stderr.
"""
import json
import os
import statistics
import subprocess
import sys
import time

RUNS = int(os.environ.get("RUNS", "5"))
# ABRUN_MIN=1: a second table with each command's fastest run (wall and CPU), for a
# machine whose noise only ever adds time (page faults the host serves after the
# guest's free pages were reported back to it, say).
SHOW_MIN = os.environ.get("ABRUN_MIN") == "1"


RSS_FILE = f"/tmp/abrun-rss.{os.getpid()}"


def run_shell(cmd):
    """Runs `cmd` under sh; returns (wall s, cpu s, peak RSS MiB, exit status, stderr).

    CPU comes from wait4's rusage (exact, and GNU time's own share is negligible); the
    peak RSS from GNU time's report on its child, because a child forked from this
    Python process inherits the parent's high-water mark across exec."""
    t0 = time.monotonic()
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", RSS_FILE, "sh", "-c",
                          "exec " + cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    try:
        with open(RSS_FILE) as f:
            rss_kib = float(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        rss_kib = float("nan")
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    return wall, ru.ru_utime + ru.ru_stime, rss_kib / 1024.0, p.returncode, err


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def sh(cmd):
    if cmd:
        subprocess.run(["sh", "-c", cmd], check=True, stdout=subprocess.DEVNULL)


def main():
    cases = json.load(sys.stdin)
    labels = []
    for c in cases:
        for label, _ in c["cmds"]:
            if label not in labels:
                labels.append(label)
    head = ["Case"]
    for l in labels:
        head += [f"{l} wall s", f"{l} CPU s", f"{l} RSS MiB"]
    for l in labels[1:]:
        head += [f"{labels[0]} vs {l} wall", f"{labels[0]} vs {l} CPU"]
    head += ["load"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    mins = []
    for c in cases:
        name = c["name"]
        cmds = c["cmds"]
        res = {l: {"wall": [], "cpu": [], "rss": []} for l, _ in cmds}
        failed = {}
        checked = set()
        load0 = loadavg()
        for r in range(RUNS):
            k = r % len(cmds)
            for label, cmd in cmds[k:] + cmds[:k]:
                if label in failed:
                    continue
                sh(c.get("prepare", ""))
                sh("sync")
                wall, cpu, rss, rc, err = run_shell(cmd)
                if rc != 0:
                    failed[label] = err.strip().splitlines()[:2]
                    continue
                if c.get("check") and label not in checked:
                    try:
                        sh(c["check"])
                    except subprocess.CalledProcessError:
                        failed[label] = ["result check failed"]
                        continue
                    checked.add(label)
                res[label]["wall"].append(wall)
                res[label]["cpu"].append(cpu)
                res[label]["rss"].append(rss)
            print(f"  {name}: round {r + 1}/{RUNS}", file=sys.stderr)
        row = [name]
        med = {}
        for l in labels:
            if l in failed or l not in res or not res[l]["wall"]:
                why = "; ".join(failed.get(l, ["n/a"]))
                row += [f"failed: {why}" if l in failed else "", "", ""]
                continue
            w = statistics.median(res[l]["wall"])
            cp = statistics.median(res[l]["cpu"])
            med[l] = (w, cp)
            row += [f"{w:.3f}", f"{cp:.3f}", f"{max(res[l]['rss']):.1f}"]
        base = med.get(labels[0])
        for l in labels[1:]:
            if base and l in med:
                row += [f"{med[l][0] / base[0]:.2f}", f"{med[l][1] / max(base[1], 1e-9):.2f}"]
            else:
                row += ["", ""]
        row += [f"{load0}→{loadavg()}"]
        print("| " + " | ".join(row) + " |", flush=True)
        mins.append((name, {l: (min(res[l]["wall"]), min(res[l]["cpu"]))
                            for l in med}))
    if SHOW_MIN:
        print()
        head = ["Case (fastest run)"]
        for l in labels:
            head += [f"{l} wall s", f"{l} CPU s"]
        for l in labels[1:]:
            head += [f"{labels[0]} vs {l} wall", f"{labels[0]} vs {l} CPU"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name, m in mins:
            row = [name]
            for l in labels:
                row += [f"{m[l][0]:.3f}", f"{m[l][1]:.3f}"] if l in m else ["", ""]
            for l in labels[1:]:
                if labels[0] in m and l in m:
                    row += [f"{m[l][0] / m[labels[0]][0]:.2f}",
                            f"{m[l][1] / max(m[labels[0]][1], 1e-9):.2f}"]
                else:
                    row += ["", ""]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
