#!/bin/sh
# Makes the seed corpora from qemu-img/qemu-io-made images of every layout (small
# clusters keep each file a few KiB). Run from fuzz/; needs qemu-img/qemu-io 10.
set -eu
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT
q() { qemu-img "$@"; }
io() { qemu-io "$@" >/dev/null; }
c=corpus/qcow2; d=corpus/qed; mkdir -p "$c" "$d"
mk() { name=$1; shift; q create -q -f qcow2 "$@" "$t/$name" 64K; }
mk v2 -o compat=0.10,cluster_size=512
mk v3 -o cluster_size=512
mk rc1 -o cluster_size=512,refcount_bits=1
mk rc64 -o cluster_size=512,refcount_bits=64
mk extl2 -o cluster_size=16k,extended_l2=on
mk lazy -o cluster_size=512,lazy_refcounts=on
mk zstd -o cluster_size=512,compression_type=zstd
for f in v2 v3 rc1 rc64 extl2 lazy zstd; do
  io -f qcow2 -c "write -P 1 0 1k" -c "write -P 2 33k 3k" -c "write -z 8k 2k" "$t/$f"
done
q create -q -f qcow2 -o cluster_size=512,backing_file=base.qcow2,backing_fmt=qcow2 -u "$t/backing" 64K
q create -q -f raw "$t/src.raw" 64K; io -f raw -c "write -P 7 0 20k" "$t/src.raw"
q convert -c -O qcow2 -o cluster_size=512 "$t/src.raw" "$t/compressed"
cp "$t/v3" "$t/snap"; q snapshot -c s1 "$t/snap"; io -f qcow2 -c "write -P 9 0 2k" "$t/snap"
cp "$t/v3" "$t/bitmap"; q bitmap --add "$t/bitmap" b0; io -f qcow2 -c "write -P 3 4k 1k" "$t/bitmap"
for f in v2 v3 rc1 rc64 extl2 lazy zstd backing compressed snap bitmap; do cp "$t/$f" "$c/$f"; done
q create -q -f qed -o cluster_size=4096,table_size=2 "$t/qed" 64K
cp "$t/qed" "$d/empty"
io -f qed -c "write -P 1 0 1k" -c "write -P 2 33k 3k" -c "write -z 8k 4k" "$t/qed"; cp "$t/qed" "$d/data"
q create -q -f qed -o cluster_size=4096,table_size=2,backing_file=base.qed,backing_fmt=qed -u "$t/qedb" 64K
cp "$t/qedb" "$d/backing"
ls -l "$c" "$d"
