#!/usr/bin/env bash
# vdisk's vhost-user-blk back-end vs qemu-storage-daemon (the guest kit's 7.2), on the
# host: vdisk-vhost/examples/vhost_bench plays the VMM (one queue, memfd guest memory,
# each request's data in an indirect table of SEG-byte descriptors), so the back-ends
# are compared without an emulator. A fully allocated 256 MiB qcow2, copied fresh for
# every run, opened O_DIRECT by both; RUNS interleaved rounds (default 5); prints every
# run and the medians (IOPS; the server's CPU seconds).
#
# Usage: bench/vhost.sh [vhost_bench args]   (default: --rw write --bs 1048576 --qd 4
#        --count 1000 --seg 16384); e.g. bench/vhost.sh --rw randread --bs 4096 --qd 32 --count 20000
# Needs the guest kit (scripts/guest-kit, fetched by the guest-boot tests) for
# qemu-storage-daemon.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-5}
KIT=${KIT:-$HOME/.cache/vdisk-guest/root}
QSD=$KIT/usr/bin/qemu-storage-daemon
[ -x "$QSD" ] || { echo "bench/vhost.sh: $QSD missing (run scripts/guest-kit)" >&2; exit 1; }
LDP=$KIT/usr/lib/x86_64-linux-gnu:$KIT/lib/x86_64-linux-gnu
(cd "$ROOT" && cargo build --release -q -p vdisk-cli && cargo build --release -q -p vdisk-vhost --example vhost_bench)
BENCH=$ROOT/target/release/examples/vhost_bench
VDISK=$ROOT/target/release/vdisk
[ $# -gt 0 ] || set -- --rw write --bs 1048576 --qd 4 --count 1000 --seg 16384
W=$(mktemp -d "${BENCH_TMP:-$ROOT/target}/bench-vhost.XXXXXX")
P=""
cleanup() { [ -n "$P" ] && kill "$P" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
qemu-img create -q -f qcow2 "$W/src.qcow2" 256M
qemu-io -f qcow2 -c "write -P 0x5a 0 256M" "$W/src.qcow2" >/dev/null
SOCK=$W/vh.sock
echo "job: $* rounds=$RUNS cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)"
OUT=$W/runs.txt
for ((r = 0; r < RUNS; r++)); do
  for s in vdisk qsd; do
    rm -f "$SOCK"
    cp "$W/src.qcow2" "$W/img.qcow2"
    if [ $s = vdisk ]; then
      "$VDISK" serve --vhost-user-blk "$SOCK" --num-queues 1 -f qcow2 --cache=none "$W/img.qcow2" &
    else
      LD_LIBRARY_PATH=$LDP "$QSD" \
        --blockdev driver=file,node-name=f,filename="$W/img.qcow2",cache.direct=on \
        --blockdev driver=qcow2,node-name=q,file=f \
        --export type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path="$SOCK",writable=on,num-queues=1 &
    fi
    P=$!
    for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
    line=$("$BENCH" "$SOCK" "$@" 2>&1 | tail -1)
    cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$P/stat")
    kill "$P"; wait "$P" 2>/dev/null || true; P=""
    echo "$s $line cpu=$cpu" | tee -a "$OUT"
    case $line in *IOPS*) ;; *) echo "bench/vhost.sh: $s failed: $line" >&2; exit 1 ;; esac
  done
done
python3 - "$OUT" <<'PY'
import re, statistics, sys
d = {}
for l in open(sys.argv[1]):
    m = re.match(r'(\w+) .*?([\d.]+) IOPS cpu=([\d.]+)', l)
    if m:
        d.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))
med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in d.items()}
for k, (iops, cpu) in med.items():
    print(f"{k:6} median {iops:10.0f} IOPS  server CPU {cpu:.2f} s")
if "vdisk" in med and "qsd" in med:
    print(f"vdisk / qemu-storage-daemon: {med['vdisk'][0] / med['qsd'][0]:.2f}x")
PY
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
