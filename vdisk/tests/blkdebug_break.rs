//! blkdebug breakpoints at the library level (issue 14, part 2 of the follow-up): two
//! allocating writes to one qcow2 cluster, the first held at `write_aio` / `cow_write`
//! (its cluster allocated, its data not yet written, its L2 entry not yet set) while
//! the second
//! runs; after `resume` both land, and qemu-img / qemu-io find the image clean and
//! the data exact.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vdisk::format::DriverOptions;
use vdisk::storage::blkdebug::BlkdebugStorage;
use vdisk::storage::{MemStorage, Storage};
use vdisk::{Format, Image};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("qemu tools are installed");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn overlapping_allocation(extra: &[&str], event: &str, second: (u64, u64)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q", "-f", "qcow2"]).args(extra);
    run(create.arg(&path).arg("1M"));
    let mem = Arc::new(MemStorage::from_vec(std::fs::read(&path).unwrap()));
    let bd = Arc::new(BlkdebugStorage::new(mem.clone()));
    let st: Arc<dyn Storage> = bd.clone();
    let img = Arc::new(Image::open_storage(st, Format::Qcow2, &DriverOptions::default()).unwrap());
    bd.add_breakpoint(event, "A").unwrap();
    let first = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[1u8; 4096], 0))
    };
    assert!(
        bd.wait_suspended("A", Duration::from_secs(60)),
        "write 1 never reached {event}"
    );
    let (off, len) = second;
    let other = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&vec![2u8; len as usize], off))
    };
    // Give the second write the chance to run into the held allocation (nothing is
    // asserted about timing: any order must give the same image).
    std::thread::sleep(Duration::from_millis(200));
    assert!(!bd.is_suspended("B"));
    bd.resume("A").unwrap();
    first.join().unwrap().unwrap();
    other.join().unwrap().unwrap();
    img.flush().unwrap();
    let mut got = vec![0u8; 1 << 20];
    img.read_at(&mut got, 0).unwrap();
    let mut want = vec![0u8; 1 << 20];
    want[..4096].fill(1);
    want[off as usize..(off + len) as usize].fill(2);
    assert!(got == want, "contents after both writes");
    img.close().unwrap();
    std::fs::write(&path, mem.to_vec()).unwrap();
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&path));
    let p2 = format!("read -P 2 {off} {len}");
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 1 0 4k", "-c", &p2])
        .arg(&path));
}

#[test]
fn two_writes_to_one_cluster_one_held_at_cow_write() {
    // Head and tail of the new cluster go down with the data (QEMU's merged COW
    // write, announced as cow_write only).
    overlapping_allocation(&[], "cow_write", (8192, 4096));
}

#[test]
fn two_writes_to_one_cluster_one_held_extended_l2() {
    overlapping_allocation(&["-o", "extended_l2=on"], "write_aio", (8192, 4096));
}

#[test]
fn two_writes_one_held_the_other_in_the_next_cluster() {
    overlapping_allocation(&["-o", "cluster_size=4096"], "write_aio", (4096, 4096));
}
