#!/usr/bin/env bash
# vdisk serve vs qemu-nbd, side by side in one run, same image, same clients:
#   - nbdcopy reading a fully allocated 512 MiB image to null:
#   - nbdcopy writing 512 MiB into a fresh image
#   - fio (nbd engine) 4 KiB random reads and writes at queue depth 32
# Prints each result and the vdisk/qemu-nbd ratio (>1 means vdisk is faster), plus the
# CPU seconds each server used for the same work (robust when the machine is busy;
# ratio qemu/vdisk, >1 means vdisk used less CPU).
#
# Usage: bench/nbd.sh            (FMT=qcow2 by default; FMT=raw also works)
#        FMT=raw RUNTIME=10 REPS=3 bench/nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."

FMT=${FMT:-qcow2}
SIZE_MB=${SIZE_MB:-512}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-3}

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
    vdisk) "$VDISK" serve -f "$FMT" -k "$SOCK" -t -e 4 --pid-file "$tmp/pid" "$@" "$file" & ;;
    qemu)  qemu-nbd -f "$FMT" -k "$SOCK" -t -e 4 --cache=writeback --pid-file "$tmp/pid" "$@" "$file" & ;;
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

stop_server() {
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
}

now() { date +%s.%N; }

# Best of REPS runs of: nbdcopy the source export to null: (MiB/s); CPU per run.
bench_read() {
  local kind=$1 best=0 cpu
  start_server "$kind" "$tmp/src.$FMT" -r
  for _ in $(seq 1 "$REPS"); do
    local t0 t1
    t0=$(now); nbdcopy "$URI" null:; t1=$(now)
    best=$(python3 -c "print(max($best, $SIZE_MB/($t1-$t0)))")
  done
  cpu=$(python3 -c "print($(server_cpu)/$REPS)")
  stop_server
  echo "$best $cpu"
}

# Best of REPS runs of: nbdcopy the data into a fresh image (MiB/s), flush included.
bench_write() {
  local kind=$1 best=0 cpu=0
  for _ in $(seq 1 "$REPS"); do
    rm -f "$tmp/dst.$FMT"
    qemu-img create -q -f "$FMT" "$tmp/dst.$FMT" "${SIZE_MB}M"
    start_server "$kind" "$tmp/dst.$FMT"
    local t0 t1
    t0=$(now); nbdcopy --flush "$tmp/data.raw" "$URI"; t1=$(now)
    cpu=$(python3 -c "print($cpu + $(server_cpu)/$REPS)")
    stop_server
    best=$(python3 -c "print(max($best, $SIZE_MB/($t1-$t0)))")
  done
  echo "$best $cpu"
}

# fio 4 KiB random I/O at QD 32 on a private copy of the source (IOPS).
bench_fio() {
  local kind=$1 rw=$2
  cp "$tmp/src.$FMT" "$tmp/fio.$FMT"
  start_server "$kind" "$tmp/fio.$FMT"
  fio --name=nbd --ioengine=nbd --uri="$URI" --rw="$rw" --bs=4k --iodepth=32 \
      --size="${SIZE_MB}m" --time_based --runtime="$RUNTIME" \
      --output-format=json >"$tmp/fio.json"
  local cpu
  cpu=$(server_cpu)
  stop_server
  python3 - "$tmp/fio.json" "$rw" "$cpu" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
# fio's nbd engine prints a line before the JSON document.
j = json.loads(text[text.index("{"):])["jobs"][0]
side = "read" if "read" in sys.argv[2] else "write"
ops = max(j[side]["total_ios"], 1)
# IOPS, and the server's CPU microseconds per operation.
print(j[side]["iops"], float(sys.argv[3]) * 1e6 / ops)
PY
}

ratio() { python3 -c "print(f'{$1/$2:.2f}' if $2 > 0 else 'n/a')"; }

echo "format=$FMT size=${SIZE_MB}MiB fio_runtime=${RUNTIME}s reps=$REPS cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-42s %10s %10s %6s | %9s %9s %6s\n' test vdisk qemu-nbd ratio "vdisk-cpu" "qemu-cpu" ratio
row() {
  # row NAME "VDISK_VALUE VDISK_CPU" "QEMU_VALUE QEMU_CPU"
  local v vc q qc
  read -r v vc <<<"$2"
  read -r q qc <<<"$3"
  printf '%-42s %10.1f %10.1f %6s | %9.2f %9.2f %6s\n' "$1" "$v" "$q" "$(ratio "$v" "$q")" \
    "$vc" "$qc" "$(ratio "$qc" "$vc")"
}
v=$(bench_read vdisk); q=$(bench_read qemu); row "nbdcopy read -> null: (MiB/s; cpu s/run)" "$v" "$q"
v=$(bench_write vdisk); q=$(bench_write qemu); row "nbdcopy write fresh (MiB/s; cpu s/run)" "$v" "$q"
v=$(bench_fio vdisk randread); q=$(bench_fio qemu randread); row "fio 4k randread QD32 (IOPS; cpu us/op)" "$v" "$q"
v=$(bench_fio vdisk randwrite); q=$(bench_fio qemu randwrite); row "fio 4k randwrite QD32 (IOPS; cpu us/op)" "$v" "$q"
