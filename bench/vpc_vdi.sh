#!/usr/bin/env bash
# VHD (vpc) and VDI conversions: vdisk vs qemu-img, side by side in one run, same files:
#   qcow2 -> vhd fixed, vhd fixed -> qcow2 (the issue's target), and for reference
#   qcow2 -> vhd dynamic, qcow2 -> vdi, vdi -> qcow2.
# The source is a SIZE_MB qcow2 with half of it data (random 1 MiB chunks on every other
# MiB). Each case runs RUNS interleaved rounds (vdisk, [VDISK_BASE,] qemu-img, order
# rotated; bench/abrun.py); medians of wall and CPU, peak RSS and ratios (>1: vdisk is
# faster). After each tool's first run the output is compared with the source
# (`qemu-img compare`) and, for vdi, checked (`qemu-img check`).
#
# Usage: bench/vpc_vdi.sh        SIZE_MB=1024 RUNS=5 VDISK_BASE=old/vdisk bench/vpc_vdi.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-1024}
RUNS=${RUNS:-5}

for t in qemu-img python3 jq /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/vpc_vdi.sh: $t is required" >&2; exit 1; }
done
cargo build --release -q -p vdisk-cli
VDISK=$PWD/target/release/vdisk

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Half data: random 1 MiB chunks on even MiBs, holes between.
python3 - "$tmp/src.raw" "$SIZE_MB" <<'PY'
import os, sys
path, mb = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(mb << 20)
    for i in range(0, mb, 2):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
PY
qemu-img convert -f raw -O qcow2 "$tmp/src.raw" "$tmp/src.qcow2"
rm -f "$tmp/src.raw"
qemu-img convert -O vpc -o subformat=fixed "$tmp/src.qcow2" "$tmp/in.vhd"
qemu-img convert -O vdi "$tmp/src.qcow2" "$tmp/in.vdi"

CASES=$tmp/cases.json
echo "[" >"$CASES"
FIRST=1
# add_case NAME OUT VDISK_ARGS QEMU_ARGS CHECK: the output is removed before every run and
# the page cache written back (`sync`), so no run pays for the previous run's writeback.
add_case() {
  [ $FIRST = 1 ] || echo "," >>"$CASES"
  FIRST=0
  jq -n --arg n "$1" --arg p "rm -f '$2' && sync" --arg v "'$VDISK' $3" \
    --arg b "${VDISK_BASE:+'$VDISK_BASE' $3}" --arg q "qemu-img $4" --arg c "$5" \
    '{name: $n, prepare: $p, check: $c,
      cmds: ([["vdisk", $v]] + (if $b != "" then [["vdisk-base", $b]] else [] end) + [["qemu-img", $q]])}' >>"$CASES"
}
S=$tmp/src.qcow2
conv() { # NAME OUT FROM_ARGS TO_ARGS SRC CHECK
  add_case "$1" "$2" "convert $3 $4 '$5' '$2'" "convert $3 $4 '$5' '$2'" "$6"
}
conv "qcow2 -> vhd fixed" "$tmp/o.vhd" "-f qcow2" "-O vpc -o subformat=fixed" "$S" \
  "qemu-img compare -q -F vpc '$S' '$tmp/o.vhd'"
conv "vhd fixed -> qcow2" "$tmp/o.qcow2" "-f vpc" "-O qcow2" "$tmp/in.vhd" \
  "qemu-img compare -q '$S' '$tmp/o.qcow2'"
conv "qcow2 -> vhd dynamic" "$tmp/d.vhd" "-f qcow2" "-O vpc" "$S" \
  "qemu-img compare -q -F vpc '$S' '$tmp/d.vhd'"
conv "qcow2 -> vdi" "$tmp/o.vdi" "-f qcow2" "-O vdi" "$S" \
  "qemu-img check -q '$tmp/o.vdi' && qemu-img compare -q '$S' '$tmp/o.vdi'"
conv "vdi -> qcow2" "$tmp/v.qcow2" "-f vdi" "-O qcow2" "$tmp/in.vdi" \
  "qemu-img compare -q '$S' '$tmp/v.qcow2'"
echo "]" >>"$CASES"

echo "vpc/vdi convert benchmarks: ${SIZE_MB} MiB, half data, $RUNS interleaved rounds (medians), load $(cut -d' ' -f1-3 /proc/loadavg)"
RUNS=$RUNS python3 bench/abrun.py <"$CASES"
