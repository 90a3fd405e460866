//! The accept loop: client limit, one thread per connection, exit when the last client
//! leaves (unless persistent), and orderly shutdown on request.

use crate::export::Export;
use crate::handshake::{self, Outcome};
use crate::stream::{Listener, Stream};
use crate::transmission;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Server behaviour (qemu-nbd's `-t`, `-e` and handshake limit).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Keep serving after the last client leaves (`-t`).
    pub persistent: bool,
    /// Clients served at once (`-e`); 0 means no limit.
    pub max_clients: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// On shutdown, how long connections get to finish their requests before their
    /// sockets are closed under them.
    pub shutdown_grace: Duration,
    /// TLS (`--tls-creds`): clients must start with `NBD_OPT_STARTTLS`.
    pub tls: Option<vdisk::storage::nbd::tls::ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            persistent: false,
            max_clients: 1,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Why [`Server::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The last client left and the server isn't persistent.
    LastClientLeft,
    /// A stop was requested (signal).
    Stopped,
}

type Registry = Arc<Mutex<HashMap<u64, Stream>>>;

/// A listening NBD server for one export.
pub struct Server {
    listener: Listener,
    export: Arc<Export>,
    cfg: ServerConfig,
}

fn poll_in(fds: &mut [libc::pollfd]) -> io::Result<()> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn drain(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
}

impl Server {
    /// A server accepting on `listener`.
    pub fn new(listener: Listener, export: Arc<Export>, cfg: ServerConfig) -> io::Result<Server> {
        listener.set_nonblocking()?;
        Ok(Server {
            listener,
            export,
            cfg,
        })
    }

    /// The listener (to learn a port, or remove the socket file).
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// Serves until the last client leaves (non-persistent) or `stop` becomes
    /// readable (a byte written to its peer, e.g. by a signal handler). On return every
    /// connection has finished: requests in flight were completed and answered.
    pub fn run(&self, stop: &UnixStream) -> io::Result<Exit> {
        let (mut ev_rx, ev_tx) = UnixStream::pair()?;
        ev_rx.set_nonblocking(true)?;
        ev_tx.set_nonblocking(true)?;
        let registry: Registry = Arc::new(Mutex::new(HashMap::new()));
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        // Like qemu-nbd, only a client that got as far as transmission counts towards
        // "the last client left": failed handshakes and `nbdinfo --list` don't.
        let served_any = Arc::new(AtomicBool::new(false));
        let exit = loop {
            let active = registry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            handles.retain(|h| !h.is_finished());
            if !self.cfg.persistent && served_any.load(Ordering::Acquire) && active == 0 {
                break Exit::LastClientLeft;
            }
            let accepting = self.cfg.max_clients == 0 || active < self.cfg.max_clients;
            let mut fds = vec![pollfd(stop.as_raw_fd()), pollfd(ev_rx.as_raw_fd())];
            if accepting {
                fds.extend(self.listener.fds().into_iter().map(pollfd));
            }
            poll_in(&mut fds)?;
            if fds[0].revents != 0 {
                break Exit::Stopped;
            }
            drain(&mut ev_rx);
            // One connection per round, so the client limit is rechecked each time.
            let Some(ready) = fds.iter().skip(2).position(|f| f.revents != 0) else {
                continue;
            };
            let stream = match self.listener.accept(ready) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // Out of descriptors and the like: don't spin, don't die.
                    crate::vlog!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            let (c, ev) = match (stream.try_clone(), ev_tx.try_clone()) {
                (Ok(c), Ok(ev)) => (c, ev),
                (Err(e), _) | (_, Err(e)) => {
                    // Out of descriptors: this client is refused, the server goes on.
                    crate::vlog!("accept: {e}");
                    continue;
                }
            };
            registry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, c);
            let export = self.export.clone();
            let reg = registry.clone();
            let served = served_any.clone();
            let limit = self.cfg.handshake_timeout;
            let tls = self.cfg.tls.clone();
            let h = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    // Leaves the registry even if the connection code panics, so a
                    // client slot is never lost.
                    let _leave = Leave { reg, id, ev };
                    connection(stream, &export, limit, tls.as_ref(), &served);
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    crate::vlog!("cannot start a connection thread: {e}");
                    if let Some(s) = registry
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id)
                    {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        };
        if exit == Exit::Stopped {
            self.stop_connections(&registry, handles);
        } else {
            for h in handles {
                let _ = h.join();
            }
        }
        Ok(exit)
    }

    /// Stops reading new requests on every connection, lets requests in flight finish,
    /// and after the grace period cuts off whatever is still stuck (a client that
    /// doesn't read its replies).
    fn stop_connections(&self, registry: &Registry, handles: Vec<JoinHandle<()>>) {
        for s in registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = s.shutdown(Shutdown::Read);
        }
        let until = Instant::now() + self.cfg.shutdown_grace;
        while Instant::now() < until && handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for s in registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in handles {
            let _ = h.join();
        }
    }
}

/// Removes a connection from the registry and wakes the accept loop when dropped.
struct Leave {
    reg: Registry,
    id: u64,
    ev: UnixStream,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.reg
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        let _ = self.ev.write(&[1]);
    }
}

/// One client from handshake to hang-up. Errors only end this connection.
fn connection(
    mut stream: Stream,
    export: &Export,
    limit: Duration,
    tls: Option<&vdisk::storage::nbd::tls::ServerTls>,
    served: &AtomicBool,
) {
    let peer = stream.peer();
    let _ = stream.set_nodelay();
    match handshake::negotiate(&mut stream, export, limit, tls) {
        Ok(Outcome::Transmission(neg)) => {
            served.store(true, Ordering::Release);
            crate::vlog!(
                "{peer}: transmission (structured: {}, extended: {}, contexts: {:?})",
                neg.structured,
                neg.extended,
                neg.contexts
            );
            if let Err(e) = transmission::serve(stream, export, &neg) {
                crate::vlog!("{peer}: {e}");
            }
        }
        Ok(Outcome::Closed(why)) => {
            crate::vlog!("{peer}: {why}");
            let _ = stream.shutdown(Shutdown::Both);
        }
        Err(e) => {
            crate::vlog!("{peer}: handshake failed: {e}");
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}
