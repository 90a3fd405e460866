#!/usr/bin/env bash
# qcow2 subclusters: 4 KiB allocating writes over a backing file, 64 KiB clusters,
# standard vs extended L2 entries, vdisk bench vs qemu-img bench, side by side on the
# same images (bench/abrun.py: interleaved rounds, order rotated, medians of wall and CPU).
#
# Every request allocates a new cluster: `-S 69632` (17 x 4 KiB) moves the request to a
# new cluster each time and to another 4 KiB position inside it (all 16 in turn), so the
# standard layout copies 60 KiB of backing data per request and the extended layout
# copies nothing (the request covers two whole 2 KiB subclusters).
#
# Then the load-independent counts: write system calls and bytes written per request
# (strace -f over the whole run, COUNT_STRACE requests), per tool and layout.
#
# Usage: bench/extl2.sh        COUNT=8000 DEPTH=16 RUNS=5 bench/extl2.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-8000}              # requests per bench run (8000 x 68 KiB = 531 MiB)
COUNT_STRACE=${COUNT_STRACE:-2000}
DEPTH=${DEPTH:-16}
SIZE_MB=${SIZE_MB:-560}
RUNS=${RUNS:-5}

for t in qemu-img python3 jq strace /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/extl2.sh: $t is required" >&2; exit 1; }
done
cargo build --release -q -p vdisk-cli
VDISK=$PWD/target/release/vdisk

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c "$((SIZE_MB << 20))" /dev/urandom >"$tmp/base.raw"

BENCH="-w -c $COUNT -s 4096 -S 69632 -d $DEPTH -t writeback"
CASES=$tmp/cases.json
{
  echo "["
  first=1
  for l2 in off on; do
    [ $first = 1 ] || echo ","
    first=0
    prep="rm -f '$tmp/t.qcow2' && qemu-img create -q -f qcow2 -o cluster_size=64k,extended_l2=$l2 -b '$tmp/base.raw' -F raw '$tmp/t.qcow2'"
    jq -n --arg n "extended_l2=$l2" --arg p "$prep" \
      --arg v "'$VDISK' bench -f qcow2 $BENCH '$tmp/t.qcow2'" \
      --arg q "qemu-img bench -f qcow2 $BENCH '$tmp/t.qcow2'" \
      --arg c "qemu-img check -q '$tmp/t.qcow2'" \
      '{name: $n, prepare: $p, check: $c, cmds: [["vdisk", $v], ["qemu-img", $q]]}'
  done
  echo "]"
} >"$CASES"

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
RUNS=$RUNS python3 bench/abrun.py <"$CASES"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Write system calls and bytes written per request.
echo
echo "| tool | layout | write calls/request | flushes (whole run) | bytes written/request |"
echo "|---|---|---|---|---|"
SB="-w -c $COUNT_STRACE -s 4096 -S 69632 -d $DEPTH -t writeback"
for l2 in off on; do
  for tool in vdisk qemu-img; do
    rm -f "$tmp/t.qcow2"
    qemu-img create -q -f qcow2 -o "cluster_size=64k,extended_l2=$l2" -b "$tmp/base.raw" -F raw "$tmp/t.qcow2"
    if [ $tool = vdisk ]; then cmd=("$VDISK" bench -f qcow2); else cmd=(qemu-img bench -f qcow2); fi
    strace -f -qq -o "$tmp/trace" -e trace=pwrite64,pwritev,pwritev2,fdatasync,fsync \
      "${cmd[@]}" $SB "$tmp/t.qcow2" >/dev/null
    qemu-img check -q "$tmp/t.qcow2"
    python3 bench/strace_writes.py "$tmp/trace" "$COUNT_STRACE" "$tool" "extended_l2=$l2"
  done
done
