//! Sockets: a client connection and a listener over TCP or a Unix-domain socket.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// A connected client (the type the NBD client storage of the library uses too).
pub use vdisk::storage::nbd::Stream;

/// A listening socket (TCP: one per address the bind name resolves to).
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(Vec<TcpListener>),
    /// Unix-domain socket at a path (removed when the server ends).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `addr:port`, on every address the name resolves to (as qemu-nbd
    /// does: `-b localhost` serves both ::1 and 127.0.0.1).
    pub fn tcp(addr: &str, port: u16) -> io::Result<Listener> {
        use std::net::ToSocketAddrs;
        let mut ls = Vec::new();
        let mut last_err = None;
        for sa in (addr, port).to_socket_addrs()? {
            match TcpListener::bind(sa) {
                Ok(l) => ls.push(l),
                Err(e) => last_err = Some(e),
            }
        }
        if ls.is_empty() {
            return Err(last_err.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("'{addr}' has no address"))
            }));
        }
        Ok(Listener::Tcp(ls))
    }

    /// Listens on a Unix socket at `path`; an old socket left there is replaced, as
    /// qemu-nbd does, but any other kind of file is left alone.
    pub fn unix(path: &Path) -> io::Result<Listener> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.to_path_buf(),
        ))
    }

    /// Accepts one connection on socket `idx` of [`Listener::fds`] (the listener is
    /// non-blocking: `WouldBlock` when none).
    pub fn accept(&self, idx: usize) -> io::Result<Stream> {
        let s = match self {
            Listener::Tcp(ls) => match ls.get(idx) {
                Some(l) => Stream::Tcp(l.accept()?.0),
                None => return Err(io::ErrorKind::WouldBlock.into()),
            },
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
        };
        // Accepted sockets must block even though the listener doesn't.
        match &s {
            Stream::Tcp(t) => t.set_nonblocking(false)?,
            Stream::Unix(u) => u.set_nonblocking(false)?,
            Stream::Tls(_) => {}
        }
        Ok(s)
    }

    /// Makes `accept` return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(ls) => {
                for l in ls {
                    l.set_nonblocking(true)?;
                }
                Ok(())
            }
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    /// Removes the socket file (Unix sockets only).
    pub fn cleanup(&self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    /// The listening descriptors, to poll.
    pub fn fds(&self) -> Vec<RawFd> {
        match self {
            Listener::Tcp(ls) => ls.iter().map(|l| l.as_raw_fd()).collect(),
            Listener::Unix(l, _) => vec![l.as_raw_fd()],
        }
    }

    /// The TCP addresses listened on (to learn a port chosen by the system).
    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        match self {
            Listener::Tcp(ls) => ls.iter().filter_map(|l| l.local_addr().ok()).collect(),
            Listener::Unix(..) => Vec::new(),
        }
    }
}
