#!/usr/bin/env bash
# vdisk vs qemu-img, side by side in one run (issue #2 item 8).
#
# Builds vdisk in release mode, makes test images in a temporary directory on the same
# disk as the build (override with BENCH_TMP), runs every case interleaved (vdisk,
# [vdisk-base,] qemu-img, order rotated each round; bench/abrun.py) and reports medians
# of wall and CPU time and the peak RSS of each tool; checks that every tool produced
# the right guest contents, and writes bench/results-qemu-img.md.
#
# Knobs: RUNS (rounds, default 5), SIZE_MB (image size, default 512), OUT (results
# file), BENCH_TMP (where the scratch directory goes), VDISK_BASE (an older vdisk
# binary to compare with, e.g. one built from the previous release).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-512}
OUT=${OUT:-$ROOT/bench/results-qemu-img.md}
SIZE=$((SIZE_MB << 20))

for tool in jq python3 qemu-img qemu-io /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

echo "== building vdisk (release)" >&2
(cd "$ROOT" && cargo build --release -q -p vdisk-cli)
VDISK=$ROOT/target/release/vdisk

mkdir -p "${BENCH_TMP:-$ROOT/target}"
WORK=$(mktemp -d "${BENCH_TMP:-$ROOT/target}/bench-qemu-img.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

NOTES=()
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# Hand-written analysis below this marker in the results file survives re-runs.
MARKER='<!-- analysis: kept across runs -->'
KEEP=""
if [ -f "$OUT" ] && grep -qF "$MARKER" "$OUT"; then
    KEEP=$(sed -n "/$MARKER/,\$p" "$OUT")
fi

# Whether vdisk can open and read an image of this format yet.
have_fmt() {
    local f=$WORK/probe.$1
    qemu-img create -q -f "$1" "$f" 1M
    "$VDISK" io -f "$1" -r -c 'read -q 0 512' "$f" >/dev/null 2>&1
}

CASES=$WORK/cases.json
echo "[" >"$CASES"
FIRST=1
# bench_case NAME PREPARE VDISK_ARGS QEMU_CMD [CHECK]
# VDISK_ARGS are the vdisk arguments (run with the build under test and, when
# VDISK_BASE is set, with that older binary too); CHECK, if given, must succeed after
# each tool's first run.
bench_case() {
    local name=$1 prepare=$2 vargs=$3 qcmd=$4 check=${5:-}
    [ $FIRST = 1 ] || echo "," >>"$CASES"
    FIRST=0
    local cmds
    cmds=$(jq -n --arg v "'$VDISK' $vargs" --arg q "$qcmd" --arg b "${VDISK_BASE:+'$VDISK_BASE' $vargs}" \
        '[["vdisk", $v]] + (if $b != "" then [["vdisk-base", $b]] else [] end) + [["qemu-img", $q]]')
    jq -n --arg n "$name" --arg p "$prepare" --arg c "$check" --argjson cmds "$cmds" \
        '{name: $n, prepare: $p, check: $c, cmds: $cmds}' >>"$CASES"
}

echo "== making a ${SIZE_MB} MiB image, random data in about half of the 1 MiB chunks" >&2
SRC_RAW=$WORK/src.raw
truncate -s "$SIZE" "$SRC_RAW"
RANDOM=42
for ((i = 0; i < SIZE_MB; i++)); do
    if ((RANDOM % 2)); then
        dd if=/dev/urandom of="$SRC_RAW" bs=1M count=1 seek="$i" conv=notrunc status=none
    fi
done
SRC_QCOW2=$WORK/src.qcow2
qemu-img convert -f raw -O qcow2 "$SRC_RAW" "$SRC_QCOW2"
DST=$WORK/dst

HAVE_QCOW2=0
HAVE_QED=0
have_fmt qcow2 && HAVE_QCOW2=1
have_fmt qed && HAVE_QED=1
[ $HAVE_QCOW2 = 1 ] || NOTES+=("- qcow2: vdisk cannot open qcow2 images in this build; qcow2 cases skipped.")
[ $HAVE_QED = 1 ] || NOTES+=("- QED: vdisk cannot open QED images in this build; QED cases skipped.")

# Convert: qemu-img's default output cache mode is unsafe (no flush); vdisk's own
# default is used as shipped.
if [ $HAVE_QCOW2 = 1 ]; then
    bench_case "convert qcow2→raw (${SIZE_MB} MiB, half data)" \
        "rm -f '$DST'" \
        "convert -f qcow2 -O raw '$SRC_QCOW2' '$DST'" \
        "qemu-img convert -f qcow2 -O raw '$SRC_QCOW2' '$DST'" \
        "qemu-img compare -q -f raw -F raw '$SRC_RAW' '$DST'"
    bench_case "convert raw→qcow2 (${SIZE_MB} MiB, half data)" \
        "rm -f '$DST'" \
        "convert -f raw -O qcow2 '$SRC_RAW' '$DST'" \
        "qemu-img convert -f raw -O qcow2 '$SRC_RAW' '$DST'" \
        "qemu-img check -q -f qcow2 '$DST' && qemu-img compare -q -f raw -F qcow2 '$SRC_RAW' '$DST'"
fi

# Allocating writes: 64 KiB requests at depth 16 into an empty image.
NREQ=$((SIZE / 65536))
EMPTY=$WORK/empty
for fmt in qcow2 qed; do
    [ $fmt = qcow2 ] && [ $HAVE_QCOW2 = 0 ] && continue
    [ $fmt = qed ] && [ $HAVE_QED = 0 ] && continue
    bench_case "bench -w 64 KiB allocating, empty $fmt (-c $NREQ -d 16)" \
        "rm -f '$EMPTY' && qemu-img create -q -f $fmt '$EMPTY' $SIZE" \
        "bench -w -f $fmt -c $NREQ -s 64k -d 16 --pattern=0x5a '$EMPTY'" \
        "qemu-img bench -w -f $fmt -c $NREQ -s 64k -d 16 --pattern=0x5a '$EMPTY'" \
        "qemu-img check -q -f $fmt '$EMPTY' && qemu-io -f $fmt -r -c 'read -q -P 0x5a 0 $SIZE' '$EMPTY' | (! grep -q .)"
done

# Rewrites: 4 KiB requests at depth 16 over a fully preallocated image, and a raw file.
NREQ4=$((SIZE / 4096))
PRE_RAW=$WORK/pre.raw
qemu-img create -q -f raw -o preallocation=full "$PRE_RAW" "$SIZE"
bench_case "bench -w 4 KiB rewrite, preallocated raw (-c $NREQ4 -d 16)" \
    ":" \
    "bench -w -f raw -c $NREQ4 -s 4k -d 16 --pattern=0x33 '$PRE_RAW'" \
    "qemu-img bench -w -f raw -c $NREQ4 -s 4k -d 16 --pattern=0x33 '$PRE_RAW'" \
    "qemu-io -f raw -r -c 'read -q -P 0x33 0 $SIZE' '$PRE_RAW' | (! grep -q .)"
bench_case "bench 4 KiB read, raw (-c $NREQ4 -d 16)" \
    ":" \
    "bench -f raw -c $NREQ4 -s 4k -d 16 '$PRE_RAW'" \
    "qemu-img bench -f raw -c $NREQ4 -s 4k -d 16 '$PRE_RAW'"
if [ $HAVE_QCOW2 = 1 ]; then
    PRE_Q=$WORK/pre.qcow2
    qemu-img create -q -f qcow2 -o preallocation=full "$PRE_Q" "$SIZE"
    bench_case "bench -w 4 KiB rewrite, preallocated qcow2 (-c $NREQ4 -d 16)" \
        ":" \
        "bench -w -f qcow2 -c $NREQ4 -s 4k -d 16 --pattern=0x33 '$PRE_Q'" \
        "qemu-img bench -w -f qcow2 -c $NREQ4 -s 4k -d 16 --pattern=0x33 '$PRE_Q'" \
        "qemu-img check -q -f qcow2 '$PRE_Q' && qemu-io -f qcow2 -r -c 'read -q -P 0x33 0 $SIZE' '$PRE_Q' | (! grep -q .)"
    bench_case "bench 4 KiB read, preallocated qcow2 (-c $NREQ4 -d 16)" \
        ":" \
        "bench -f qcow2 -c $NREQ4 -s 4k -d 16 '$PRE_Q'" \
        "qemu-img bench -f qcow2 -c $NREQ4 -s 4k -d 16 '$PRE_Q'"
    # Through O_DIRECT the disk, not the page cache, sets the pace.
    NDIRECT=$((NREQ4 / 4))
    bench_case "bench -w 4 KiB rewrite, preallocated qcow2, -t none (-c $NDIRECT -d 16)" \
        ":" \
        "bench -w -t none -f qcow2 -c $NDIRECT -s 4k -d 16 --pattern=0x44 '$PRE_Q'" \
        "qemu-img bench -w -t none -f qcow2 -c $NDIRECT -s 4k -d 16 --pattern=0x44 '$PRE_Q'" \
        "qemu-img check -q -f qcow2 '$PRE_Q' && qemu-io -f qcow2 -r -c 'read -q -P 0x44 0 $((NDIRECT * 4096))' '$PRE_Q' | (! grep -q .)"
    bench_case "bench 4 KiB read, preallocated qcow2, -t none (-c $NDIRECT -d 16)" \
        ":" \
        "bench -t none -f qcow2 -c $NDIRECT -s 4k -d 16 '$PRE_Q'" \
        "qemu-img bench -t none -f qcow2 -c $NDIRECT -s 4k -d 16 '$PRE_Q'"
fi

{
    echo "# vdisk vs qemu-img"
    echo
    echo "Generated by \`bench/qemu-img.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'),"
    echo "commit \`$(cd "$ROOT" && git rev-parse --short HEAD)\`, $(qemu-img --version | head -n 1),"
    echo "$(nproc) CPUs, $(uname -sr). Image size ${SIZE_MB} MiB; $RUNS interleaved rounds,"
    echo "medians (file systems warm: images are in the page cache); peak RSS from the kernel's rusage."
    echo "Ratio = other tool's time / vdisk time (> 1: vdisk is faster). Load average at start"
    echo "$LOAD_START (the host is shared: expect noise; each row's last column gives the load"
    echo "when it started and ended)."
    echo
    echo "Wall time is what a user waits for but swings with the other jobs on the host; CPU"
    echo "time (user + system, median per run) is steadier and shows the work each tool does."
    echo
    echo "]" >>"$CASES"
    python3 "$ROOT/bench/abrun.py" <"$CASES"
    echo
    echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
    if [ ${#NOTES[@]} -gt 0 ]; then
        echo
        echo "Notes:"
        printf '%s\n' "${NOTES[@]}"
    fi
    if [ -n "$KEEP" ]; then
        echo
        echo "$KEEP"
    fi
} >"$OUT"
cat "$OUT"
