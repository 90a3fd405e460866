//! The "probing guessed raw" warning: printed on stderr exactly when qemu-img/qemu-io
//! print it (a read-write open of a raw image without `-f`), never on stdout.

mod cli_support;
use cli_support::*;

/// Strips qemu-io's timing line, which differs run to run.
fn no_timing(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn probed_raw_warning_matches_qemu() {
    let d = tmp();
    let dir = d.path();
    std::fs::write(dir.join("r.img"), vec![0u8; 1 << 20]).unwrap();
    let warning = "WARNING: Image format was not specified for 'r.img' and probing guessed raw.";

    // qemu-io: read-write without -f warns; -r or -f raw do not.
    let cases: [&[&str]; 3] = [
        &["-c", "read 0 512", "r.img"],
        &["-r", "-c", "read 0 512", "r.img"],
        &["-f", "raw", "-c", "read 0 512", "r.img"],
    ];
    for (i, args) in cases.iter().enumerate() {
        let q = qemu_io_run(dir, args);
        let mut va = vec!["io"];
        va.extend_from_slice(args);
        let v = vdisk(dir, &va);
        assert_eq!((v.code, q.code), (0, 0), "{args:?}: {} / {}", v.err, q.err);
        assert_eq!(v.err, q.err, "io {args:?} stderr");
        assert_eq!(no_timing(&v.out), no_timing(&q.out), "io {args:?} stdout");
        assert_eq!(v.err.contains(warning), i == 0, "{}", v.err);
    }

    // qemu-img: the subcommands that open read-write warn, the read-only ones do not.
    let img_cases: [&[&str]; 5] = [
        &["resize", "r.img", "2M"],
        &["resize", "-f", "raw", "r.img", "2M"],
        &["info", "r.img"],
        &["map", "r.img"],
        &["compare", "r.img", "r.img"],
    ];
    for (i, args) in img_cases.iter().enumerate() {
        let q = qemu_img(dir, args);
        let v = vdisk(dir, args);
        assert_eq!(v.code, q.code, "{args:?}: {} / {}", v.err, q.err);
        assert_eq!(v.err, q.err, "{args:?} stderr");
        assert_eq!(v.err.contains(warning), i == 0, "{}", v.err);
        assert!(!v.out.contains("WARNING"), "{args:?}: {}", v.out);
    }
    let bench: [&[&str]; 2] = [
        &["bench", "-w", "-c", "1", "r.img"],
        &["bench", "-c", "1", "r.img"],
    ];
    for args in bench {
        let q = qemu_img(dir, args);
        let v = vdisk(dir, args);
        assert_eq!((v.code, q.code), (0, 0), "{args:?}: {} / {}", v.err, q.err);
        assert_eq!(v.err, q.err, "{args:?} stderr");
    }
}
