#!/usr/bin/env bash
# Peak RSS (VmHWM) of `vdisk serve` and `qemu-nbd` serving the same qcow2 to the same
# clients, interleaved (vdisk, qemu-nbd, vdisk, ... REPS rounds each), medians:
#   - fio (nbd engine) 4 KiB random reads and writes at QD32 for RUNTIME seconds,
#     with --cache=none and --cache=writeback;
#   - nbdcopy reading the whole image to null:, and writing a raw file into a fresh qcow2.
# Memory, not speed: unlike bench/nbd.sh the figures hardly move with the machine's load,
# so this runs beside other work. Each row also prints both servers' IOPS or seconds
# (read those only on a quiet machine) and their memory at rest (before the client).
#
# Usage: bench/nbd-rss.sh            (SIZE_MB=256 REPS=3 RUNTIME=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-256}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-3}

for t in qemu-nbd qemu-img nbdcopy fio python3; do
  command -v "$t" >/dev/null || { echo "bench/nbd-rss.sh: $t is required" >&2; exit 1; }
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

head -c "$((SIZE_MB << 20))" /dev/urandom >"$tmp/data.raw"
qemu-img convert -O qcow2 "$tmp/data.raw" "$tmp/src.qcow2"
SOCK=$tmp/nbd.sock
URI="nbd+unix:///?socket=$SOCK"

# start KIND CACHE FILE
start() {
  rm -f "$tmp/pid" "$SOCK"
  case $1 in
    vdisk) "$VDISK" serve -f qcow2 -k "$SOCK" -t -e 4 --cache="$2" --pid-file "$tmp/pid" "$3" & ;;
    qemu) qemu-nbd -f qcow2 -k "$SOCK" -t -e 4 --cache="$2" --pid-file "$tmp/pid" "$3" & ;;
  esac
  SRV_PID=$!
  for _ in $(seq 1 500); do
    [ -s "$tmp/pid" ] && [ -S "$SOCK" ] && return 0
    sleep 0.02
  done
  echo "bench/nbd-rss.sh: $1 did not start" >&2
  exit 1
}
hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$SRV_PID/status"; }
stop() {
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
}

# One round: prints "rest_kib peak_kib speed".
round_fio() {
  local kind=$1 cache=$2 rw=$3
  cp "$tmp/src.qcow2" "$tmp/fio.qcow2"
  start "$kind" "$cache" "$tmp/fio.qcow2"
  local rest
  rest=$(hwm)
  fio --name=rss --ioengine=nbd --uri="$URI" --rw="$rw" --bs=4k --iodepth=32 \
    --size="${SIZE_MB}m" --time_based --runtime="$RUNTIME" --output-format=json >"$tmp/fio.json"
  local peak
  peak=$(hwm)
  stop
  python3 - "$tmp/fio.json" "$rest" "$peak" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
print(sys.argv[2], sys.argv[3], int(j["read"]["iops"] + j["write"]["iops"]))
PY
}

round_copy() {
  local kind=$1 dir=$2 file
  if [ "$dir" = read ]; then
    file=$tmp/src.qcow2
  else
    rm -f "$tmp/new.qcow2"
    qemu-img create -q -f qcow2 "$tmp/new.qcow2" "${SIZE_MB}M"
    file=$tmp/new.qcow2
  fi
  start "$kind" writeback "$file"
  local rest t0 t1 peak
  rest=$(hwm)
  t0=$(date +%s.%N)
  if [ "$dir" = read ]; then nbdcopy "$URI" null:; else nbdcopy "$tmp/data.raw" "$URI"; fi
  t1=$(date +%s.%N)
  peak=$(hwm)
  stop
  if [ "$dir" = write ]; then
    qemu-img compare -q "$tmp/data.raw" "$tmp/new.qcow2" ||
      { echo "bench/nbd-rss.sh: $kind wrote different data" >&2; exit 1; }
  fi
  echo "$rest $peak $(python3 -c "print(round($t1 - $t0, 3))")"
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s | %-22s | %-22s | %s\n' case "vdisk rest/peak KiB" "qemu-nbd rest/peak KiB" "speed vdisk / qemu-nbd"
row() {
  local name=$1
  shift
  local v=() q=()
  for _ in $(seq 1 "$REPS"); do
    v+=("$("$@" vdisk)")
    q+=("$("$@" qemu)")
  done
  python3 - "$name" "${v[@]}" -- "${q[@]}" <<'PY'
import statistics as st, sys
name, rest = sys.argv[1], sys.argv[2:]
i = rest.index("--")
def med(rows, k):
    return st.median(float(r.split()[k]) for r in rows)
v, q = rest[:i], rest[i + 1:]
print(f"{name:<28} | {med(v,0):8.0f} / {med(v,1):8.0f}   | {med(q,0):8.0f} / {med(q,1):8.0f}   | "
      f"{med(v,2):g} / {med(q,2):g}   peaks vdisk {[int(r.split()[1]) for r in v]} qemu {[int(r.split()[1]) for r in q]}")
PY
}
fio_case() { round_fio "$4" "$1" "$2"; }
copy_case() { round_copy "$2" "$1"; }
for cache in none writeback; do
  for rw in randread randwrite; do
    row "fio $rw cache=$cache" fio_case "$cache" "$rw" x
  done
done
row "nbdcopy read" copy_case read
row "nbdcopy write" copy_case write
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
