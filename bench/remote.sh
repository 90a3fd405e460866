#!/usr/bin/env bash
# Remote sources: `convert` of a fully allocated image (random data, SIZE_MB, default
# 1024) from an NBD export and from nginx, interleaved rounds (bench/abrun.py):
#   - NBD (qemu-nbd -r, Unix socket): vdisk convert vs qemu-img convert, same server,
#     to a raw file and to qcow2; and the same to raw from nbdkit's file plugin (a
#     multi-threaded server advertising CAN_MULTI_CONN), where vdisk also runs with its
#     `connections=4` (QEMU's client has no such option);
#   - HTTP (nginx on 127.0.0.1): vdisk convert vs curl downloading the file (this
#     qemu-img has no curl module) and vs curl + qemu-img convert to qcow2.
# Every tool's output is checked against the source once. Scratch files go to
# BENCH_TMP (default /dev/shm, so the disk does not set the pace).
#
# Usage: bench/remote.sh        RUNS=5 SIZE_MB=1024 bench/remote.sh
#        RUNS=5 NBD_ONLY=1 VDISK_BASE=/path/to/old/vdisk bench/remote.sh  (NBD, before/after)
#        RUNS=5 HTTP_ONLY=1 bench/remote.sh                               (nginx only)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-1024}

for t in qemu-nbd nbdkit qemu-img curl python3 /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/remote.sh: $t is required" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "bench/remote.sh: nginx is required" >&2; exit 1; }

(cd "$ROOT" && cargo build --release -q -p vdisk-cli)
VDISK=$ROOT/target/release/vdisk

W=$(mktemp -d "${BENCH_TMP:-/dev/shm}/bench-remote.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

mkdir -p "$W/www" "$W/ng/tmp"
head -c "$((SIZE_MB << 20))" /dev/urandom >"$W/www/data.raw"

SOCK=$W/nbd.sock
qemu-nbd -r -t -f raw -k "$SOCK" -x d "$W/www/data.raw" &
PIDS+=($!)
NBD="nbd+unix:///d?socket=$SOCK"
KSOCK=$W/nbdkit.sock
nbdkit -r -f -U "$KSOCK" -e d file file="$W/www/data.raw" &
PIDS+=($!)
KNBD="nbd+unix:///d?socket=$KSOCK"
KNBD4="json:{\\\"driver\\\":\\\"raw\\\",\\\"file\\\":{\\\"driver\\\":\\\"nbd\\\",\\\"server\\\":{\\\"type\\\":\\\"unix\\\",\\\"path\\\":\\\"$KSOCK\\\"},\\\"export\\\":\\\"d\\\",\\\"connections\\\":4}}"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$W/ng/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1;
error_log $W/ng/error.log; pid $W/ng/nginx.pid;
events { worker_connections 64; }
http { access_log off; sendfile on;
  client_body_temp_path $W/ng/tmp; proxy_temp_path $W/ng/tmp; fastcgi_temp_path $W/ng/tmp;
  uwsgi_temp_path $W/ng/tmp; scgi_temp_path $W/ng/tmp;
  server { listen 127.0.0.1:$PORT; root $W/www; } }
EOF
"$NGINX" -c "$W/ng/nginx.conf" -p "$W/ng" &
PIDS+=($!)
URL="http://127.0.0.1:$PORT/data.raw"

for _ in $(seq 1 250); do
  [ -S "$SOCK" ] && [ -S "$KSOCK" ] && curl -sfI "$URL" >/dev/null 2>&1 && break
  sleep 0.02
done

SRC=$W/www/data.raw
OUT=$W/out
CMP_RAW="cmp -s $SRC $OUT.raw"
CMP_QCOW="qemu-img compare -q -f raw $SRC $OUT.qcow2"
CASES=$W/cases.json
# VDISK_BASE=/path/to/older/vdisk adds that build to the NBD cases (before/after).
BASE_RAW="" BASE_QCOW=""
if [ -n "${VDISK_BASE:-}" ]; then
  BASE_RAW=", [\"vdisk-base\", \"$VDISK_BASE convert -O raw '$NBD' $OUT.raw\"]"
  BASE_QCOW=", [\"vdisk-base\", \"$VDISK_BASE convert -O qcow2 '$NBD' $OUT.qcow2\"]"
fi
cat >"$CASES" <<EOF
[
 {"name": "convert ${SIZE_MB} MiB NBD -> raw", "prepare": "rm -f $OUT.raw",
  "check": "$CMP_RAW",
  "cmds": [["vdisk", "$VDISK convert -O raw '$NBD' $OUT.raw"],
           ["qemu-img", "qemu-img convert -O raw '$NBD' $OUT.raw"]$BASE_RAW]},
 {"name": "convert ${SIZE_MB} MiB NBD -> qcow2", "prepare": "rm -f $OUT.qcow2",
  "check": "$CMP_QCOW",
  "cmds": [["vdisk", "$VDISK convert -O qcow2 '$NBD' $OUT.qcow2"],
           ["qemu-img", "qemu-img convert -O qcow2 '$NBD' $OUT.qcow2"]$BASE_QCOW]},
 {"name": "convert ${SIZE_MB} MiB NBD (nbdkit) -> raw", "prepare": "rm -f $OUT.raw",
  "check": "$CMP_RAW",
  "cmds": [["vdisk", "$VDISK convert -O raw '$KNBD' $OUT.raw"],
           ["qemu-img", "qemu-img convert -O raw '$KNBD' $OUT.raw"],
           ["vdisk connections=4", "$VDISK convert -O raw '$KNBD4' $OUT.raw"]]},
 {"name": "${SIZE_MB} MiB from nginx -> raw", "prepare": "rm -f $OUT.raw",
  "check": "$CMP_RAW",
  "cmds": [["vdisk", "$VDISK convert -f raw -O raw $URL $OUT.raw"],
           ["curl", "curl -sf -o $OUT.raw $URL"]]},
 {"name": "${SIZE_MB} MiB from nginx -> qcow2", "prepare": "rm -f $OUT.qcow2 $OUT.dl",
  "check": "$CMP_QCOW",
  "cmds": [["vdisk", "$VDISK convert -f raw -O qcow2 $URL $OUT.qcow2"],
           ["curl+qemu-img", "sh -c 'curl -sf -o $OUT.dl $URL && qemu-img convert -f raw -O qcow2 $OUT.dl $OUT.qcow2'"]]}
]
EOF
if [ -n "${HTTP_ONLY:-}" ]; then
  # HTTP_ONLY=1: only the nginx cases.
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); json.dump(c[3:], open(sys.argv[1],"w"))' "$CASES"
fi
if [ -n "${NBD_ONLY:-}" ]; then
  # NBD_ONLY=1: only the NBD cases.
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); json.dump(c[:3], open(sys.argv[1],"w"))' "$CASES"
fi
echo "cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg) runs=$RUNS size=${SIZE_MB}MiB"
python3 "$ROOT/bench/abrun.py" <"$CASES"
