//! The option tables the formats declare, against qemu-img 10: `amend -o help` lists
//! exactly the options marked amendable (plus the amend-only ones), with qemu's texts;
//! formats without `amend` are refused in qemu's words.

use std::process::Command;
use vdisk::format::options::render_amend_help;
use vdisk::Format;

fn qemu_img(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu-img");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn amend_help_matches_qemu() {
    let d = tempfile::tempdir().unwrap();
    for f in ["qcow2", "qed", "raw"] {
        let file = format!("x.{f}");
        let (code, _, err) = qemu_img(d.path(), &["create", "-q", "-f", f, &file, "1M"]);
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = qemu_img(d.path(), &["amend", "-f", f, "-o", "help", &file]);
        let fmt = Format::parse(f).unwrap();
        match fmt.amend_options() {
            Some(opts) => {
                assert_eq!(code, 0, "{err}");
                assert_eq!(render_amend_help(f, opts), out, "{f}");
            }
            None => {
                assert_eq!(code, 1);
                assert_eq!(
                    err.trim(),
                    format!("qemu-img: {}", fmt.no_amend_error()),
                    "{f}"
                );
            }
        }
    }
}

#[test]
fn only_declared_amend_options_are_amendable() {
    let q = Format::Qcow2.amend_options().unwrap();
    for name in [
        "cluster_size",
        "preallocation",
        "compression_type",
        "extended_l2",
    ] {
        assert!(q.iter().all(|d| d.name != name), "{name} is not amendable");
    }
    assert!(Format::Qed.amend_options().is_none());
    assert!(Format::Raw.amend_options().is_none());
}
