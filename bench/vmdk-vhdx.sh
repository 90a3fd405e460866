#!/usr/bin/env bash
# vdisk vs qemu-img on the cloud upload conversions (issue 15): a qcow2 of SIZE_MB
# (default 1024) MiB with random data in about half of its 1 MiB chunks, converted to a
# streamOptimized VMDK (AWS import) and to a dynamic VHDX (Hyper-V/Azure), and each
# back to qcow2. Interleaved runs (bench/abrun.py), medians; every tool's result is
# checked against the source (qemu-img compare). The prepare step deletes the previous
# output and syncs, so no run pays for the writeback of the one before it.
#
# Knobs: RUNS (rounds, default 3), SIZE_MB, BENCH_TMP (scratch directory's parent).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-1024}

for tool in jq python3 qemu-img /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release -q -p vdisk-cli)
VDISK=$ROOT/target/release/vdisk
mkdir -p "${BENCH_TMP:-$ROOT/target}"
WORK=$(mktemp -d "${BENCH_TMP:-$ROOT/target}/bench-vmdk-vhdx.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== making a ${SIZE_MB} MiB qcow2, random data in about half of the 1 MiB chunks" >&2
truncate -s "${SIZE_MB}M" "$WORK/src.raw"
RANDOM=42
for ((i = 0; i < SIZE_MB; i++)); do
    if ((RANDOM % 2)); then
        dd if=/dev/urandom of="$WORK/src.raw" bs=1M count=1 seek="$i" conv=notrunc status=none
    fi
done
qemu-img convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"
rm "$WORK/src.raw"
qemu-img convert -O vmdk -o subformat=streamOptimized "$WORK/src.qcow2" "$WORK/src.vmdk"
qemu-img convert -O vhdx "$WORK/src.qcow2" "$WORK/src.vhdx"

CASES=$WORK/cases.json
echo "[" >"$CASES"
FIRST=1
case_() { # NAME OUT VDISK_ARGS QEMU_ARGS
    [ $FIRST = 1 ] || echo "," >>"$CASES"
    FIRST=0
    jq -n --arg n "$1" --arg p "rm -f $WORK/$2 && sync" \
        --arg c "qemu-img compare -q $WORK/src.qcow2 $WORK/$2" \
        --arg v "'$VDISK' convert $3" --arg q "qemu-img convert $4" \
        '{name: $n, prepare: $p, check: $c, cmds: [["vdisk", $v], ["qemu-img", $q]]}' >>"$CASES"
}
S=$WORK/src
case_ "qcow2 -> vmdk streamOptimized" out.vmdk \
    "-O vmdk -o subformat=streamOptimized $S.qcow2 $WORK/out.vmdk" \
    "-O vmdk -o subformat=streamOptimized $S.qcow2 $WORK/out.vmdk"
case_ "qcow2 -> vhdx" out.vhdx "-O vhdx $S.qcow2 $WORK/out.vhdx" "-O vhdx $S.qcow2 $WORK/out.vhdx"
case_ "vmdk streamOptimized -> qcow2" out.qcow2 "-O qcow2 $S.vmdk $WORK/out.qcow2" \
    "-O qcow2 $S.vmdk $WORK/out.qcow2"
case_ "vhdx -> qcow2" out.qcow2 "-O qcow2 $S.vhdx $WORK/out.qcow2" "-O qcow2 $S.vhdx $WORK/out.qcow2"
echo "]" >>"$CASES"

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$ROOT/bench/abrun.py" <"$CASES"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
