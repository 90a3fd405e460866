#!/usr/bin/env bash
# Instructions per request on the hot paths, counted by valgrind's callgrind: a number
# that does not move with the machine's load, so a regression shows as a number.
#
# Each figure is (instructions for N2 requests - instructions for N1 requests) / (N2 - N1):
# start-up, image open and exit cancel out. Every process and thread is counted (the
# NBD server's reader and workers included).
#   read4k     `vdisk bench` 4 KiB reads of allocated clusters (qcow2, writeback)
#   read4k-direct   the same with -t none (O_DIRECT)
#   alloc4k    `vdisk bench -w` 4 KiB writes, each allocating a fresh 64 KiB cluster
#   alloc4k-direct  the same with -t none
#   nbd-read4k  `vdisk serve` (qcow2, writeback) answering fio's 4 KiB random reads
#               (nbd engine, QD32): the server's instructions per request
#   nbd-read4k-direct  the same with --cache=none
#   nbd-write4k, nbd-write4k-direct  the same with fio's 4 KiB random writes (in place:
#               every cluster is allocated)
#
# Usage: bench/callgrind.sh                         (the build in target/release)
#        VDISK_BASE=/tmp/old/vdisk bench/callgrind.sh   (adds a column for an older build)
# Results go to stdout as a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

for t in valgrind qemu-img fio; do
  command -v "$t" >/dev/null || { echo "bench/callgrind.sh: $t is required" >&2; exit 1; }
done
# VDISK=/path/to/vdisk measures that build instead of building this tree.
if [ -z "${VDISK:-}" ]; then
  cargo build --release -q -p vdisk-cli 2>/dev/null || cargo build --release -p vdisk-cli
  VDISK=$PWD/target/release/vdisk
fi
N1=${N1:-2000}
N2=${N2:-6000}

tmp=$(mktemp -d)
SRV=""
cleanup() {
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

head -c $((64 << 20)) /dev/urandom >"$tmp/data.raw"
qemu-img convert -O qcow2 "$tmp/data.raw" "$tmp/full.qcow2"

# total instructions recorded in a callgrind output file
ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

# cg OUT CMD...: runs CMD under callgrind, prints its instruction count
cg() {
  local out=$1
  shift
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >/dev/null 2>"$out.log" ||
    { echo "bench/callgrind.sh: failed: $*" >&2; cat "$out.log" >&2; exit 1; }
  ir "$out"
}

# per_request BIN KIND: instructions per request of one workload
per_request() {
  local bin=$1 kind=$2 a b n
  for n in $N1 $N2; do
    case $kind in
      read4k | read4k-direct)
        local t=writeback
        [ "$kind" = read4k-direct ] && t=none
        v=$(cg "$tmp/cg.$n" "$bin" bench -t $t -s 4k -S 68k -c "$n" -d 1 "$tmp/full.qcow2") ;;
      alloc4k | alloc4k-direct)
        local t=writeback
        [ "$kind" = alloc4k-direct ] && t=none
        rm -f "$tmp/fresh.qcow2"
        qemu-img create -q -f qcow2 "$tmp/fresh.qcow2" 1G
        v=$(cg "$tmp/cg.$n" "$bin" bench -w -t $t --pattern=7 -s 4k -S 64k -c "$n" -d 1 "$tmp/fresh.qcow2")
        qemu-img check -q "$tmp/fresh.qcow2" || { echo "check failed after $kind" >&2; exit 1; } ;;
      nbd-read4k | nbd-read4k-direct | nbd-write4k | nbd-write4k-direct)
        local c=writeback rw=randread
        case $kind in *-direct) c=none ;; esac
        case $kind in nbd-write*) rw=randwrite ;; esac
        rm -f "$tmp/s.sock" "$tmp/pid"
        cp "$tmp/full.qcow2" "$tmp/served.qcow2"
        valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$n" \
          "$bin" serve -f qcow2 -k "$tmp/s.sock" -t -e 4 --cache=$c --pid-file "$tmp/pid" \
          "$tmp/served.qcow2" >/dev/null 2>"$tmp/cg.$n.log" &
        SRV=$!
        for _ in $(seq 1 600); do [ -S "$tmp/s.sock" ] && [ -s "$tmp/pid" ] && break; sleep 0.1; done
        [ -S "$tmp/s.sock" ] || { echo "server did not start" >&2; cat "$tmp/cg.$n.log" >&2; exit 1; }
        fio --output=/dev/null --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/s.sock" \
          --rw=$rw --bs=4k --iodepth=32 --number_ios="$n" --size=64M
        kill -TERM "$(cat "$tmp/pid")"
        wait "$SRV" || true
        SRV=""
        v=$(ir "$tmp/cg.$n") ;;
    esac
    if [ "$n" = "$N1" ]; then a=$v; else b=$v; fi
  done
  echo $(((b - a) / (N2 - N1)))
}

KINDS=${KINDS:-"read4k read4k-direct alloc4k alloc4k-direct nbd-read4k nbd-read4k-direct nbd-write4k nbd-write4k-direct"}
if [ -n "${VDISK_BASE:-}" ]; then
  echo "| path | instructions/request, base ($VDISK_BASE) | instructions/request, this build | ratio |"
  echo "|---|---:|---:|---:|"
else
  echo "| path | instructions/request |"
  echo "|---|---:|"
fi
for k in $KINDS; do
  now=$(per_request "$VDISK" "$k")
  if [ -n "${VDISK_BASE:-}" ]; then
    base=$(per_request "$VDISK_BASE" "$k")
    echo "| $k | $base | $now | $(python3 -c "print(f'{$base/$now:.2f}x')") |"
  else
    echo "| $k | $now |"
  fi
done
