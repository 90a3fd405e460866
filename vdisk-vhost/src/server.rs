//! The listening side: one VMM connection at a time on a Unix socket, a fresh device
//! per connection (so a VMM that restarts reconnects cleanly), and an orderly stop when
//! the stop socket becomes readable (a signal handler writes to its peer).

use crate::backend::{BlkBackend, BlkConfig, Memory};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use vdisk::Image;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryMmap;

/// A vhost-user-blk export.
#[derive(Clone, Debug)]
pub struct VhostExport {
    /// Socket path the VMM connects to (created, and removed on exit).
    pub socket: PathBuf,
    /// Device behaviour.
    pub blk: BlkConfig,
}

/// Waits until one of `fds` is readable; returns which ones are.
fn poll_in(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a valid, exclusively borrowed array of pollfd for the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(p.iter().map(|f| f.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn verr(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Serves `image` to one VMM at a time on `export.socket` until `stop` is readable.
/// A VMM that disconnects (or crashes) may connect again. Between connections and at
/// the end the image is flushed; on return every worker has finished.
/// `ready` runs once the socket listens.
pub fn serve(
    image: Arc<Image>,
    export: &VhostExport,
    stop: &UnixStream,
    ready: &dyn Fn(),
) -> io::Result<()> {
    let mut listener = Listener::new(&export.socket, true).map_err(verr)?;
    ready();
    let result = serve_on(&image, export, &mut listener, stop);
    drop(listener);
    let _ = std::fs::remove_file(&export.socket);
    let flushed = image.flush().map_err(verr);
    result.and(flushed)
}

fn serve_on(
    image: &Arc<Image>,
    export: &VhostExport,
    listener: &mut Listener,
    stop: &UnixStream,
) -> io::Result<()> {
    loop {
        let ready = poll_in(&[stop.as_raw_fd(), listener.as_raw_fd()])?;
        if ready[0] {
            return Ok(());
        }
        if !ready[1] {
            continue;
        }
        let stopped = connection(image, export, listener, stop)?;
        image.flush().map_err(verr)?;
        if stopped {
            return Ok(());
        }
    }
}

/// One VMM connection from accept to hang-up (or stop). Returns whether a stop was
/// requested.
fn connection(
    image: &Arc<Image>,
    export: &VhostExport,
    listener: &mut Listener,
    stop: &UnixStream,
) -> io::Result<bool> {
    let mem = Memory::new(GuestMemoryMmap::new());
    let backend = BlkBackend::new(image.clone(), export.blk.clone(), mem.clone());
    let mut daemon =
        VhostUserDaemon::new("vdisk-vhost-user-blk".into(), backend.clone(), mem).map_err(verr)?;
    daemon.start(listener).map_err(verr)?;
    // A watcher turns a stop request into a shutdown of this connection.
    let (done_rx, mut done_tx) = UnixStream::pair()?;
    let stop_fd = stop.try_clone()?;
    let handle = daemon.shutdown_handle();
    let watcher = std::thread::Builder::new()
        .name("vhost-stop".into())
        .spawn(move || -> bool {
            match poll_in(&[stop_fd.as_raw_fd(), done_rx.as_raw_fd()]) {
                Ok(r) if r[0] => {
                    if let Some(h) = handle {
                        h.shutdown();
                    }
                    true
                }
                _ => false,
            }
        })?;
    let result = daemon.wait();
    let _ = done_tx.write_all(&[1]);
    let stopped = watcher.join().unwrap_or(false);
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    // Dropping the daemon joins the queue workers (no request is taken after this);
    // then the requests they handed to the I/O threads finish.
    drop(daemon);
    backend.wait_idle();
    if let Err(e) = result {
        // A VMM that misbehaved or vanished ends only its own connection.
        if !stopped {
            log(&format!("connection ended: {e}"));
        }
    }
    Ok(stopped)
}

fn log(msg: &str) {
    if std::env::var_os("VDISK_VHOST_LOG").is_some() {
        eprintln!("vdisk vhost-user-blk: {msg}");
    }
}
