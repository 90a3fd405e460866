#!/usr/bin/env bash
# S3: `convert` of a SIZE_MB (default 1024) qcow2 golden image (random data, fully
# allocated) from a single-node Garage on 127.0.0.1 to a local raw file, interleaved
# rounds (bench/abrun.py):
#   - vdisk convert -O raw s3://bench/g.qcow2 (parallel ranged GETs);
#   - curl --aws-sigv4 downloading the object, then qemu-img convert -O raw of the
#     download (the usual "CLI download + local convert");
# and the upload the other way: vdisk convert -O qcow2 raw -> s3 (spool + multipart)
# vs qemu-img convert to a local qcow2 + curl --aws-sigv4 -T (one PUT).
# Outputs are checked against the source once per tool. Scratch files (and Garage's
# data) go to BENCH_TMP (default /dev/shm, so the disk does not set the pace).
#
# Usage: bench/s3.sh        RUNS=5 SIZE_MB=1024 VDISK=/path/to/vdisk bench/s3.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-1024}
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
for t in garage qemu-img curl python3 openssl /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "bench/s3.sh: $t is required" >&2; exit 1; }
done

# VDISK: a vdisk binary to measure (default: build the tree's).
if [ -z "${VDISK:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p vdisk-cli)
  VDISK=$ROOT/target/release/vdisk
fi

W=$(mktemp -d "${BENCH_TMP:-/dev/shm}/bench-s3.XXXXXX")
GPID=""
cleanup() {
  [ -n "$GPID" ] && kill "$GPID" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(port)
RPC=$(port)
cat >"$W/garage.toml" <<EOF
metadata_dir = "$W/meta"
data_dir = "$W/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC"
rpc_public_addr = "127.0.0.1:$RPC"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
api_bind_addr = "127.0.0.1:$PORT"
s3_region = "garage"
EOF
G() { garage -c "$W/garage.toml" "$@"; }
RUST_LOG=warn garage -c "$W/garage.toml" server >"$W/garage.log" 2>&1 &
GPID=$!
for _ in $(seq 1 150); do G status >/dev/null 2>&1 && break; sleep 0.2; done
ID=$(G status | awk '/^ID/ {getline; print $1; exit}')
G layout assign -z dc1 -c 10G "$ID" >/dev/null
G layout apply --version 1 >/dev/null
G bucket create bench >/dev/null
KEY=$(G key create bench)
KID=$(awk '/^Key ID:/ {print $3}' <<<"$KEY")
KSEC=$(awk '/^Secret key:/ {print $3}' <<<"$KEY")
G bucket allow --read --write --owner bench --key bench >/dev/null
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_REGION=garage
export AWS_ACCESS_KEY_ID=$KID AWS_SECRET_ACCESS_KEY=$KSEC
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

head -c "$((SIZE_MB << 20))" /dev/urandom >"$W/src.raw"
qemu-img convert -f raw -O qcow2 "$W/src.raw" "$W/g.qcow2"
# The golden image's bytes as they are.
"$VDISK" convert -f raw -O raw "$W/g.qcow2" s3://bench/g.qcow2
OBJ=$AWS_ENDPOINT_URL/bench/g.qcow2
# Garage wants the payload hash header; curl signs it as given.
SIG="--aws-sigv4 aws:amz:garage:s3 --user $KID:$KSEC -H x-amz-content-sha256:UNSIGNED-PAYLOAD"

OUT=$W/out
CASES=$W/cases.json
cat >"$CASES" <<EOF
[
 {"name": "convert ${SIZE_MB} MiB qcow2 Garage -> local raw", "prepare": "rm -f $OUT.raw $OUT.dl",
  "check": "cmp -s $W/src.raw $OUT.raw",
  "cmds": [["vdisk", "$VDISK convert -O raw s3://bench/g.qcow2 $OUT.raw"],
           ["curl+qemu-img", "sh -c 'curl -sf $SIG -o $OUT.dl $OBJ && qemu-img convert -f qcow2 -O raw $OUT.dl $OUT.raw'"]]},
 {"name": "convert ${SIZE_MB} MiB local raw -> qcow2 in Garage", "prepare": "rm -f $OUT.qcow2",
  "check": "$VDISK compare -f raw -F qcow2 $W/src.raw s3://bench/up.qcow2",
  "cmds": [["vdisk", "$VDISK convert -f raw -O qcow2 $W/src.raw s3://bench/up.qcow2"],
           ["qemu-img+curl", "sh -c 'qemu-img convert -f raw -O qcow2 $W/src.raw $OUT.qcow2 && curl -sf $SIG -T $OUT.qcow2 $AWS_ENDPOINT_URL/bench/up.qcow2'"]]}
]
EOF
echo "cpus=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg) runs=$RUNS size=${SIZE_MB}MiB"
python3 "$ROOT/bench/abrun.py" <"$CASES"
