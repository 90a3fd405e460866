#!/usr/bin/env bash
# 4 KiB random writes (fio, nbd engine, QD 32) through vdisk serve and qemu-nbd on a
# qcow2 image without bitmaps and with two enabled persistent bitmaps (64 KiB and
# 4 KiB granularity), in interleaved rounds (the order rotates every round); prints
# the medians of IOPS and of the server's CPU microseconds per write.
# VDISK_BASE=/path/to/vdisk adds an older build (no bitmaps) as a baseline; SKIP_FIO=1
# runs only the second part (bench -w, CPU per process).
#
# Usage: bench/bitmaps.sh        SIZE_MB=512 RUNTIME=10 REPS=5 by default
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-512}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-5}

for t in qemu-nbd qemu-img fio python3; do
  command -v "$t" >/dev/null || { echo "bench/bitmaps.sh: $t is required" >&2; exit 1; }
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

# A fully allocated image (random data), with and without bitmaps.
head -c "$((SIZE_MB << 20))" /dev/urandom >"$tmp/data.raw"
qemu-img convert -O qcow2 "$tmp/data.raw" "$tmp/none.qcow2"
rm -f "$tmp/data.raw"
cp "$tmp/none.qcow2" "$tmp/bm.qcow2"
qemu-img bitmap --add -g 64k "$tmp/bm.qcow2" b64k
qemu-img bitmap --add -g 4k "$tmp/bm.qcow2" b4k

SOCK=$tmp/nbd.sock
URI="nbd+unix:///?socket=$SOCK"

start_server() {
  local prog=$1 file=$2
  rm -f "$tmp/pid" "$SOCK"
  case $prog in
    vdisk) "$VDISK" serve -f qcow2 -k "$SOCK" -t -e 4 --pid-file "$tmp/pid" "$file" & ;;
    base) "$VDISK_BASE" serve -f qcow2 -k "$SOCK" -t -e 4 --pid-file "$tmp/pid" "$file" & ;;
    qemu) qemu-nbd -f qcow2 -k "$SOCK" -t -e 4 --cache=writeback --pid-file "$tmp/pid" "$file" & ;;
  esac
  SRV_PID=$!
  for _ in $(seq 1 500); do
    [ -s "$tmp/pid" ] && [ -S "$SOCK" ] && return 0
    sleep 0.02
  done
  echo "bench/bitmaps.sh: $prog did not start" >&2
  exit 1
}
server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$SRV_PID/stat"; }
stop_server() {
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
}

# One run: KIND is PROG-IMAGE (vdisk-none, vdisk-bm, qemu-none, qemu-bm, base-none).
run_one() {
  local prog=${1%-*} img=${1#*-}
  cp "$tmp/$img.qcow2" "$tmp/fio.qcow2"
  start_server "$prog" "$tmp/fio.qcow2"
  fio --name=nbd --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 \
      --size="${SIZE_MB}m" --time_based --runtime="$RUNTIME" \
      --output-format=json >"$tmp/fio.json"
  local cpu
  cpu=$(server_cpu)
  stop_server
  # The bitmaps must still be consistent after the run.
  if [ "$img" = bm ] && qemu-img info "$tmp/fio.qcow2" | grep -q in-use; then
    echo "bench/bitmaps.sh: $1 left a bitmap in use" >&2
    exit 1
  fi
  python3 - "$tmp/fio.json" "$cpu" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
print(j["iops"], float(sys.argv[2]) * 1e6 / max(j["total_ios"], 1))
PY
}

if [ -z "${SKIP_FIO:-}" ]; then
KINDS=(vdisk-none vdisk-bm qemu-none qemu-bm)
[ -n "${VDISK_BASE:-}" ] && KINDS+=(base-none)
declare -A vals=()
n=${#KINDS[@]}
for ((r = 0; r < REPS; r++)); do
  for ((i = 0; i < n; i++)); do
    k=${KINDS[$(((r + i) % n))]}
    vals[$k]+="$(run_one "$k");"
  done
done
echo "fio 4k randwrite QD32, ${SIZE_MB} MiB qcow2, ${RUNTIME}s x $REPS interleaved rounds, medians; cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
args=()
for k in "${KINDS[@]}"; do args+=("$k" "${vals[$k]}"); done
python3 - "${args[@]}" <<'PY'
import statistics, sys
a = sys.argv[1:]
rows = {}
for k, v in zip(a[0::2], a[1::2]):
    pts = [tuple(map(float, x.split())) for x in v.split(";") if x.strip()]
    rows[k] = (statistics.median(p[0] for p in pts), statistics.median(p[1] for p in pts),
               min(p[0] for p in pts), max(p[0] for p in pts))
print(f"| {'server / image':<26} | {'IOPS (median)':>13} | {'min..max':>17} | {'server CPU us/write':>19} |")
print(f"|{'-'*28}|{'-'*15}|{'-'*19}|{'-'*21}|")
for k, (iops, cpu, lo, hi) in rows.items():
    print(f"| {k:<26} | {iops:13.0f} | {lo:8.0f}..{hi:<8.0f} | {cpu:19.1f} |")
def ratio(a, b):
    return rows[a][0] / rows[b][0] if a in rows and b in rows else float("nan")
print()
print(f"vdisk two bitmaps / vdisk none: {ratio('vdisk-bm', 'vdisk-none'):.3f}")
print(f"qemu-nbd two bitmaps / qemu-nbd none: {ratio('qemu-bm', 'qemu-none'):.3f}")
print(f"vdisk two bitmaps / qemu-nbd two bitmaps: {ratio('vdisk-bm', 'qemu-bm'):.3f}")
if "base-none" in rows:
    print(f"vdisk none / base none (hook cost without bitmaps): {ratio('vdisk-none', 'base-none'):.3f}")
PY
fi

# Part 2: the same write path without NBD, CPU time per process (robust on a busy
# machine): `bench -w` 4 KiB writes at depth 32 over the allocated image, vdisk and
# qemu-img, with and without the two bitmaps (qemu-img records them too).
B=$tmp/b
mkdir -p "$B"
COUNT=${COUNT:-200000}
python3 - "$B" "$VDISK" "$tmp" "$COUNT" >"$B/cases.json" <<'PY'
import json, sys
b, vdisk, tmp, count = sys.argv[1:5]
prep = f"cp {tmp}/none.qcow2 {b}/none.qcow2 && cp {tmp}/bm.qcow2 {b}/bm.qcow2"
def cmd(tool, img):
    return f"{tool} bench -w -f qcow2 -c {count} -d 32 -s 4k -t none {b}/{img}.qcow2"
print(json.dumps([{
    "name": "bench -w 4k depth 32",
    "prepare": prep,
    "cmds": [["vdisk two bitmaps", cmd(vdisk, "bm")], ["vdisk none", cmd(vdisk, "none")],
             ["qemu-img two bitmaps", cmd("qemu-img", "bm")], ["qemu-img none", cmd("qemu-img", "none")]],
}]))
PY
echo
echo "bench -w 4k x $COUNT, depth 32, cache=none (abrun.py, RUNS=${RUNS:-$REPS})"
RUNS=${RUNS:-$REPS} python3 bench/abrun.py <"$B/cases.json"
