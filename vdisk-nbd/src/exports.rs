//! `vdisk serve` exports other than NBD: `--vhost-user-blk SOCKET` (the device lives in
//! the `vdisk-vhost` crate) and `--fuse MOUNTPOINT` (`vdisk-fuse`), alone or both at
//! once on the same image, each on its own threads. Same image options, signals and
//! exit behaviour as the NBD server: SIGTERM/SIGINT stop every export, everything
//! acknowledged is flushed, the image is closed clean.

use crate::cli::{err, report_ready, ServeArgs};
use crate::export::DiscardMode;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vdisk::Image;
use vdisk_fuse::FuseExport;
use vdisk_vhost::{BlkConfig, VhostExport};

/// Signals (SIGTERM, SIGINT) make the returned socket readable (and it stays so: every
/// export polls it without reading).
pub(crate) fn stop_on_signals() -> Result<UnixStream, String> {
    let (stop_rx, stop_tx) = UnixStream::pair().map_err(|e| e.to_string())?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let tx = stop_tx.try_clone().map_err(|e| e.to_string())?;
        signal_hook::low_level::pipe::register(sig, tx)
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    Ok(stop_rx)
}

type Job = Box<dyn FnOnce(&UnixStream, &dyn Fn()) -> Result<(), String> + Send>;

/// Runs the non-NBD exports `a` asks for on the opened `image`; returns the exit code.
pub fn run(a: &ServeArgs, image: Arc<Image>, discard: DiscardMode) -> i32 {
    if !(1..=64).contains(&a.num_queues) {
        return err(format!(
            "--num-queues must be 1 to 64, not {}",
            a.num_queues
        ));
    }
    let mut jobs: Vec<(String, Job)> = Vec::new();
    if let Some(socket) = a.vhost_user_blk.clone() {
        let export = VhostExport {
            socket: socket.clone(),
            blk: BlkConfig {
                read_only: a.read_only,
                num_queues: a.num_queues,
                unmap: discard == DiscardMode::Unmap,
                ..BlkConfig::default()
            },
        };
        let img = image.clone();
        jobs.push((
            format!("vhost-user-blk on {}", socket.display()),
            Box::new(move |stop, ready| {
                vdisk_vhost::serve(img, &export, stop, ready).map_err(|e| e.to_string())
            }),
        ));
    }
    if let Some(mp) = a.fuse.clone() {
        let export = FuseExport {
            mountpoint: mp.clone(),
            read_only: a.read_only,
            growable: a.growable,
            threads: 4,
        };
        let img = image.clone();
        jobs.push((
            format!("FUSE export on {}", mp.display()),
            Box::new(move |stop, ready| {
                vdisk_fuse::serve(img, &export, stop, ready).map_err(|e| e.to_string())
            }),
        ));
    }
    let stop = match stop_on_signals() {
        Ok(s) => s,
        Err(e) => return err(e),
    };
    if let Some(p) = &a.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return err(format!("Failed to write pid file '{}': {e}", p.display()));
        }
    }
    // Ready (for --fork) once every export listens.
    let pending = Arc::new(AtomicUsize::new(jobs.len()));
    let mut threads = Vec::new();
    for (what, job) in jobs {
        let stop = match stop.try_clone() {
            Ok(s) => s,
            Err(e) => return err(e),
        };
        let pending = pending.clone();
        let t = std::thread::Builder::new()
            .name("vdisk-export".into())
            .spawn(move || {
                let ready = || {
                    if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                        report_ready();
                    }
                };
                let r = job(&stop, &ready).map_err(|e| format!("{what}: {e}"));
                if r.is_err() {
                    // One export failing stops the others too.
                    let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
                }
                r
            });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => return err(format!("cannot start an export thread: {e}")),
        }
    }
    let mut code = 0;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => code = err(e),
            Err(_) => code = err("an export thread panicked"),
        }
    }
    if let Err(e) = image.flush().and_then(|()| image.close()) {
        code = err(format!("closing '{}': {e}", a.filename.display()));
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    code
}
