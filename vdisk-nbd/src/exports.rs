//! `vdisk serve` exports other than NBD: `--vhost-user-blk SOCKET` (the device lives in
//! the `vdisk-vhost` crate). Same image options, signals and exit behaviour as the NBD
//! server: SIGTERM/SIGINT stop it, everything acknowledged is flushed, the image is
//! closed clean.

use crate::cli::{err, report_ready, ServeArgs};
use crate::export::DiscardMode;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vdisk::Image;
use vdisk_vhost::{BlkConfig, VhostExport};

/// Signals (SIGTERM, SIGINT) make the returned socket readable.
fn stop_on_signals() -> Result<UnixStream, String> {
    let (stop_rx, stop_tx) = UnixStream::pair().map_err(|e| e.to_string())?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let tx = stop_tx.try_clone().map_err(|e| e.to_string())?;
        signal_hook::low_level::pipe::register(sig, tx)
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    Ok(stop_rx)
}

/// Runs the non-NBD export `a` asks for on the opened `image`; returns the exit code.
pub fn run(a: &ServeArgs, image: Arc<Image>, discard: DiscardMode) -> i32 {
    let Some(socket) = a.vhost_user_blk.clone() else {
        return err("no export requested");
    };
    if !(1..=64).contains(&a.num_queues) {
        return err(format!(
            "--num-queues must be 1 to 64, not {}",
            a.num_queues
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
    let export = VhostExport {
        socket: socket.clone(),
        blk: BlkConfig {
            read_only: a.read_only,
            num_queues: a.num_queues,
            unmap: discard == DiscardMode::Unmap,
            ..BlkConfig::default()
        },
    };
    let mut code = 0;
    if let Err(e) = vdisk_vhost::serve(image.clone(), &export, &stop, &report_ready) {
        code = err(format!("vhost-user-blk on {}: {e}", socket.display()));
    }
    if let Err(e) = image.flush().and_then(|()| image.close()) {
        code = err(format!("closing '{}': {e}", a.filename.display()));
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    code
}
