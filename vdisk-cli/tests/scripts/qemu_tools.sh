#!/bin/sh
# A script written for qemu-img and qemu-io: run through vdisk's multi-call links
# and through QEMU's tools, its output (stdout and stderr) must be the same.
qemu-img create -f qcow2 a.qcow2 1M
qemu-io -c "write -q -P 7 0 64k" -c "read -v 0 16" a.qcow2 | head -1
qemu-img snapshot -c s1 a.qcow2
qemu-io -c "write -q -P 8 0 4k" a.qcow2
qemu-img snapshot -a s1 a.qcow2
qemu-io -c "read -q -P 7 0 64k" a.qcow2 && echo restored
qemu-img snapshot -d s1 a.qcow2
qemu-img snapshot -l a.qcow2
qemu-img measure -O qcow2 a.qcow2
qemu-img measure --output=json -O qcow2 --size 10G
qemu-img check -q a.qcow2 && echo clean
qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 t.qcow2
qemu-io -c "write -q -P 9 4k 4k" t.qcow2
qemu-img commit t.qcow2
qemu-io -c "read -v 4096 16" a.qcow2 | head -1
qemu-img compare a.qcow2 t.qcow2
qemu-img amend -o compat=0.10 a.qcow2
qemu-img info --output=json a.qcow2 | grep '"compat"'
qemu-img dd if=a.qcow2 of=d.raw bs=64k count=2
qemu-img compare -f raw -F raw d.raw d.raw
qemu-img info nosuch.qcow2 || echo "info failed: $?"
qemu-img snapshot -d nosuch a.qcow2 || echo "delete failed: $?"
qemu-img snapshot -c x -d y a.qcow2 || echo "mix failed: $?"
qemu-img amend -o cluster_size=4k a.qcow2 || echo "amend failed: $?"
qemu-img commit a.qcow2 || echo "commit failed: $?"
qemu-img --version | head -1 | cut -d' ' -f1-3
qemu-io --version | head -1 | cut -d' ' -f1-3
