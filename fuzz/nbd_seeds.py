#!/usr/bin/env python3
"""Writes the nbd_server seed corpus: client byte streams of the NBD protocol
(doc/proto.md): fixed-newstyle handshakes with EXPORT_NAME, GO, LIST, ABORT,
STRUCTURED_REPLY and SET_META_CONTEXT, then transmission requests. Run from fuzz/."""
import struct, os
OPT = b"IHAVEOPT"
def opt(o, data=b""):
    return OPT + struct.pack(">II", o, len(data)) + data
def req(typ, off=0, length=0, flags=0, handle=1, data=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, handle, off, length) + data
flags = struct.pack(">I", 3)
go = opt(7, struct.pack(">I", 0) + struct.pack(">H", 1) + struct.pack(">H", 3))
meta = opt(10, struct.pack(">I", 0) + struct.pack(">I", 2)
           + struct.pack(">I", 15) + b"base:allocation"
           + struct.pack(">I", 21) + b"qemu:allocation-depth")
seeds = {
    "export_name_rw": flags + opt(1, b"") + req(1, 0, 512, data=b"\x11" * 512)
        + req(0, 0, 4096, handle=2) + req(3, handle=3) + req(2),
    "go_structured_status": flags + opt(8) + meta + go
        + req(6, 4096, 8192, handle=4) + req(7, 0, 65536, handle=5)
        + req(4, 8192, 4096, handle=6) + req(5, 0, 4096, handle=7) + req(2),
    "list_abort": flags + opt(3) + opt(6, struct.pack(">I", 0) + b"\x00\x00") + opt(2),
    "bad_magic": flags + b"IHAVEOPX" + b"\x00" * 8,
}
os.makedirs("corpus/nbd_server", exist_ok=True)
for n, b in seeds.items():
    open(f"corpus/nbd_server/{n}", "wb").write(b)
