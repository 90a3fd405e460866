#!/usr/bin/env bash
# commit and measure: vdisk vs qemu-img, side by side in one run, same files:
#   1. `commit` of a 1 GiB qcow2 overlay (random data, every cluster allocated) into
#      an empty qcow2 base; the overlay is restored before every run
#   2. `measure -O qcow2` of a 64 GiB qcow2 image with 1 GiB of data scattered over it
#      (64 KiB every 4 MiB: 16384 runs of data between holes), human and JSON
#   3. the same of a 64 GiB sparse raw file
# Rounds interleaved (bench/abrun.py); medians of wall and CPU time, peak RSS and the
# ratios (>1 means vdisk is faster). Commit results are checked (`qemu-img check`,
# `qemu-img compare` with the data), measure outputs must be identical.
#
# Usage: bench/commit-measure.sh        RUNS=5 DATA_MB=1024 bench/commit-measure.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_MB=${DATA_MB:-1024}
RUNS=${RUNS:-5}
for t in qemu-img qemu-io python3 jq /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/commit-measure.sh: $t is required" >&2; exit 1; }
done
cargo build --release -q -p vdisk-cli
VDISK=$PWD/target/release/vdisk

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

# The overlay template: DATA_MB of random data over an empty base.
head -c "$((DATA_MB << 20))" /dev/urandom >rand.raw
qemu-img create -q -f qcow2 base.qcow2 "${DATA_MB}M"
qemu-img convert -q -f raw -O qcow2 -B base.qcow2 -F qcow2 rand.raw top.tmpl
# 64 GiB images with 64 KiB of data every 4 MiB.
qemu-img create -q -f qcow2 big.qcow2 64G
qemu-img create -q -f raw big.raw 64G
cmds=()
for ((i = 0; i < 16384; i++)); do cmds+=(-c "write -q -P $((i % 250 + 1)) $((i * 4))M 64k"); done
qemu-io -f qcow2 "${cmds[@]}" big.qcow2
qemu-io -f raw "${cmds[@]}" big.raw

CASES=$tmp/cases.json
jq -n --arg tmp "$tmp" --arg v "$VDISK" '[
  {name: "commit 1 GiB qcow2 overlay into qcow2",
   prepare: "cd \($tmp) && rm -f base.qcow2 top.qcow2 && qemu-img create -q -f qcow2 base.qcow2 '"${DATA_MB}"'M && cp top.tmpl top.qcow2",
   check: "cd \($tmp) && qemu-img check -q base.qcow2 && qemu-img check -q top.qcow2 && qemu-img compare -q -F raw base.qcow2 rand.raw && qemu-img compare -q top.qcow2 rand.raw",
   cmds: [["vdisk", "\($v) commit -q \($tmp)/top.qcow2"],
          ["qemu-img", "qemu-img commit -q \($tmp)/top.qcow2"]]},
  {name: "measure -O qcow2, 64 GiB qcow2 (16384 data runs)",
   check: "cd \($tmp) && [ \"$(\($v) measure -O qcow2 big.qcow2)\" = \"$(qemu-img measure -O qcow2 big.qcow2)\" ]",
   cmds: [["vdisk", "\($v) measure -O qcow2 \($tmp)/big.qcow2"],
          ["qemu-img", "qemu-img measure -O qcow2 \($tmp)/big.qcow2"]]},
  {name: "measure --output=json -O qcow2 -o cluster_size=4k, 64 GiB qcow2",
   check: "cd \($tmp) && [ \"$(\($v) measure --output=json -O qcow2 -o cluster_size=4k big.qcow2)\" = \"$(qemu-img measure --output=json -O qcow2 -o cluster_size=4k big.qcow2)\" ]",
   cmds: [["vdisk", "\($v) measure --output=json -O qcow2 -o cluster_size=4k \($tmp)/big.qcow2"],
          ["qemu-img", "qemu-img measure --output=json -O qcow2 -o cluster_size=4k \($tmp)/big.qcow2"]]},
  {name: "measure -O qcow2, 64 GiB sparse raw",
   check: "cd \($tmp) && [ \"$(\($v) measure -f raw -O qcow2 big.raw)\" = \"$(qemu-img measure -f raw -O qcow2 big.raw)\" ]",
   cmds: [["vdisk", "\($v) measure -f raw -O qcow2 \($tmp)/big.raw"],
          ["qemu-img", "qemu-img measure -f raw -O qcow2 \($tmp)/big.raw"]]}
]' >"$CASES"

echo "commit/measure benchmarks: DATA=${DATA_MB}M, $RUNS interleaved rounds (medians), load $(cut -d' ' -f1-3 /proc/loadavg)"
cd - >/dev/null
RUNS=$RUNS python3 bench/abrun.py <"$CASES"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
