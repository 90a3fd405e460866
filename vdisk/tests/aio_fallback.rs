//! `aio=io_uring` where the kernel refuses io_uring: the file falls back to the threaded
//! engine and works as with `aio=threads`. The refusal is simulated for this whole test
//! process (its own binary: the variable would leak into other tests' threads).

mod qcow2_util;

use qcow2_util::*;
use vdisk::storage::{CacheMode, FileStorage, LockMode, OpenFileOptions, IO_URING_REFUSE_ENV};
use vdisk::{Image, OpenOptions};

#[test]
fn refused_io_uring_falls_back_to_threads() {
    std::env::set_var(IO_URING_REFUSE_ENV, "1");
    let d = tmp();
    let f = path(&d, "r.raw");
    let st = FileStorage::open(
        &f,
        &OpenFileOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            lock: LockMode::for_open(false, false),
            create: true,
        },
    )
    .unwrap();
    let (st, on) = st.with_io_uring();
    assert!(
        !on && !st.uses_io_uring(),
        "the refusal falls back to threads"
    );
    drop(st);

    // Through the options tree, as `file.aio=io_uring` on the command line.
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = path(&d, &format!("f-{cache:?}.qcow2"));
        qemu_create(&img, "", "16M");
        let name = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}","aio":"io_uring"}}}}"#,
            p(&img)
        );
        let i = Image::open(
            &name,
            &OpenOptions {
                cache,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        i.write_at(&[0x3cu8; 70000], 12345).unwrap();
        i.flush().unwrap();
        i.close().unwrap();
        drop(i);
        assert_clean(&img);
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x3c 12345 70000", p(&img)],
        );
    }
}
