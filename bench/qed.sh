#!/usr/bin/env bash
# QED: vdisk vs qemu-img, side by side in one run, same images, same requests:
#   1. allocating writes into an empty QED (`bench -w`), no backing file
#   2. the same over a raw backing file (partial-cluster writes copy backing data and
#      must be flushed before the L2 update)
#   3. `convert` raw -> QED of a random-data raw image
# Each case runs REPS times per tool (alternating), best time kept; prints seconds and
# the qemu/vdisk ratio (>1 means vdisk is faster). Every vdisk-written image is checked
# with `qemu-img check` (no errors, no leaks).
#
# Usage: bench/qed.sh            COUNT=20000 SIZE_MB=256 REPS=3 bench/qed.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-16000}        # requests per bench run (16000 x 64 KiB steps = 1 GiB)
BUF=${BUF:-4096}             # request size
DEPTH=${DEPTH:-16}
SIZE_MB=${SIZE_MB:-1024}     # guest size of the bench images
CONV_MB=${CONV_MB:-256}      # size of the raw image converted
REPS=${REPS:-3}

for t in qemu-img python3; do
  command -v "$t" >/dev/null || { echo "bench/qed.sh: $t is required" >&2; exit 1; }
done
cargo build --release -q -p vdisk-cli
VDISK=$PWD/target/release/vdisk

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

now() { python3 -c 'import time; print(time.monotonic())'; }

# time_cmd CMD...: prints elapsed seconds
time_cmd() {
  local t0 t1
  t0=$(now)
  "$@" >/dev/null
  t1=$(now)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}

best() { printf '%s\n' "$@" | sort -g | head -1; }

check_clean() {
  qemu-img check -q -f qed "$1" || { echo "bench/qed.sh: qemu-img check failed on $1" >&2; exit 1; }
}

# Backing file: random data so backing copies are real work.
head -c "$((SIZE_MB << 20))" /dev/urandom >"$tmp/base.raw"
head -c "$((CONV_MB << 20))" /dev/urandom >"$tmp/conv.raw"

# bench_case NAME CREATE_OPTS BENCH_ARGS...
bench_case() {
  local name=$1 opts=$2
  shift 2
  local v=() q=() t
  for _ in $(seq 1 "$REPS"); do
    rm -f "$tmp/v.qed" "$tmp/q.qed"
    qemu-img create -q -f qed -o "$opts" "$tmp/v.qed" "${SIZE_MB}M"
    cp "$tmp/v.qed" "$tmp/q.qed"
    t=$(time_cmd "$VDISK" bench -f qed "$@" "$tmp/v.qed"); v+=("$t")
    t=$(time_cmd qemu-img bench -f qed "$@" "$tmp/q.qed"); q+=("$t")
    check_clean "$tmp/v.qed"
  done
  local bv bq
  bv=$(best "${v[@]}"); bq=$(best "${q[@]}")
  printf '%-44s vdisk %8.3fs   qemu-img %8.3fs   ratio %5.2f\n' "$name" "$bv" "$bq" \
    "$(python3 -c "print($bq / $bv)")"
}

echo "QED benchmarks: COUNT=$COUNT BUF=$BUF DEPTH=$DEPTH SIZE=${SIZE_MB}M REPS=$REPS (best of)"
bench_case "bench -w alloc, 64k clusters, no backing" "cluster_size=64k" \
  -w -c "$COUNT" -s "$BUF" -S 65536 -d "$DEPTH" -t writeback
bench_case "bench -w alloc, 64k clusters, raw backing" \
  "cluster_size=64k,backing_file=$tmp/base.raw,backing_fmt=raw" \
  -w -c "$COUNT" -s "$BUF" -S 65536 -d "$DEPTH" -t writeback
bench_case "bench -w sequential 64k, no backing" "cluster_size=64k" \
  -w -c "$((COUNT / 2))" -s 65536 -d "$DEPTH" -t writeback

v=(); q=()
for _ in $(seq 1 "$REPS"); do
  rm -f "$tmp/cv.qed" "$tmp/cq.qed"
  t=$(time_cmd "$VDISK" convert -f raw -O qed "$tmp/conv.raw" "$tmp/cv.qed"); v+=("$t")
  t=$(time_cmd qemu-img convert -f raw -O qed "$tmp/conv.raw" "$tmp/cq.qed"); q+=("$t")
  check_clean "$tmp/cv.qed"
  qemu-img compare -q "$tmp/cv.qed" "$tmp/conv.raw"
done
bv=$(best "${v[@]}"); bq=$(best "${q[@]}")
printf '%-44s vdisk %8.3fs   qemu-img %8.3fs   ratio %5.2f\n' "convert raw->qed (${CONV_MB}M random)" \
  "$bv" "$bq" "$(python3 -c "print($bq / $bv)")"
