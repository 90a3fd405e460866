#!/usr/bin/env bash
# NBD read throughput over TLS vs plain, vdisk serve vs qemu-nbd, one client (nbdcopy,
# libnbd/GnuTLS) for all four: SIZE_MB of random data read to null:, REPS interleaved
# rounds (A B C D A B C D ...), medians of wall time and of the server's CPU seconds.
# Usage: [VDISK=target/release/vdisk] [SIZE_MB=256] [REPS=5] bench/nbd-tls.sh
set -euo pipefail
VDISK=${VDISK:-$(cd "$(dirname "$0")/.." && pwd)/target/release/vdisk}
SIZE_MB=${SIZE_MB:-256}
REPS=${REPS:-5}
D=$(mktemp -d)
trap 'kill $(cat $D/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf $D' EXIT
cd "$D"
mkdir srv cli
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=bench CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout srv/server-key.pem -out s.csr -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >s.ext
openssl x509 -req -in s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out srv/server-cert.pem -days 2 -extfile s.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout cli/client-key.pem -out c.csr -subj "/CN=client" 2>/dev/null
openssl x509 -req -in c.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out cli/client-cert.pem -days 2 2>/dev/null
cp ca-cert.pem srv/; cp ca-cert.pem cli/
head -c $((SIZE_MB << 20)) /dev/urandom >img.raw
X=tls-creds-x509,id=t0,dir=$D/srv,endpoint=server
start() { # name port cmd...
  local n=$1 p=$2; shift 2
  "$@" -p "$p" -b 127.0.0.1 img.raw & echo $! >"$n.pid"
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null && return; sleep 0.1; done
  echo "$n did not start" >&2; exit 1
}
start vplain 20101 "$VDISK" serve -t -e 0 -r -f raw
start vtls 20102 "$VDISK" serve -t -e 0 -r -f raw --object "$X" --tls-creds t0
start qplain 20103 qemu-nbd -t -e 0 -r -f raw
start qtls 20104 qemu-nbd -t -e 0 -r -f raw --object "$X" --tls-creds t0
url() { case $1 in *tls) echo "nbds://localhost:$2/?tls-certificates=$D/cli" ;; *) echo "nbd://localhost:$2/" ;; esac; }
cpu() { awk '{print ($14+$15)/100}' /proc/"$(cat "$1.pid")"/stat; }
declare -A W C
for r in $(seq "$REPS"); do
  for n in vplain:20101 vtls:20102 qplain:20103 qtls:20104; do
    name=${n%%:*} port=${n##*:}
    c0=$(cpu "$name"); t0=$(date +%s.%N)
    nbdcopy "$(url "$name" "$port")" null:
    t1=$(date +%s.%N); c1=$(cpu "$name")
    W[$name]+="$(echo "$t1 - $t0" | bc) "; C[$name]+="$(echo "$c1 - $c0" | bc) "
  done
done
med() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $SIZE_MB MiB, $REPS interleaved rounds, medians"
for name in vplain vtls qplain qtls; do
  w=$(echo "${W[$name]}" | med); c=$(echo "${C[$name]}" | med)
  printf '%-7s wall %6.3f s  %7.0f MiB/s  server CPU %6.3f s\n' "$name" "$w" "$(echo "$SIZE_MB / $w" | bc -l)" "$c"
done
