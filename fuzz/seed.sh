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

# The table targets (issue 14): templates whose snapshot table / bitmap directory is
# the file's tail, and seeds = a u16 BE count + that tail.
q create -q -f qcow2 -o cluster_size=512 "$t/snaps" 64K
io -f qcow2 -c "write -P 1 0 2k" "$t/snaps"; q snapshot -c s1 "$t/snaps"
io -f qcow2 -c "write -P 9 0 1k" "$t/snaps"; q snapshot -c s2 "$t/snaps"
q create -q -f qcow2 -o cluster_size=512 "$t/bms" 64K
q bitmap --add "$t/bms" b0; q bitmap --add -g 4096 "$t/bms" b1
io -f qcow2 -c "write -P 3 4k 1k" "$t/bms"
mkdir -p templates corpus/qcow2_snapshot_table corpus/qcow2_bitmap_directory corpus/luks_header
cp "$t/snaps" templates/snapshots.qcow2; cp "$t/bms" templates/bitmaps.qcow2
be64() { od -A n -t u1 -j "$2" -N 8 "$1" | awk '{v=0; for(i=1;i<=NF;i++) v=v*256+$i; print v}'; }
tail_seed() { # template offset count out
  { printf "\\000\\$(printf %03o "$3")"; tail -c +$(($2 + 1)) "$1"; } > "$4"
}
so=$(be64 templates/snapshots.qcow2 64)
tail_seed templates/snapshots.qcow2 "$so" 2 corpus/qcow2_snapshot_table/two
tail_seed templates/snapshots.qcow2 "$so" 1 corpus/qcow2_snapshot_table/one
tail_seed templates/snapshots.qcow2 "$so" 0 corpus/qcow2_snapshot_table/none
# The bitmaps extension is the first one qemu-img writes here (data at 112 + 8).
bo=$(be64 templates/bitmaps.qcow2 136)
tail_seed templates/bitmaps.qcow2 "$bo" 2 corpus/qcow2_bitmap_directory/two
# The directory's size must match its entries: keep b0's 32-byte entry alone.
tail_seed templates/bitmaps.qcow2 "$bo" 1 "$t/one"; head -c 34 "$t/one" > corpus/qcow2_bitmap_directory/one
# LUKS1 volumes made with a 1 ms iteration time (the target unlocks with "pw"): the
# header alone, and the header with slot 0's key material.
sec="--object secret,id=s,data=pw"
q create -q -f luks $sec -o key-secret=s,iter-time=1,cipher-alg=aes-128 "$t/l1" 64K
q create -q -f luks $sec -o key-secret=s,iter-time=1,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1 "$t/l2" 64K
head -c 592 "$t/l1" > corpus/luks_header/xts_header
head -c 592 "$t/l2" > corpus/luks_header/cbc_essiv_header
head -c $((4096 + 32 * 4000)) "$t/l1" > corpus/luks_header/xts_slot0
head -c $((4096 + 16 * 4000)) "$t/l2" > corpus/luks_header/cbc_essiv_slot0
ls -l corpus/qcow2_snapshot_table corpus/qcow2_bitmap_directory corpus/luks_header
# VMDK, VHD, VHDX, VDI: every subformat qemu-img makes, empty and with data (a descriptor
# file stands alone: its extents cannot be opened from memory).
# These formats' files are mostly zeros (VHDX: MiBs): the targets read a sparse
# encoding of the file (fuzz_support::sparse_file), made here.
sparse() { python3 - "$1" "$2" <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
out = [struct.pack('<I', (len(d) + 511) // 512)]
for i in range(0, len(d), 4096):
    b = d[i:i + 4096].rstrip(b'\0')
    if b:
        out.append(struct.pack('<IH', i, len(b)) + b)
open(sys.argv[2], 'wb').write(b''.join(out))
PY
}
m=corpus/vmdk; p=corpus/vpc; x=corpus/vhdx; v=corpus/vdi; mkdir -p "$m" "$p" "$x" "$v"
data() { io -f "$1" -c "write -P 1 0 1k" -c "write -P 2 33k 3k" -c "write -z 8k 4k" "$2"; }
for s in monolithicSparse streamOptimized; do
  q create -q -f vmdk -o subformat=$s "$t/$s.vmdk" 64K; sparse "$t/$s.vmdk" "$m/$s-empty"
done
data vmdk "$t/monolithicSparse.vmdk"; sparse "$t/monolithicSparse.vmdk" "$m/monolithicSparse-data"
q convert -O vmdk -o subformat=streamOptimized "$t/src.raw" "$t/so.vmdk"; sparse "$t/so.vmdk" "$m/streamOptimized-data"
q create -q -f vmdk -o zeroed_grain=on "$t/zg.vmdk" 64K; data vmdk "$t/zg.vmdk"; sparse "$t/zg.vmdk" "$m/zeroed-grain"
q create -q -f vmdk -o adapter_type=lsilogic,hwversion=6 -b "$t/zg.vmdk" -F vmdk "$t/child.vmdk"
sparse "$t/child.vmdk" "$m/child"
for s in monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat; do
  q create -q -f vmdk -o subformat=$s "$t/$s.vmdk" 64K; sparse "$t/$s.vmdk" "$m/$s-descriptor"
done
for s in dynamic fixed; do
  q create -q -f vpc -o subformat=$s "$t/$s.vhd" 64K; sparse "$t/$s.vhd" "$p/$s-empty"
  data vpc "$t/$s.vhd"; sparse "$t/$s.vhd" "$p/$s-data"
done
q create -q -f vpc -o subformat=dynamic,force_size=on "$t/fs.vhd" 64K; sparse "$t/fs.vhd" "$p/force-size"
q create -q -f vdi "$t/d.vdi" 64K; sparse "$t/d.vdi" "$v/dynamic-empty"
data vdi "$t/d.vdi"; sparse "$t/d.vdi" "$v/dynamic-data"
for s in dynamic fixed; do
  q create -q -f vhdx -o subformat=$s,log_size=1M,block_size=1M "$t/$s.vhdx" 64K; sparse "$t/$s.vhdx" "$x/$s-empty"
  data vhdx "$t/$s.vhdx"; sparse "$t/$s.vhdx" "$x/$s-data"
done
ls -l "$c" "$d" "$m" "$p" "$x" "$v"
