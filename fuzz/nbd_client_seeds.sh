#!/bin/sh
# Records the nbd_client seed corpus: every byte real servers (qemu-nbd 10, nbdkit)
# send to vdisk's NBD client while it runs the target's session (fuzz_support::
# nbd_session), through the recording proxy of the ignored test
# `record_nbd_client_seed`. Run from fuzz/; needs qemu-img, qemu-nbd, nbdkit.
set -eu
t=$(mktemp -d); pid=
trap 'test -n "$pid" && kill $pid 2>/dev/null; rm -rf "$t"' EXIT
out=$(pwd)/corpus/nbd_client; mkdir -p "$out"
qemu-img create -q -f qcow2 "$t/img.qcow2" 64K
qemu-io -f qcow2 -c "write -P 1 4k 4k" "$t/img.qcow2" >/dev/null
rec() { # name, then the server command (it must listen on $t/s)
  name=$1; shift; rm -f "$t/s"
  "$@" & pid=$!
  i=0; while [ ! -S "$t/s" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  (cd .. && VDISK_NBD_UPSTREAM="$t/s" VDISK_SEED_OUT="$out/$name" nice cargo test --release -q -j 1 \
    -p vdisk --test fuzz_replay -- --ignored record_nbd_client_seed >/dev/null)
  kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; pid=
}
rec qemu_nbd_qcow2 qemu-nbd -k "$t/s" -f qcow2 "$t/img.qcow2"
rec qemu_nbd_depth qemu-nbd -k "$t/s" -A -f qcow2 "$t/img.qcow2"
rec qemu_nbd_readonly qemu-nbd -k "$t/s" -r -f qcow2 "$t/img.qcow2"
rec nbdkit_memory nbdkit -f -U "$t/s" memory 64K
rec nbdkit_no_sr nbdkit -f --no-sr -U "$t/s" memory 64K
rec nbdkit_oldstyle nbdkit -f -o -U "$t/s" memory 64K
rec nbdkit_not_fixed nbdkit -f --mask-handshake=0 -U "$t/s" memory 64K
rec nbdkit_blocksize nbdkit -f -U "$t/s" --filter=blocksize-policy memory 64K \
  blocksize-minimum=4096 blocksize-preferred=65536 blocksize-maximum=65536
ls -l "$out"
