#!/usr/bin/env python3
"""Writes the vhost_user seed corpus (see vdisk-vhost/tests/fuzz_support): virtio-blk
requests (virtio 1.x, little endian) as descriptor chains over a small guest memory:
header at 0, device-readable data at 0x20, device-writable data at 0x300, status
byte at 0x600 (0xaa: untouched). Run from fuzz/."""
import struct, os
def chain(flags, descs, typ, sector=0, data=b"", segs=b""):
    mem = bytearray(0x601)
    mem[0:16] = struct.pack("<IIQ", typ, 0, sector)
    payload = data or segs
    mem[0x20:0x20 + len(payload)] = payload
    mem[0x600] = 0xaa
    out = bytes([flags, len(descs)])
    for addr, length, write in descs:
        out += struct.pack(">IIB", addr, length, 1 if write else 0)
    return out + bytes(mem)
H, ST = (0, 16, False), (0x600, 1, True)
seg = lambda sector, n, f=0: struct.pack("<QII", sector, n, f)
seeds = {
    "write": chain(0, [H, (0x20, 512, False), ST], 1, 8, data=b"\x5a" * 512),
    "read": chain(0, [H, (0x300, 512, True), ST], 0, 8),
    "flush": chain(0, [H, ST], 4),
    "get_id": chain(0, [H, (0x300, 20, True), ST], 8),
    "discard": chain(2, [H, (0x20, 32, False), ST], 11, segs=seg(0, 8) + seg(64, 16)),
    "write_zeroes": chain(2, [H, (0x20, 16, False), ST], 13, segs=seg(16, 8, 1)),
    "read_only_write": chain(1, [H, (0x20, 512, False), ST], 1, 0, data=b"\x11" * 512),
    "split_header": chain(0, [(0, 8, False), (8, 8, False), (0x300, 512, True), ST], 0, 1),
    "unsupported": chain(0, [H, ST], 99),
    "no_status": chain(0, [H, (0x600, 1, False)], 0),
}
os.makedirs("corpus/vhost_user", exist_ok=True)
for n, b in seeds.items():
    open(f"corpus/vhost_user/{n}", "wb").write(b)
