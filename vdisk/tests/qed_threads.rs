//! The idle timer's threads end with their image (alone in this binary so no other
//! test's images are counted).

mod qed_util;

use qed_util::*;
use vdisk::format::Format;
use vdisk::{CreateOptions, Image};

fn qed_threads() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.trim() == "qed-clean")
                .unwrap_or(false)
        })
        .count()
}

fn create_file(path: &std::path::Path, size: u64) {
    Image::create(
        path,
        &CreateOptions {
            format: Format::Qed,
            size: Some(size),
            options: Vec::new(),
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
    .expect("create");
}

#[test]
fn idle_timer_threads_do_not_leak() {
    let dir = tmp();
    let a = path_in(&dir, "a.qed");
    create_file(&a, 4 << 20);
    for i in 0..12u64 {
        let img = open(&a, false);
        img.write_at(&[i as u8; 512], i * 65536).expect("write");
        if i % 2 == 0 {
            img.close().expect("close");
        }
        drop(img);
    }
    assert_eq!(qed_threads(), 0, "qed-clean threads left running");
    assert_eq!(features(&a) & 2, 0);
    assert_qemu_clean(&a);
}
