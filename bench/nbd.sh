#!/usr/bin/env bash
# vdisk serve vs qemu-nbd, side by side in one run, same image, same clients:
#   - nbdcopy reading a fully allocated 512 MiB image to null:
#   - nbdcopy writing 512 MiB into a fresh image
#   - fio (nbd engine) 4 KiB random reads and writes at queue depth 32, and 4 KiB
#     random writes into a fresh image (allocating), each block once, fsync at the end
# Each test runs REPS interleaved rounds (vdisk, [vdisk-base,] qemu-nbd; the order
# rotates every round) and prints the medians, the vdisk/qemu-nbd ratio (>1 means vdisk
# is faster), and the CPU each server used for the same work (robust when the machine
# is busy; ratio qemu/vdisk, >1 means vdisk used less CPU). VDISK_BASE=/path/to/vdisk
# adds an older vdisk build as a third server, for before/after comparisons.
# CACHE=none serves with O_DIRECT (both servers). Every row also gives each server's
# peak RSS (VmHWM, the largest over the rounds). In the fio rows of an allocated image,
# fio run directly on the raw data file (io_uring engine, QD32, O_DIRECT with
# CACHE=none), the physical limit the servers are measured against, takes its turn in
# the same rotation, and the row gives it and the vdisk/raw ratio. The load average is
# printed before and after.
#
# PIN=1 runs every server on CPU 1 and every client (nbdcopy, fio, fio on the raw file)
# on CPU 0. Why: some virtual machines' schedulers pack runnable tasks onto as few vCPUs
# as they can (this project's CI VM boots with `sched_vcpu_pack`), so an unpinned
# client and server often share one vCPU and run by turns while the other idles; which
# placement a run gets then decides its result more than the server does.
#
# Usage: bench/nbd.sh            (FMT=qcow2 by default; FMT=raw also works)
#        FMT=raw RUNTIME=10 REPS=5 CACHE=none PIN=1 VDISK_BASE=/tmp/old/vdisk bench/nbd.sh
#        ROWS=fio CACHE=none PIN=1 bench/nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."

FMT=${FMT:-qcow2}
SIZE_MB=${SIZE_MB:-512}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-5}
CACHE=${CACHE:-writeback}
PIN=${PIN:-0}
# ROWS=fio: only the fio rows on the allocated image (with the raw file beside them).
ROWS=${ROWS:-all}
SRV_PIN=()
CLI_PIN=()
if [ "$PIN" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "bench/nbd.sh: PIN=1 needs 2 CPUs" >&2; exit 1; }
  command -v taskset >/dev/null || { echo "bench/nbd.sh: PIN=1 needs taskset" >&2; exit 1; }
  SRV_PIN=(taskset -c 1)
  CLI_PIN=(taskset -c 0)
fi

for t in qemu-nbd qemu-img nbdcopy fio python3; do
  command -v "$t" >/dev/null || { echo "bench/nbd.sh: $t is required" >&2; exit 1; }
done

cargo build --release -q -p vdisk-cli 2>/dev/null || cargo build --release -p vdisk-cli
VDISK=$PWD/target/release/vdisk

tmp=$(mktemp -d)
SRV_PID=""
cleanup() {
  [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# Random data: nothing for either side to detect as zeroes or compress.
head -c "$((SIZE_MB << 20))" /dev/urandom >"$tmp/data.raw"
qemu-img convert -O "$FMT" "$tmp/data.raw" "$tmp/src.$FMT"

SOCK=$tmp/nbd.sock
URI="nbd+unix:///?socket=$SOCK"

# start_server KIND FILE [extra args...]
start_server() {
  local kind=$1 file=$2
  shift 2
  rm -f "$tmp/pid" "$SOCK"
  case $kind in
    vdisk) "${SRV_PIN[@]}" "$VDISK" serve -f "$FMT" -k "$SOCK" -t -e 4 --cache="$CACHE" --pid-file "$tmp/pid" "$@" "$file" & ;;
    base) "${SRV_PIN[@]}" "$VDISK_BASE" serve -f "$FMT" -k "$SOCK" -t -e 4 --cache="$CACHE" --pid-file "$tmp/pid" "$@" "$file" & ;;
    qemu)  "${SRV_PIN[@]}" qemu-nbd -f "$FMT" -k "$SOCK" -t -e 4 --cache="$CACHE" --pid-file "$tmp/pid" "$@" "$file" & ;;
  esac
  SRV_PID=$!
  for _ in $(seq 1 500); do
    [ -s "$tmp/pid" ] && [ -S "$SOCK" ] && return 0
    sleep 0.02
  done
  echo "bench/nbd.sh: $kind server did not start" >&2
  exit 1
}

# CPU seconds (user+system) the running server has used so far.
server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$SRV_PID/stat"; }
# Peak resident memory (MiB) of the running server so far.
server_rss() { awk '/^VmHWM:/ {print $2/1024}' "/proc/$SRV_PID/status"; }

stop_server() {
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
}

now() { date +%s.%N; }

# One run of: nbdcopy the source export to null: (MiB/s); the server's CPU seconds.
bench_read() {
  local kind=$1 t0 t1 cpu
  start_server "$kind" "$tmp/src.$FMT" -r
  t0=$(now); "${CLI_PIN[@]}" nbdcopy "$URI" null:; t1=$(now)
  cpu=$(server_cpu) rss=$(server_rss)
  stop_server
  python3 -c "print($SIZE_MB/($t1-$t0), $cpu, $rss)"
}

# One run of: nbdcopy the data into a fresh image (MiB/s), flush included; server CPU s.
bench_write() {
  local kind=$1 t0 t1 cpu
  rm -f "$tmp/dst.$FMT"
  qemu-img create -q -f "$FMT" "$tmp/dst.$FMT" "${SIZE_MB}M"
  start_server "$kind" "$tmp/dst.$FMT"
  t0=$(now); "${CLI_PIN[@]}" nbdcopy --flush "$tmp/data.raw" "$URI"; t1=$(now)
  cpu=$(server_cpu) rss=$(server_rss)
  stop_server
  qemu-img compare -q -f raw -F "$FMT" "$tmp/data.raw" "$tmp/dst.$FMT" ||
    { echo "bench/nbd.sh: $kind wrote something else" >&2; exit 1; }
  python3 -c "print($SIZE_MB/($t1-$t0), $cpu, $rss)"
}

# fio 4 KiB random I/O at QD 32 on a private copy of the source (IOPS); kind raw: fio
# on the raw data file instead.
bench_fio() {
  local kind=$1 rw=$2
  [ "$kind" = raw ] && { bench_rawfio "$rw"; return; }
  cp "$tmp/src.$FMT" "$tmp/fio.$FMT"
  start_server "$kind" "$tmp/fio.$FMT"
  "${CLI_PIN[@]}" fio --name=nbd --ioengine=nbd --uri="$URI" --rw="$rw" --bs=4k --iodepth=32 \
      --size="${SIZE_MB}m" --time_based --runtime="$RUNTIME" \
      --output-format=json >"$tmp/fio.json"
  local cpu rss
  cpu=$(server_cpu) rss=$(server_rss)
  stop_server
  [ "$rw" = randwrite ] && { qemu-img check -q "$tmp/fio.$FMT" >/dev/null 2>&1 || [ "$FMT" = raw ] ||
    { echo "bench/nbd.sh: $kind left an image that fails qemu-img check" >&2; exit 1; }; }
  python3 - "$tmp/fio.json" "$rw" "$cpu" "$rss" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
# fio's nbd engine prints a line before the JSON document.
j = json.loads(text[text.index("{"):])["jobs"][0]
side = "read" if "read" in sys.argv[2] else "write"
ops = max(j[side]["total_ios"], 1)
# IOPS, the server's CPU microseconds per operation, its peak RSS.
print(j[side]["iops"], float(sys.argv[3]) * 1e6 / ops, sys.argv[4])
PY
}

# fio 4 KiB random writes at QD 32 into a fresh, empty image: every block written once
# in random order (no time limit), then an fsync, so the first write into each cluster
# allocates it (IOPS over the whole run, flush included).
bench_fio_alloc() {
  local kind=$1
  rm -f "$tmp/alloc.$FMT"
  qemu-img create -q -f "$FMT" "$tmp/alloc.$FMT" "${SIZE_MB}M"
  start_server "$kind" "$tmp/alloc.$FMT"
  local t0 t1
  t0=$(now)
  "${CLI_PIN[@]}" fio --name=nbd --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 \
      --size="${SIZE_MB}m" --end_fsync=1 --output-format=json >"$tmp/fio.json"
  t1=$(now)
  local cpu rss
  cpu=$(server_cpu) rss=$(server_rss)
  stop_server
  qemu-img check -q "$tmp/alloc.$FMT" >/dev/null 2>&1 || [ "$FMT" = raw ] ||
    { echo "bench/nbd.sh: $kind left an image that fails qemu-img check" >&2; exit 1; }
  python3 - "$tmp/fio.json" "$cpu" "$rss" "$((SIZE_MB << 8))" "$t0" "$t1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
ops = j["write"]["total_ios"]
if ops != int(sys.argv[4]):
    sys.exit(f"bench/nbd.sh: fio wrote {ops} blocks, not {sys.argv[4]}")
# Over fio's whole run, connection and final fsync included (wall clock).
print(ops / (float(sys.argv[6]) - float(sys.argv[5])), float(sys.argv[2]) * 1e6 / ops, sys.argv[3])
PY
}

# fio straight on the raw data file, the same pattern and depth (IOPS; fio's own CPU
# microseconds per operation; no RSS: there is no server).
bench_rawfio() {
  local rw=$1 direct=0
  [ "$CACHE" = none ] && direct=1
  cp "$tmp/data.raw" "$tmp/fio.raw"
  "${CLI_PIN[@]}" fio --name=raw --ioengine=io_uring --filename="$tmp/fio.raw" --direct=$direct --rw="$rw" \
      --bs=4k --iodepth=32 --size="${SIZE_MB}m" --time_based --runtime="$RUNTIME" \
      --output-format=json >"$tmp/fio.json"
  python3 - "$tmp/fio.json" "$rw" <<'PY'
import json, sys
j = json.loads(open(sys.argv[1]).read())["jobs"][0]
side = "read" if "read" in sys.argv[2] else "write"
cpu_us = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] * 1e3 / max(j[side]["total_ios"], 1)
print(j[side]["iops"], cpu_us, 0)
PY
}

ratio() { python3 -c "print(f'{$1/$2:.2f}' if $2 > 0 else 'n/a')"; }

KINDS=(vdisk)
[ -n "${VDISK_BASE:-}" ] && KINDS+=(base)
KINDS+=(qemu)

# measure NAME FUNC [ARGS...]: FUNC KIND ARGS... is one run; REPS rounds over every server kind
# (and fio on the raw file when WITH_RAW=1), order rotated per round; prints one row of
# medians.
measure() {
  local name=$1 fn=$2
  shift 2
  declare -A vals=()
  local kinds=("${KINDS[@]}")
  [ "${WITH_RAW:-0}" = 1 ] && kinds+=(raw)
  local r i k n=${#kinds[@]}
  for ((r = 0; r < REPS; r++)); do
    for ((i = 0; i < n; i++)); do
      k=${kinds[$(((r + i) % n))]}
      vals[$k]+="$("$fn" "$k" "$@");"
    done
  done
  python3 - "$name" "${vals[vdisk]}" "${vals[base]:-}" "${vals[qemu]}" "${vals[raw]:-}" <<'PY'
import statistics, sys
name, v, b, q, w = sys.argv[1:6]
def med(s):
    pts = [tuple(map(float, x.split())) for x in s.split(";") if x.strip()]
    if not pts:
        return None
    return (statistics.median(p[0] for p in pts), statistics.median(p[1] for p in pts),
            max(p[2] for p in pts))
v, b, q, w = med(v), med(b), med(q), med(w)
def r(a, c):
    return f"{a / c:.2f}" if c else "n/a"
line = f"{name:<42} {v[0]:10.1f} {q[0]:10.1f} {r(v[0], q[0]):>6} | {v[1]:9.2f} {q[1]:9.2f} {r(q[1], v[1]):>6} | rss {v[2]:6.1f} {q[2]:6.1f}"
if b:
    line += f" | base {b[0]:10.1f} {r(v[0], b[0]):>6} cpu {b[1]:9.2f} {r(b[1], v[1]):>6}"
if w:
    line += f" | raw {w[0]:10.1f} vdisk/raw {r(v[0], w[0])} (fio cpu us/op {w[1]:.2f})"
print(line)
PY
}

echo "format=$FMT cache=$CACHE pin=$PIN size=${SIZE_MB}MiB fio_runtime=${RUNTIME}s rounds=$REPS (medians) cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
hdr=$(printf '%-42s %10s %10s %6s | %9s %9s %6s | %s' test vdisk qemu-nbd ratio "vdisk-cpu" "qemu-cpu" ratio "peak RSS MiB vdisk qemu")
[ -n "${VDISK_BASE:-}" ] && hdr+=" | base value, vdisk/base ratio; base cpu, base/vdisk ratio"
echo "$hdr"
if [ "$ROWS" = all ]; then
  measure "nbdcopy read -> null: (MiB/s; cpu s/run)" bench_read
  measure "nbdcopy write fresh (MiB/s; cpu s/run)" bench_write
fi
WITH_RAW=1 measure "fio 4k randread QD32 (IOPS; cpu us/op)" bench_fio randread
WITH_RAW=1 measure "fio 4k randwrite QD32 (IOPS; cpu us/op)" bench_fio randwrite
[ "$ROWS" = all ] && measure "fio 4k randwrite QD32, allocating" bench_fio_alloc
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
