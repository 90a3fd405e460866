//! The deterministic concurrency stress of `vdisk/tests/stress.rs` over NBD (issue
//! 14, part 3): `vdisk serve -t -e 8` exports the image and each of 8 writer threads has
//! its own connection (vdisk's NBD client), so the server's connections race on the
//! same clusters, L2 tables and refcount blocks. The final contents are fixed by the
//! seed; they are verified through vdisk and `qemu-img convert`, and `qemu-img check`
//! must find the image clean, after the server has exited on SIGTERM.
//!
//! CI runs `SEEDS_NBD` seeds per configuration; `VDISK_STRESS_SEEDS=N` runs 0..N and
//! `VDISK_STRESS_SEED=S` one seed.

#[path = "../../vdisk/tests/stress_support/mod.rs"]
mod stress_support;

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;
use stress_support::*;
use vdisk::{Format, Image, OpenOptions};

/// Seeds per configuration in CI (each starts a server).
const SEEDS_NBD: u64 = 16;
/// Connections (one writer thread each).
const CONNECTIONS: usize = 8;

/// A `vdisk serve` process, stopped with SIGTERM (a clean close) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..400 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        panic!("vdisk serve did not exit on SIGTERM");
    }
}

/// The server's `--cache` mode (`none`: O_DIRECT, the io_uring path for aligned
/// requests on allocated clusters beside the workers).
struct Nbd(&'static str);

impl Transport for Nbd {
    fn threads(&self) -> usize {
        CONNECTIONS
    }
    fn connect(
        &self,
        img: &Path,
        fmt: &str,
        threads: usize,
    ) -> (Vec<Arc<Image>>, Box<dyn std::any::Any>) {
        let sock = img.with_extension("sock");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args(["serve", "-t", "-e", &threads.to_string(), "-f", fmt])
            .arg(format!("--cache={}", self.0))
            .arg("-k")
            .arg(&sock)
            .arg(img)
            .spawn()
            .expect("spawn vdisk serve");
        let server = Server(child);
        // Ready once it accepts (the socket file appears at bind, before listen).
        let mut waited = 0;
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(waited < 400, "vdisk serve did not listen on its socket");
            std::thread::sleep(Duration::from_millis(25));
            waited += 1;
        }
        let url = format!("nbd+unix:///?socket={}", sock.display());
        let opts = OpenOptions {
            format: Some(Format::Raw),
            ..OpenOptions::default()
        };
        let images = (0..threads)
            .map(|i| {
                Arc::new(
                    Image::open(&url, &opts)
                        .unwrap_or_else(|e| panic!("connection {i} to {url}: {e}")),
                )
            })
            .collect();
        (images, Box::new(server))
    }
}

fn stress(name: &str) {
    stress_cache(name, "writeback");
}

fn stress_cache(name: &str, cache: &'static str) {
    let c = *CONFIGS.iter().find(|c| c.name == name).unwrap();
    assert!(!c.grow && !c.compressed, "{name}: not over NBD");
    let dir = tempfile::tempdir().unwrap();
    for seed in seeds(SEEDS_NBD) {
        run_seed(dir.path(), c, seed, &Nbd(cache));
    }
}

#[test]
fn stress_qcow2_over_many_connections() {
    stress("qcow2");
}

#[test]
fn stress_qcow2_backing_over_many_connections() {
    stress("qcow2-backing");
}

#[test]
fn stress_qcow2_extended_l2_over_many_connections() {
    stress("qcow2-extl2");
}

#[test]
fn stress_qed_over_many_connections() {
    stress("qed");
}

/// The same with O_DIRECT: ring reads and in-place writes race with the workers'
/// allocating and unaligned writes on the same clusters.
#[test]
fn stress_qcow2_odirect_over_many_connections() {
    stress_cache("qcow2", "none");
}
