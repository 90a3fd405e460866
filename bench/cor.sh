#!/usr/bin/env bash
# Copy-on-read and several NBD connections (issue 12 parts 4 and 1), interleaved
# rounds (bench/abrun.py):
#   - the second full read of a qcow2 overlay over an HTTP golden qcow2 (nginx on
#     127.0.0.1, SIZE_MB of random data): a plain overlay (every read crosses the
#     network again) vs an overlay filled by one `vdisk io -C` pass (reads stay local);
#     nginx's access log counts the requests of one read of each (load-independent);
#   - `convert` of SIZE_MB from a `qemu-nbd -e 4` export (CAN_MULTI_CONN) to raw with
#     connections=1 vs connections=4 (same server, Unix socket).
# Scratch files go to BENCH_TMP (default /dev/shm).
#
# Usage: bench/cor.sh        RUNS=5 SIZE_MB=256 bench/cor.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-256}

for t in qemu-nbd qemu-img curl python3 /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/cor.sh: $t is required" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "bench/cor.sh: nginx is required" >&2; exit 1; }

(cd "$ROOT" && cargo build --release -q -p vdisk-cli)
VDISK=$ROOT/target/release/vdisk

W=$(mktemp -d "${BENCH_TMP:-/dev/shm}/bench-cor.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

mkdir -p "$W/www" "$W/ng/tmp"
head -c "$((SIZE_MB << 20))" /dev/urandom >"$W/data.raw"
qemu-img convert -f raw -O qcow2 "$W/data.raw" "$W/www/g.qcow2"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$W/ng/nginx.conf" <<NG
daemon off; master_process off; worker_processes 1;
error_log $W/ng/error.log; pid $W/ng/nginx.pid;
events { worker_connections 64; }
http { log_format bytes '\$body_bytes_sent'; access_log $W/ng/access.log bytes; sendfile on;
  client_body_temp_path $W/ng/tmp; proxy_temp_path $W/ng/tmp; fastcgi_temp_path $W/ng/tmp;
  uwsgi_temp_path $W/ng/tmp; scgi_temp_path $W/ng/tmp;
  server { listen 127.0.0.1:$PORT; root $W/www; } }
NG
"$NGINX" -c "$W/ng/nginx.conf" -p "$W/ng" &
PIDS+=($!)
URL="http://127.0.0.1:$PORT/g.qcow2"
SOCK=$W/nbd.sock
qemu-nbd -r -t -e 4 -f raw -k "$SOCK" "$W/data.raw" &
PIDS+=($!)
for _ in $(seq 1 250); do
  [ -S "$SOCK" ] && curl -sfI "$URL" >/dev/null 2>&1 && break
  sleep 0.02
done
nbd() {
  echo "--image-opts driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$SOCK,file.connections=$1"
}

cd "$W"
for t in plain cor; do
  "$VDISK" create -q -f qcow2 -b "$URL" -F qcow2 $t.qcow2
done
"$VDISK" io -C -c "read 0 ${SIZE_MB}M" cor.qcow2 >/dev/null
reqs() {
  local n0
  n0=$(wc -l <"$W/ng/access.log")
  "$VDISK" io -c "read 0 ${SIZE_MB}M" "$1" >/dev/null
  tail -n +"$((n0 + 1))" "$W/ng/access.log" | awk '{n++; b+=$1} END {printf "%d requests, %d bytes", n, b}'
}
echo "one full read: plain overlay $(reqs plain.qcow2); after copy-on-read $(reqs cor.qcow2)"

CASES=$W/cases.json
cat >"$CASES" <<EOF2
[
 {"name": "second full read of ${SIZE_MB} MiB over HTTP",
  "cmds": [["copy-on-read overlay", "$VDISK io -c 'read 0 ${SIZE_MB}M' $W/cor.qcow2"],
           ["plain overlay", "$VDISK io -c 'read 0 ${SIZE_MB}M' $W/plain.qcow2"]]},
 {"name": "convert ${SIZE_MB} MiB NBD (qemu-nbd -e 4) -> raw", "prepare": "rm -f $W/out.raw",
  "check": "cmp -s $W/data.raw $W/out.raw",
  "cmds": [["connections=4", "$VDISK convert -O raw $(nbd 4) $W/out.raw"],
           ["connections=1", "$VDISK convert -O raw $(nbd 1) $W/out.raw"]]}
]
EOF2
echo "cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg) runs=$RUNS size=${SIZE_MB}MiB"
python3 "$ROOT/bench/abrun.py" <"$CASES"
