#!/usr/bin/env bash
# System calls per request (strace -c -f), which, like instruction counts, do not move
# with the machine's load:
#   alloc4k       `bench -w` 4 KiB writes, each allocating a fresh 64 KiB qcow2 cluster
#                 (vdisk bench vs qemu-img bench), -t writeback and -t none
#   nbd-randread / nbd-randwrite   the NBD server (vdisk serve vs qemu-nbd) answering
#                 fio's nbd engine, 4 KiB random I/O at QD32 on an allocated qcow2,
#                 --cache=writeback and none
# Prints, per case and tool, the calls per request of the busiest system calls.
#
# Usage: bench/syscalls.sh          VDISK_BASE=/tmp/old/vdisk bench/syscalls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for t in strace qemu-img qemu-nbd fio; do
  command -v "$t" >/dev/null || { echo "bench/syscalls.sh: $t is required" >&2; exit 1; }
done
# VDISK=/path/to/vdisk measures that build instead of building this tree.
if [ -z "${VDISK:-}" ]; then
  cargo build --release -q -p vdisk-cli 2>/dev/null || cargo build --release -p vdisk-cli
  VDISK=$PWD/target/release/vdisk
fi
N=${N:-20000}
NA=${NA:-2000}
tmp=$(mktemp -d)
SRV=""
cleanup() {
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
head -c $((256 << 20)) /dev/urandom >"$tmp/data.raw"
qemu-img convert -O qcow2 "$tmp/data.raw" "$tmp/src.qcow2"

# per_req FILE N: "name calls/req" for the busiest calls of an strace -c summary
per_req() {
  awk -v n="$2" '$4 ~ /^[0-9]+$/ && $NF != "syscall" && $NF != "total" {printf "%s=%.2f\n", $NF, $4/n}' "$1" |
    sort -t= -k2 -n -r | head -6 | tr '\n' ' '
  awk -v n="$2" '$NF == "total" {printf "| total=%.2f", $4/n}' "$1"
}

tools=(vdisk)
[ -n "${VDISK_BASE:-}" ] && tools+=(base)
tools+=(qemu)
bin() { case $1 in vdisk) echo "$VDISK" ;; base) echo "$VDISK_BASE" ;; esac; }

echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for cache in writeback none; do
  for t in "${tools[@]}"; do
    rm -f "$tmp/a.qcow2"
    qemu-img create -q -f qcow2 "$tmp/a.qcow2" 1G
    if [ "$t" = qemu ]; then
      strace -f -c -o "$tmp/st" qemu-img bench -w -t $cache --pattern=7 -s 4k -S 64k -c "$NA" -d 1 "$tmp/a.qcow2" >/dev/null
    else
      strace -f -c -o "$tmp/st" "$(bin "$t")" bench -w -t $cache --pattern=7 -s 4k -S 64k -c "$NA" -d 1 "$tmp/a.qcow2" >/dev/null
    fi
    qemu-img check -q "$tmp/a.qcow2"
    echo "alloc4k cache=$cache $t: $(per_req "$tmp/st" "$NA")"
  done
done
for cache in writeback none; do
  for rw in randread randwrite; do
    for t in "${tools[@]}"; do
      cp "$tmp/src.qcow2" "$tmp/f.qcow2"
      rm -f "$tmp/s.sock" "$tmp/pid"
      if [ "$t" = qemu ]; then
        strace -f -c -o "$tmp/st" qemu-nbd -f qcow2 -k "$tmp/s.sock" -t -e 4 --cache=$cache --pid-file "$tmp/pid" "$tmp/f.qcow2" &
      else
        strace -f -c -o "$tmp/st" "$(bin "$t")" serve -f qcow2 -k "$tmp/s.sock" -t -e 4 --cache=$cache --pid-file "$tmp/pid" "$tmp/f.qcow2" &
      fi
      SRV=$!
      for _ in $(seq 1 200); do [ -S "$tmp/s.sock" ] && [ -s "$tmp/pid" ] && break; sleep 0.05; done
      fio --output=/dev/null --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/s.sock" \
        --rw=$rw --bs=4k --iodepth=32 --number_ios="$N" --size=256M
      kill -TERM "$(cat "$tmp/pid")"
      wait "$SRV" || true
      SRV=""
      qemu-img check -q "$tmp/f.qcow2"
      echo "nbd-$rw cache=$cache $t: $(per_req "$tmp/st" "$N")"
    done
  done
done
