#!/usr/bin/env bash
# QED: vdisk vs qemu-img, side by side in one run, same images, same requests:
#   1. allocating writes into an empty QED (`bench -w`), no backing file
#   2. the same over a raw backing file (partial-cluster writes copy backing data and
#      must be flushed before the L2 update)
#   3. `convert` raw -> QED of a random-data raw image
# Each case runs RUNS interleaved rounds (vdisk, [VDISK_BASE,] qemu-img, order rotated;
# bench/abrun.py); prints medians of wall and CPU time, peak RSS and the ratios (>1
# means vdisk is faster). Every image is checked with `qemu-img check` (no errors, no
# leaks) after each tool's first run.
#
# Usage: bench/qed.sh            COUNT=20000 SIZE_MB=256 RUNS=5 VDISK_BASE=old/vdisk bench/qed.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-16000}        # requests per bench run (16000 x 64 KiB steps = 1 GiB)
BUF=${BUF:-4096}             # request size
DEPTH=${DEPTH:-16}
SIZE_MB=${SIZE_MB:-1024}     # guest size of the bench images
CONV_MB=${CONV_MB:-256}      # size of the raw image converted
RUNS=${RUNS:-${REPS:-5}}

for t in qemu-img python3 jq /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/qed.sh: $t is required" >&2; exit 1; }
done
cargo build --release -q -p vdisk-cli
VDISK=$PWD/target/release/vdisk

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

CASES=$tmp/cases.json
echo "[" >"$CASES"
FIRST=1
# add_case NAME PREPARE VDISK_ARGS QEMU_CMD CHECK: one interleaved case for bench/abrun.py
# (vdisk, [vdisk-base,] qemu-img; the image is recreated before every run).
add_case() {
  [ $FIRST = 1 ] || echo "," >>"$CASES"
  FIRST=0
  jq -n --arg n "$1" --arg p "$2" --arg v "'$VDISK' $3" --arg b "${VDISK_BASE:+'$VDISK_BASE' $3}" \
    --arg q "$4" --arg c "$5" \
    '{name: $n, prepare: $p, check: $c,
      cmds: ([["vdisk", $v]] + (if $b != "" then [["vdisk-base", $b]] else [] end) + [["qemu-img", $q]])}' >>"$CASES"
}

# Backing file: random data so backing copies are real work.
head -c "$((SIZE_MB << 20))" /dev/urandom >"$tmp/base.raw"
head -c "$((CONV_MB << 20))" /dev/urandom >"$tmp/conv.raw"

# bench_case NAME CREATE_OPTS BENCH_ARGS...
bench_case() {
  local name=$1 opts=$2
  shift 2
  add_case "$name" "rm -f '$tmp/b.qed' && qemu-img create -q -f qed -o '$opts' '$tmp/b.qed' ${SIZE_MB}M" \
    "bench -f qed $* '$tmp/b.qed'" "qemu-img bench -f qed $* '$tmp/b.qed'" \
    "qemu-img check -q -f qed '$tmp/b.qed'"
}

bench_case "bench -w alloc, 64k clusters, no backing" "cluster_size=64k" \
  -w -c "$COUNT" -s "$BUF" -S 65536 -d "$DEPTH" -t writeback
bench_case "bench -w alloc, 64k clusters, raw backing" \
  "cluster_size=64k,backing_file=$tmp/base.raw,backing_fmt=raw" \
  -w -c "$COUNT" -s "$BUF" -S 65536 -d "$DEPTH" -t writeback
bench_case "bench -w sequential 64k, no backing" "cluster_size=64k" \
  -w -c "$((COUNT / 2))" -s 65536 -d "$DEPTH" -t writeback
add_case "convert raw->qed (${CONV_MB}M random)" "rm -f '$tmp/c.qed'" \
  "convert -f raw -O qed '$tmp/conv.raw' '$tmp/c.qed'" \
  "qemu-img convert -f raw -O qed '$tmp/conv.raw' '$tmp/c.qed'" \
  "qemu-img check -q -f qed '$tmp/c.qed' && qemu-img compare -q '$tmp/c.qed' '$tmp/conv.raw'"
echo "]" >>"$CASES"

echo "QED benchmarks: COUNT=$COUNT BUF=$BUF DEPTH=$DEPTH SIZE=${SIZE_MB}M, $RUNS interleaved rounds (medians), load $(cut -d' ' -f1-3 /proc/loadavg)"
RUNS=$RUNS python3 bench/abrun.py <"$CASES"
