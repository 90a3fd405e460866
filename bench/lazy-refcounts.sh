#!/usr/bin/env bash
# Allocating 4 KiB writes with lazy_refcounts on vs off: vdisk bench vs qemu-img bench,
# interleaved (bench/abrun.py), plus load-independent syscall counts (strace -c).
#
# Every request allocates a new 64 KiB cluster (-s 4096 -S 65536: qemu-img bench has no
# random offsets, a stride of one cluster makes every write an allocating one), on a
# fresh 4 GiB image per run, with a flush every FLUSH requests (the case lazy refcounts
# are about) and without flushes. Knobs: RUNS (default 5), COUNT (default 4000), FLUSH
# (default 10), BENCH_TMP.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${COUNT:-4000}
FLUSH=${FLUSH:-10}
for tool in python3 qemu-img strace /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release -q -p vdisk-cli)
VDISK=$ROOT/target/release/vdisk
mkdir -p "${BENCH_TMP:-$ROOT/target}"
WORK=$(mktemp -d "${BENCH_TMP:-$ROOT/target}/bench-lazy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
IMG=$WORK/i.qcow2
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
cases="["
sep=""
for lazy in off on; do
    for fl in "$FLUSH" 0; do
        fopt=""; [ "$fl" != 0 ] && fopt="--flush-interval=$fl"
        args="-w -f qcow2 -c $COUNT -d 1 -s 4096 -S 65536 $fopt $IMG"
        cases+="$sep{\"name\": \"lazy_refcounts=$lazy, flush every ${fl/#0/no} requests\","
        cases+="\"prepare\": \"qemu-img create -q -f qcow2 -o lazy_refcounts=$lazy $IMG 4G\","
        cases+="\"check\": \"qemu-img check $IMG\","
        cases+="\"cmds\": [[\"vdisk\", \"$VDISK bench $args\"], [\"qemu-img\", \"qemu-img bench $args\"]]}"
        sep=","
    done
done
cases+="]"
echo "$cases" | python3 "$ROOT/bench/abrun.py"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Syscalls per 1000 requests (strace -f -c; flush every $FLUSH requests):"
echo
echo "| lazy_refcounts | tool | fdatasync | pwrite/pwritev | fallocate |"
echo "|---|---|---|---|---|"
for lazy in off on; do
    for t in vdisk qemu-img; do
        qemu-img create -q -f qcow2 -o lazy_refcounts=$lazy "$IMG" 4G
        b="qemu-img bench"; [ $t = vdisk ] && b="$VDISK bench"
        strace -f -c -o "$WORK/s.txt" $b -w -f qcow2 -c 1000 -d 1 -s 4096 -S 65536 \
            --flush-interval="$FLUSH" "$IMG" >/dev/null 2>&1
        n() { awk -v k="$1" '$NF ~ k {s += $4} END {print s + 0}' "$WORK/s.txt"; }
        echo "| $lazy | $t | $(n '^f(data)?sync$') | $(n '^pwrite') | $(n '^fallocate$') |"
    done
done
