//! The multi-call binary: `vdisk` installed or linked as `qemu-img`, `qemu-io` or
//! `qemu-nbd` behaves as that tool, so scripts switch by `PATH` alone.
//!
//! The name decides the subcommand (`qemu-io ARGS` is `vdisk io ARGS`, `qemu-nbd ARGS`
//! is `vdisk serve ARGS`, `qemu-img SUB ARGS` is `vdisk SUB ARGS`) and `--version`
//! prints the tool's own first line (`qemu-img version 10.0.2 (vdisk X.Y)`) followed
//! by `vdisk X.Y`. As `qemu-img` and `qemu-io`, every message on stderr carries the
//! tool's name: stderr goes through a pipe whose reader rewrites `vdisk: ` at the
//! start of a line and `'vdisk ` in hints to the tool's name before passing it on
//! (`exit` drains it). `qemu-nbd` keeps vdisk's stderr (the server may fork).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// QEMU version the tools report being compatible with.
const QEMU_VERSION: &str = "10.0.2";

/// The stderr filter: (the original stderr fd, the reader thread).
static FILTER: Mutex<Option<(i32, JoinHandle<()>)>> = Mutex::new(None);

/// The arguments vdisk's parser should see, given how the binary was invoked.
/// Prints the version and exits for `--version`/`-V` of a QEMU personality.
pub fn args() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let name = args
        .first()
        .and_then(|a| {
            std::path::Path::new(a)
                .file_name()
                .map(|n| n.to_os_string())
        })
        .and_then(|n| n.into_string().ok())
        .unwrap_or_default();
    let rest: Vec<OsString> = args.drain(1..).collect();
    let version = rest.first().is_some_and(|a| a == "--version" || a == "-V");
    let vdisk = format!("vdisk {}", env!("CARGO_PKG_VERSION"));
    let (sub, filter): (Option<&str>, bool) = match name.as_str() {
        "qemu-img" => {
            if version {
                print_version(&format!(
                    "qemu-img version {QEMU_VERSION} ({vdisk})\n{vdisk}"
                ));
                std::process::exit(0);
            }
            (None, true)
        }
        "qemu-io" => {
            if version {
                print_version(&format!(
                    "qemu-io version {QEMU_VERSION} ({vdisk})\n{vdisk}"
                ));
                std::process::exit(0);
            }
            (Some("io"), true)
        }
        "qemu-nbd" => {
            if version {
                print_version(&format!("qemu-nbd {QEMU_VERSION} ({vdisk})\n{vdisk}"));
                std::process::exit(0);
            }
            (Some("serve"), false)
        }
        _ => {
            return std::iter::once(OsString::from("vdisk"))
                .chain(rest)
                .collect()
        }
    };
    if name == "qemu-img" && rest.is_empty() {
        eprintln!("qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information");
        std::process::exit(1);
    }
    if filter {
        install_filter(&name);
    }
    let mut out = vec![OsString::from("vdisk")];
    out.extend(sub.map(OsString::from));
    out.extend(rest);
    out
}

/// Rewrites one line of vdisk's stderr for the tool `name`.
pub fn rewrite(line: &str, name: &str) -> String {
    let l = match line.strip_prefix("vdisk: ") {
        Some(rest) => format!("{name}: {rest}"),
        None => line.to_string(),
    };
    let l = l.replace("'vdisk io ", &format!("'{name} "));
    l.replace("'vdisk ", &format!("'{name} "))
}

fn install_filter(name: &str) {
    let mut fds = [0i32; 2];
    // SAFETY: plain fd syscalls on fds this process owns, before other threads run.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return;
        }
        let orig = libc::dup(2);
        if orig < 0 || libc::dup2(fds[1], 2) < 0 {
            return;
        }
        libc::close(fds[1]);
        let read_fd = fds[0];
        let name = name.to_string();
        let h = std::thread::spawn(move || {
            use std::os::fd::FromRawFd;
            // SAFETY: both fds are owned by this thread from here on.
            let mut r = std::fs::File::from_raw_fd(read_fd);
            let mut w = std::fs::File::from_raw_fd(libc::dup(orig));
            let mut pending: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                while let Some(p) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=p).collect();
                    let s = String::from_utf8_lossy(&line[..line.len() - 1]);
                    let _ = writeln!(w, "{}", rewrite(&s, &name));
                }
                // A prompt or partial line: pass it on unchanged once nothing more
                // is buffered.
                if !pending.is_empty() && n < buf.len() {
                    let s = String::from_utf8_lossy(&pending).into_owned();
                    let _ = write!(w, "{}", rewrite(&s, &name));
                    pending.clear();
                }
                let _ = w.flush();
            }
            if !pending.is_empty() {
                let s = String::from_utf8_lossy(&pending).into_owned();
                let _ = write!(w, "{}", rewrite(&s, &name));
            }
            let _ = w.flush();
        });
        *FILTER.lock().unwrap_or_else(|p| p.into_inner()) = Some((orig, h));
    }
}

/// Exits with `code` after the stderr filter (if any) has passed everything on.
pub fn exit(code: i32) -> ! {
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    if let Some((orig, h)) = FILTER.lock().unwrap_or_else(|p| p.into_inner()).take() {
        // SAFETY: pointing fd 2 back at the original stderr closes the pipe's last
        // write end, so the reader sees the end of it.
        unsafe {
            libc::dup2(orig, 2);
        }
        let _ = h.join();
    }
    std::process::exit(code)
}

/// Prints the version lines; a reader that closed early (`--version | head -1`) is no
/// error, as for qemu's tools, which die of SIGPIPE without a word.
fn print_version(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_tools_name() {
        assert_eq!(
            rewrite("vdisk: Could not open 'x': No such file", "qemu-img"),
            "qemu-img: Could not open 'x': No such file"
        );
        assert_eq!(
            rewrite("Try 'vdisk snapshot --help' for more info", "qemu-img"),
            "Try 'qemu-img snapshot --help' for more info"
        );
        assert_eq!(
            rewrite("  data vdisk: inside", "qemu-io"),
            "  data vdisk: inside"
        );
        assert_eq!(
            rewrite("Try 'vdisk io --help' for more information", "qemu-io"),
            "Try 'qemu-io --help' for more information"
        );
    }
}
