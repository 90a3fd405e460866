//! A hand-written VMDK descriptor mixing extent types, as VMware tools and users make
//! them: a FLAT extent, a `ZERO` line (which QEMU skips: it reads only extents with a
//! file name, and ZERO has none it opens), a hosted SPARSE extent, and a second FLAT
//! extent at an offset in another file. `info` and `map` (human and JSON) print what
//! qemu-img prints, reads across the extent boundaries give qemu-io's bytes, and the
//! same write script leaves the flat files byte-identical and the guest contents
//! equal, with `qemu-img check` clean.

mod cli_support;

use cli_support::*;
use std::path::Path;

const DESCRIPTOR: &str = r#"# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "flat.raw" 0
RW 2048 ZERO "none"
RW 2048 SPARSE "sp-s001.vmdk"
RW 1024 FLAT "flat2.raw" 1024

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "3"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "ide"
"#;

/// Makes the descriptor and its extent files in `dir`.
fn make(dir: &Path) {
    for (f, p) in [("flat.raw", 1), ("flat2.raw", 3)] {
        ok(
            qemu_img(dir, &["create", "-q", "-f", "raw", f, "1M"]),
            "create flat",
        );
        qemu_io(dir, "raw", f, &[&format!("write -P {p} 0 1M")]);
    }
    ok(
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "subformat=twoGbMaxExtentSparse",
                "sp.vmdk",
                "1M",
            ],
        ),
        "create sparse",
    );
    qemu_io(dir, "vmdk", "sp.vmdk", &["write -P 2 0 64k"]);
    std::fs::remove_file(dir.join("sp.vmdk")).expect("drop the sparse descriptor");
    std::fs::write(dir.join("mix.vmdk"), DESCRIPTOR).expect("write descriptor");
}

fn tool(dir: &Path, vdisk_io: bool, cmds: &[&str]) -> Vec<String> {
    let mut args = vec![];
    if vdisk_io {
        args.push("io");
    }
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push("mix.vmdk");
    let r = if vdisk_io {
        vdisk(dir, &args)
    } else {
        qemu_io_run(dir, &args)
    };
    assert_eq!(r.code, 0, "{cmds:?}: {}{}", r.out, r.err);
    r.out
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn info_and_map_as_qemu_img() {
    let d = tmp();
    let dir = d.path();
    make(dir);
    for args in [
        &["info", "mix.vmdk"][..],
        &["info", "--output=json", "mix.vmdk"],
        &["map", "mix.vmdk"],
        &["map", "--output=json", "mix.vmdk"],
    ] {
        let ours = ok(vdisk(dir, args), "vdisk");
        let theirs = ok(qemu_img(dir, args), "qemu-img");
        assert_eq!(ours, theirs, "{args:?}");
    }
}

#[test]
fn reads_and_writes_across_extents_as_qemu_io() {
    let reads = [
        "read -P 1 0 1M",
        "read -P 2 1M 64k",
        "read -P 0 1088k 960k",
        "read -P 3 2M 512k",
        "read -v 1020k 16",
        "read -v 2047k 1k",
    ];
    let writes = [
        "write -P 7 1020k 8k",
        "write -P 8 1100k 100k",
        "write -P 9 2100k 4k",
        "write -P 10 2044k 8k",
        "write -z 1040k 4k",
    ];
    let d = tmp();
    let dir = d.path();
    make(dir);
    assert_eq!(tool(dir, true, &reads), tool(dir, false, &reads));
    // The same writes on two copies of the set of files.
    let q = tmp();
    make(q.path());
    tool(dir, true, &writes);
    tool(q.path(), false, &writes);
    for f in ["flat.raw", "flat2.raw"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(q.path().join(f)).unwrap(),
            "{f} after the writes"
        );
    }
    ok(qemu_img(dir, &["check", "mix.vmdk"]), "check vdisk's");
    for (d, name) in [(dir, "v.raw"), (q.path(), "q.raw")] {
        ok(
            qemu_img(d, &["convert", "-O", "raw", "mix.vmdk", name]),
            "convert",
        );
    }
    assert_eq!(
        std::fs::read(dir.join("v.raw")).unwrap(),
        std::fs::read(q.path().join("q.raw")).unwrap(),
        "guest contents after the writes"
    );
    let after = [
        "read -P 7 1020k 8k",
        "read -P 8 1100k 100k",
        "read -P 10 2044k 8k",
        "read -P 9 2100k 4k",
        "read -P 0 1040k 4k",
    ];
    assert_eq!(tool(dir, true, &after), tool(q.path(), false, &after));
}
