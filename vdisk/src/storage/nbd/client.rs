//! One NBD connection: fixed-newstyle negotiation (`NBD_OPT_EXTENDED_HEADERS` when the
//! server has them, else `NBD_OPT_STRUCTURED_REPLY`;
//! `NBD_OPT_SET_META_CONTEXT base:allocation`, `NBD_OPT_GO` with block-size
//! constraints, `NBD_OPT_EXPORT_NAME` for servers without GO) and pipelined
//! transmission: callers write requests under a lock, one reader thread matches replies
//! to requests by cookie.
//!
//! Everything the server sends is checked before use: magics, cookies, chunk types
//! against the command, chunk offsets and lengths against the request, coverage of a
//! READ, lengths of option replies. A protocol violation, a closed socket or a request
//! that gets no reply within the timeout kills the connection: every request in flight
//! and every later one fails with the reason (no hang, no partial data).

use super::proto::{self, Buf};
use super::Stream as Sock;
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String, u16),
}

/// What to connect to and how long to wait.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server.
    pub address: Address,
    /// The export name (empty: the default export).
    pub export: String,
    /// How long a request (and each negotiation step) may wait for the server.
    pub timeout: Duration,
    /// How long to keep retrying a refused connection (zero: try once).
    pub open_timeout: Duration,
    /// Requests in flight at once (per connection).
    pub max_in_flight: usize,
    /// TLS (`tls-creds`): `NBD_OPT_STARTTLS` comes first, the rest goes over TLS.
    pub tls: Option<super::tls::ClientTls>,
    /// Connections to open when the server advertises CAN_MULTI_CONN (1: one).
    pub connections: usize,
}

/// What negotiation learned about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Minimum block size (alignment of every request), a power of two.
    pub min_block: u32,
    /// Preferred block size.
    pub pref_block: u32,
    /// Largest READ/WRITE payload.
    pub max_block: u32,
    /// Structured replies are on.
    pub structured: bool,
    /// Extended headers are on (64-bit request and reply headers; every reply is
    /// structured; block status comes as `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
    pub extended: bool,
    /// The id of `base:allocation`, when the server has it.
    pub alloc_context: Option<u32>,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// An OS error's text without Rust's " (os error N)" suffix, as QEMU prints it.
fn strip_os(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

// ---------------------------------------------------------------------------------
// Sockets.

/// Connects to the server `cfg` names, retrying for its open timeout.
fn connect(cfg: &Config) -> io::Result<Sock> {
    let deadline = Instant::now() + cfg.open_timeout;
    loop {
        let r = match &cfg.address {
            Address::Unix(p) => UnixStream::connect(p).map(Sock::Unix),
            Address::Tcp(h, port) => tcp(h, *port, cfg.timeout),
        };
        match r {
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("nbd connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

fn tcp(host: &str, port: u16, timeout: Duration) -> io::Result<Sock> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
    for a in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                let s = Sock::Tcp(s);
                s.set_nodelay()?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn set_timeouts(s: &Sock, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
    s.set_read_timeout(read)?;
    s.set_write_timeout(write)
}

// ---------------------------------------------------------------------------------
// Negotiation.

/// Largest option reply payload accepted (names and descriptions are ≤ 4 KiB).
const MAX_OPT_REPLY: u32 = 64 << 10;

fn send_opt(s: &mut Sock, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Buf::with_capacity(16 + data.len());
    b.u64(proto::IHAVEOPT)
        .u32(opt)
        .u32(data.len() as u32)
        .bytes(data);
    s.write_all(&b.0)
}

/// One option reply: its type and payload.
fn read_opt_reply(s: &mut Sock, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    let magic = proto::read_u64(s)?;
    if magic != proto::REPLY_MAGIC_OPT {
        return Err(proto_err(format!(
            "bad option reply magic {magic:#x} from the NBD server"
        )));
    }
    let got = proto::read_u32(s)?;
    if got != opt {
        return Err(proto_err(format!(
            "NBD server replied to option {got} when option {opt} was sent"
        )));
    }
    let typ = proto::read_u32(s)?;
    let len = proto::read_u32(s)?;
    if len > MAX_OPT_REPLY {
        return Err(proto_err(format!(
            "NBD option reply of {len} bytes is too long"
        )));
    }
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data)?;
    Ok((typ, data))
}

fn opt_name(opt: u32) -> &'static str {
    match opt {
        proto::OPT_EXPORT_NAME => "export name",
        proto::OPT_GO => "go",
        proto::OPT_INFO => "info",
        proto::OPT_STRUCTURED_REPLY => "structured reply",
        proto::OPT_EXTENDED_HEADERS => "extended headers",
        proto::OPT_SET_META_CONTEXT => "set meta context",
        proto::OPT_STARTTLS => "starttls",
        _ => "unknown",
    }
}

/// The error an option error reply stands for, in QEMU's words.
fn opt_error(opt: u32, typ: u32, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(&data[..data.len().min(proto::MAX_STRING)]);
    let what = match typ {
        proto::REP_ERR_UNKNOWN => "Requested export not available".into(),
        proto::REP_ERR_POLICY => "Denied by server for option".into(),
        proto::REP_ERR_TLS_REQD => "TLS negotiation required before option".into(),
        proto::REP_ERR_SHUTDOWN => "Server shutting down before option".into(),
        proto::REP_ERR_INVALID => "Server rejected invalid option".into(),
        proto::REP_ERR_TOO_BIG => "Server considers option too large".into(),
        _ => format!("Unknown error {typ:#x} for option"),
    };
    let kind = match typ {
        proto::REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        proto::REP_ERR_POLICY | proto::REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    // QEMU's wording: the option is named except for a missing export; the server's
    // own text follows on a line of its own.
    let mut s = if typ == proto::REP_ERR_UNKNOWN {
        what
    } else {
        format!("{what} {opt} ({})", opt_name(opt))
    };
    if typ == proto::REP_ERR_TLS_REQD {
        s.push_str("\nDid you forget a valid tls-creds?");
    }
    if !msg.is_empty() {
        s.push_str("\nserver reported: ");
        s.push_str(&msg);
    }
    io::Error::new(kind, s)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Negotiates with a freshly connected server; leaves the socket in transmission.
fn negotiate(s: &mut Sock, cfg: &Config) -> io::Result<ExportInfo> {
    let magic = proto::read_u64(s)?;
    if magic != proto::NBDMAGIC {
        return Err(proto_err(format!(
            "not an NBD server (greeting {magic:#x})"
        )));
    }
    let magic = proto::read_u64(s)?;
    if magic == proto::CLISERV_MAGIC {
        return Err(proto_err("the NBD server speaks only oldstyle negotiation"));
    }
    if magic != proto::IHAVEOPT {
        return Err(proto_err(format!("bad NBD greeting magic {magic:#x}")));
    }
    let hflags = proto::read_u16(s)?;
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err("the NBD server does not speak fixed newstyle"));
    }
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::FLAG_FIXED_NEWSTYLE as u32;
    if no_zeroes {
        cflags |= proto::FLAG_NO_ZEROES as u32;
    }
    s.write_all(&cflags.to_be_bytes())?;
    if let Some(tls) = &cfg.tls {
        starttls(s, tls)?;
    }
    let export = cfg.export.as_bytes();
    if export.len() > proto::MAX_STRING {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NBD export name longer than 4096 bytes",
        ));
    }

    // Extended headers first (they imply structured replies); a server without them
    // answers with an error (ERR_UNSUP) and negotiation goes on.
    send_opt(s, proto::OPT_EXTENDED_HEADERS, &[])?;
    let (typ, data) = read_opt_reply(s, proto::OPT_EXTENDED_HEADERS)?;
    let extended = match typ {
        proto::REP_ACK => true,
        t if t & proto::REP_ERR != 0 => false,
        t => return Err(opt_error(proto::OPT_EXTENDED_HEADERS, t, &data)),
    };
    let structured = extended || {
        send_opt(s, proto::OPT_STRUCTURED_REPLY, &[])?;
        let (typ, data) = read_opt_reply(s, proto::OPT_STRUCTURED_REPLY)?;
        match typ {
            proto::REP_ACK => true,
            t if t & proto::REP_ERR != 0 => false,
            t => return Err(opt_error(proto::OPT_STRUCTURED_REPLY, t, &data)),
        }
    };
    tracing::debug!(
        "NBD negotiation: extended headers {extended}, structured replies {structured}"
    );

    let mut alloc_context = None;
    if structured {
        const CTX: &[u8] = b"base:allocation";
        let mut b = Buf::default();
        b.u32(export.len() as u32)
            .bytes(export)
            .u32(1)
            .u32(CTX.len() as u32)
            .bytes(CTX);
        send_opt(s, proto::OPT_SET_META_CONTEXT, &b.0)?;
        for _ in 0..16 {
            let (typ, data) = read_opt_reply(s, proto::OPT_SET_META_CONTEXT)?;
            match typ {
                proto::REP_ACK => break,
                proto::REP_META_CONTEXT if data.len() >= 4 => {
                    if &data[4..] == CTX {
                        alloc_context = Some(be32(&data, 0));
                    }
                }
                // Unknown export etc. surfaces again (and is reported) at GO.
                t if t & proto::REP_ERR != 0 => break,
                t => {
                    return Err(proto_err(format!(
                        "unexpected reply {t} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    let mut b = Buf::default();
    b.u32(export.len() as u32)
        .bytes(export)
        .u16(1)
        .u16(proto::INFO_BLOCK_SIZE);
    send_opt(s, proto::OPT_GO, &b.0)?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        pref_block: 4096,
        max_block: proto::MAX_PAYLOAD,
        structured,
        extended,
        alloc_context,
    };
    let mut have_export = false;
    // A server sends a handful of INFO items before ACK; bound the loop anyway.
    for _ in 0..64 {
        let (typ, data) = read_opt_reply(s, proto::OPT_GO)?;
        match typ {
            proto::REP_ACK => {
                if !have_export {
                    return Err(proto_err("NBD server sent no NBD_INFO_EXPORT"));
                }
                return check_info(info);
            }
            proto::REP_INFO if data.len() >= 2 => {
                let item = u16::from_be_bytes([data[0], data[1]]);
                match item {
                    proto::INFO_EXPORT if data.len() == 12 => {
                        info.size = be64(&data, 2);
                        info.flags = u16::from_be_bytes([data[10], data[11]]);
                        have_export = true;
                    }
                    proto::INFO_BLOCK_SIZE if data.len() == 14 => {
                        info.min_block = be32(&data, 2);
                        info.pref_block = be32(&data, 6);
                        info.max_block = be32(&data, 10);
                    }
                    proto::INFO_EXPORT | proto::INFO_BLOCK_SIZE => {
                        return Err(proto_err(format!(
                            "NBD_INFO item {item} of {} bytes",
                            data.len()
                        )))
                    }
                    _ => {}
                }
            }
            proto::REP_ERR_UNSUP => return export_name(s, cfg, no_zeroes, info),
            t if t & proto::REP_ERR != 0 => return Err(opt_error(proto::OPT_GO, t, &data)),
            t => return Err(proto_err(format!("unexpected reply {t} to NBD_OPT_GO"))),
        }
    }
    Err(proto_err("NBD server sent too many replies to NBD_OPT_GO"))
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake: `s` becomes the TLS session.
fn starttls(s: &mut Sock, tls: &super::tls::ClientTls) -> io::Result<()> {
    send_opt(s, proto::OPT_STARTTLS, &[])?;
    let (typ, data) = read_opt_reply(s, proto::OPT_STARTTLS)?;
    match typ {
        proto::REP_ACK if data.is_empty() => {}
        proto::REP_ACK => {
            return Err(proto_err(format!(
                "Option {} ('starttls') response length is {} (it should be zero)",
                proto::OPT_STARTTLS,
                data.len()
            )))
        }
        proto::REP_ERR_UNSUP => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Server don't support STARTTLS option",
            ))
        }
        t if t & proto::REP_ERR != 0 => return Err(opt_error(proto::OPT_STARTTLS, t, &data)),
        t => {
            return Err(proto_err(format!(
                "Server answered option {} (starttls) with unexpected reply {t}",
                proto::OPT_STARTTLS
            )))
        }
    }
    *s = super::tls::connect(s.try_clone()?, &tls.creds, tls.hostname.as_deref())?;
    Ok(())
}

/// `NBD_OPT_EXPORT_NAME`, for servers without `NBD_OPT_GO`.
fn export_name(
    s: &mut Sock,
    cfg: &Config,
    no_zeroes: bool,
    mut info: ExportInfo,
) -> io::Result<ExportInfo> {
    send_opt(s, proto::OPT_EXPORT_NAME, cfg.export.as_bytes())?;
    info.size = proto::read_u64(s)?;
    info.flags = proto::read_u16(s)?;
    if !no_zeroes {
        proto::skip(s, 124)?;
    }
    check_info(info)
}

fn check_info(mut info: ExportInfo) -> io::Result<ExportInfo> {
    let (min, pref, max) = (info.min_block, info.pref_block, info.max_block);
    if !min.is_power_of_two()
        || min > 64 << 10
        || !pref.is_power_of_two()
        || pref < min
        || max < min
        || (max != u32::MAX && !max.is_multiple_of(min))
    {
        return Err(proto_err(format!(
            "bad NBD block size constraints (minimum {min}, preferred {pref}, maximum {max})"
        )));
    }
    if info.size > i64::MAX as u64 {
        return Err(proto_err(format!(
            "NBD export size {} is too large",
            info.size
        )));
    }
    // Our own bound on one payload, kept a multiple of the minimum.
    info.max_block = max.min(proto::MAX_PAYLOAD);
    if info.flags & proto::TFLAG_HAS_FLAGS == 0 {
        info.flags = 0;
    }
    Ok(info)
}

// ---------------------------------------------------------------------------------
// Transmission.

/// A finished request.
#[derive(Debug, Default)]
pub struct Reply {
    /// READ: the bytes of the request's range.
    pub data: Vec<u8>,
    /// BLOCK_STATUS: the descriptors (length, flags) of `base:allocation`.
    pub extents: Vec<(u32, u32)>,
}

/// One request to send.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Command (`CMD_*`).
    pub typ: u16,
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Export offset.
    pub offset: u64,
    /// Length (of the payload for WRITE).
    pub len: u32,
    /// WRITE's data.
    pub payload: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    /// A command without payload.
    pub fn new(typ: u16, flags: u16, offset: u64, len: u32) -> Request<'a> {
        Request {
            typ,
            flags,
            offset,
            len,
            payload: None,
        }
    }
    /// A WRITE of `data`.
    pub fn write(flags: u16, offset: u64, data: &'a [u8]) -> Request<'a> {
        Request {
            typ: proto::CMD_WRITE,
            flags,
            offset,
            len: data.len() as u32,
            payload: Some(data),
        }
    }
}

/// What the reader needs to know of a request to check its reply.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Read,
    BlockStatus,
    Other,
}

/// The caller's buffer a READ's payload is received into, lent for as long as the
/// request's [`Pending`] lives: the reader thread writes the payload straight into it
/// (no reply buffer, no copy), only while it holds the slot's lock, and only while
/// `SlotState::dest` is set; dropping the `Pending` clears it under that lock.
#[derive(Debug)]
struct Dest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `Dest` stands for a `&mut [u8]` borrowed by a `Pending` (see there); it is
// only dereferenced under the slot's mutex, by one thread at a time, while the borrow
// lives.
unsafe impl Send for Dest {}

#[derive(Debug, Default)]
struct SlotState {
    /// READ: where the payload goes (None: into `reply.data`).
    dest: Option<Dest>,
    reply: Reply,
    /// READ chunks seen: (offset in the request, length).
    covered: Vec<(u64, u64)>,
    /// The first error chunk (errno).
    error: Option<io::Error>,
    done: bool,
    /// Its waiter sleeps on the slot's condvar (else finishing need not wake it).
    waiting: bool,
}

#[derive(Debug)]
struct Slot {
    kind: Kind,
    typ: u16,
    offset: u64,
    len: u64,
    state: Mutex<SlotState>,
    cv: Condvar,
}

impl SlotState {
    /// Bytes `rel..rel + n` of the lent buffer, if one is lent (the caller has checked
    /// the range against the request, whose length is the buffer's).
    fn lent(&mut self, rel: u64, n: u64) -> Option<&mut [u8]> {
        let d = self.dest.as_ref()?;
        let (rel, n) = (usize::try_from(rel).ok()?, usize::try_from(n).ok()?);
        if rel.checked_add(n)? > d.len {
            return None;
        }
        // SAFETY: `dest` is set only while the `Pending` that borrowed the buffer
        // mutably lives (its drop clears it under this same lock, which `&mut self`
        // proves we hold), the range is inside it, and nobody else touches the buffer
        // meanwhile: the borrower waits for the request to finish before reading it.
        Some(unsafe { std::slice::from_raw_parts_mut(d.ptr.add(rel), n) })
    }
}

/// A request sent and not yet waited for. When it lent a buffer for a READ's payload
/// ([`Connection::submit`]), the buffer stays borrowed until this is dropped, and the
/// drop takes it back from the reader thread (which may still be receiving into it
/// when the wait gave up: the drop waits for the slot's lock). Never leaked
/// (`mem::forget`): [`pipelined`] holds every one in a local until it returns.
struct Pending<'b> {
    slot: Arc<Slot>,
    _buf: std::marker::PhantomData<&'b mut [u8]>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(&self.slot.state).dest = None;
    }
}

impl Slot {
    fn finish(&self, error: Option<io::Error>) {
        let mut st = lock(&self.state);
        if let Some(e) = error {
            st.error.get_or_insert(e);
        }
        st.done = true;
        if st.waiting {
            self.cv.notify_all();
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    pending: HashMap<u64, Arc<Slot>>,
    /// Why the connection is unusable.
    dead: Option<String>,
    /// Submitters waiting for room in the window: a completion wakes them (a futex
    /// call) only when there are some.
    room_waiters: usize,
}

#[derive(Debug)]
struct Inner {
    shared: Mutex<Shared>,
    /// Signalled when a request completes (room for another).
    room: Condvar,
    max_in_flight: usize,
    /// A handle on the socket for shutdown.
    sock: Sock,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on `cv` until `ready` holds (the guard back) or `deadline` passes (`None`).
fn wait_until<'a, T>(
    mut g: MutexGuard<'a, T>,
    cv: &Condvar,
    deadline: Instant,
    mut ready: impl FnMut(&T) -> bool,
) -> Option<MutexGuard<'a, T>> {
    loop {
        if ready(&g) {
            return Some(g);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        g = cv
            .wait_timeout(g, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

impl Inner {
    /// Marks the connection dead: every pending request fails with `why`.
    fn kill(&self, why: String) {
        let drained: Vec<_> = {
            let mut sh = lock(&self.shared);
            if sh.dead.is_none() {
                tracing::warn!("NBD connection lost: {why}");
                sh.dead = Some(why.clone());
            }
            sh.pending.drain().map(|(_, s)| s).collect()
        };
        let _ = self.sock.shutdown(Shutdown::Both);
        for s in drained {
            s.finish(Some(io::Error::new(io::ErrorKind::BrokenPipe, why.clone())));
        }
        self.room.notify_all();
    }
}

/// A connection in transmission phase.
#[derive(Debug)]
pub struct Connection {
    inner: Arc<Inner>,
    writer: Mutex<Sock>,
    reader: Option<JoinHandle<()>>,
    cookie: AtomicU64,
    timeout: Duration,
    /// What negotiation found.
    pub info: ExportInfo,
}

impl Connection {
    /// Connects and negotiates.
    pub fn open(cfg: &Config) -> io::Result<Connection> {
        let mut s = connect(cfg).map_err(|e| {
            let to = match &cfg.address {
                Address::Unix(p) => p.display().to_string(),
                Address::Tcp(h, port) => format!("{h}:{port}"),
            };
            io::Error::new(
                e.kind(),
                format!("Failed to connect to '{to}': {}", strip_os(&e)),
            )
        })?;
        let t = Some(cfg.timeout);
        set_timeouts(&s, t, t)?;
        let info = negotiate(&mut s, cfg).map_err(|e| {
            // Tell a server still listening that we are going (it need not answer).
            let _ = send_opt(&mut s, proto::OPT_ABORT, &[]);
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "NBD server did not answer negotiation within {} s",
                        cfg.timeout.as_secs_f64()
                    ),
                )
            } else if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "NBD server closed the connection during negotiation",
                )
            } else {
                e
            }
        })?;
        // The receive timeout holds for the whole socket (the fds share it): it bounds
        // a reply that stops half way, while the reader waits for the next reply
        // without a limit (see `reader_loop`).
        let rsock = s.try_clone()?;
        let inner = Arc::new(Inner {
            shared: Mutex::default(),
            room: Condvar::new(),
            max_in_flight: cfg.max_in_flight.max(1),
            sock: s.try_clone()?,
        });
        let ri = Arc::clone(&inner);
        let timeout = cfg.timeout;
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_loop(ri, rsock, info, timeout))?;
        Ok(Connection {
            inner,
            writer: Mutex::new(s),
            reader: Some(reader),
            cookie: AtomicU64::new(1),
            timeout: cfg.timeout,
            info,
        })
    }

    /// Sends one request (waiting for room in the in-flight window). A READ may lend
    /// `dest` (exactly the request's length): its payload is received straight into
    /// it, for as long as the returned [`Pending`] lives.
    fn submit<'b>(&self, req: Request<'_>, dest: Option<&'b mut [u8]>) -> io::Result<Pending<'b>> {
        let Request {
            typ,
            flags,
            offset,
            len,
            payload,
        } = req;
        let kind = match typ {
            proto::CMD_READ => Kind::Read,
            proto::CMD_BLOCK_STATUS => Kind::BlockStatus,
            _ => Kind::Other,
        };
        let dest = match dest {
            Some(d) if !matches!(kind, Kind::Read) || d.len() != len as usize => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an NBD buffer is lent only to a READ of its length",
                ))
            }
            d => d.map(|d| Dest {
                ptr: d.as_mut_ptr(),
                len: d.len(),
            }),
        };
        let slot = Arc::new(Slot {
            kind,
            typ,
            offset,
            len: len as u64,
            state: Mutex::new(SlotState {
                dest,
                ..SlotState::default()
            }),
            cv: Condvar::new(),
        });
        let pending = Pending {
            slot: Arc::clone(&slot),
            _buf: std::marker::PhantomData,
        };
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        {
            let deadline = Instant::now() + self.timeout;
            let max = self.inner.max_in_flight;
            let mut sh = lock(&self.inner.shared);
            sh.room_waiters += 1;
            let sh = wait_until(sh, &self.inner.room, deadline, |sh| {
                sh.dead.is_some() || sh.pending.len() < max
            });
            let Some(mut sh) = sh else {
                lock(&self.inner.shared).room_waiters -= 1;
                return Err(self.timed_out());
            };
            sh.room_waiters -= 1;
            if let Some(why) = &sh.dead {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
            }
            sh.pending.insert(cookie, Arc::clone(&slot));
        }
        let mut h = Buf::with_capacity(32);
        proto::request_header(
            &mut h,
            self.info.extended,
            flags,
            typ,
            cookie,
            offset,
            len as u64,
        );
        let mut w = lock(&self.writer);
        let r = w.write_all(&h.0).and_then(|_| match payload {
            Some(p) => w.write_all(p),
            None => Ok(()),
        });
        drop(w);
        if let Err(e) = r {
            let why = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!(
                    "NBD server accepted no request data for {} s",
                    self.timeout.as_secs_f64()
                )
            } else {
                format!("NBD connection failed while sending: {e}")
            };
            self.inner.kill(why);
        }
        Ok(pending)
    }

    fn timed_out(&self) -> io::Error {
        let why = format!(
            "NBD server did not reply within {} s",
            self.timeout.as_secs_f64()
        );
        self.inner.kill(why.clone());
        io::Error::new(io::ErrorKind::TimedOut, why)
    }

    /// Waits for a request's reply.
    fn wait(&self, slot: &Slot) -> io::Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let mut st = lock(&slot.state);
        st.waiting = true;
        let Some(mut st) = wait_until(st, &slot.cv, deadline, |st| st.done) else {
            return Err(self.timed_out());
        };
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut st.reply)),
        }
    }

    /// Sends a request and waits for its reply.
    pub fn call(&self, req: Request<'_>) -> io::Result<Reply> {
        let p = self.submit(req, None)?;
        self.wait(&p.slot)
    }
}

/// Sends `reqs` over `conns` in turn from `start` (request `i` on connection
/// `(start + i) % n`), keeping every connection's window full, and hands each reply to
/// `each` in request order; the first error is returned after every request sent has
/// finished (so no reply lands in a buffer later). A READ may come with the buffer its
/// payload goes to (see [`Connection::submit`]); its reply's `data` is then empty.
fn pipelined<'a, 'b>(
    conns: &[Connection],
    start: usize,
    reqs: impl Iterator<Item = (Request<'a>, Option<&'b mut [u8]>)>,
    mut each: impl FnMut(usize, Reply),
) -> io::Result<()> {
    let n = conns.len().max(1);
    let window: usize = conns.iter().map(|c| c.inner.max_in_flight).sum();
    // Every `Pending` stays in here until it is waited for and dropped (or, should
    // `each` panic, until the unwinding drops them): a lent buffer is taken back
    // before this function's borrow of it ends.
    let mut slots: std::collections::VecDeque<(usize, &Connection, Pending<'b>)> =
        Default::default();
    let mut first_err = None;
    for (i, (req, dest)) in reqs.enumerate() {
        // Keep the windows full but never ask for more room than they have.
        if slots.len() >= window {
            if let Some((j, c, s)) = slots.pop_front() {
                match c.wait(&s.slot) {
                    Ok(r) => each(j, r),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        if first_err.is_some() {
            break;
        }
        let Some(c) = conns.get((start + i) % n) else {
            break;
        };
        match c.submit(req, dest) {
            Ok(s) => slots.push_back((i, c, s)),
            Err(e) => {
                first_err = Some(e);
                break;
            }
        }
    }
    for (i, c, s) in slots {
        match c.wait(&s.slot) {
            Ok(r) => each(i, r),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Most connections one export is opened with.
pub const MAX_CONNECTIONS: usize = 16;

/// The connections to one export: one, or several when the server advertises
/// `NBD_FLAG_CAN_MULTI_CONN` and the caller asked for more ([`Config::connections`]).
/// Requests go round-robin over them; a pipelined batch is spread over all. A flush on
/// any connection makes the writes completed on every connection durable: that is what
/// CAN_MULTI_CONN promises (proto.md), and without it only one connection is opened.
#[derive(Debug)]
pub struct Pool {
    conns: Vec<Connection>,
    next: AtomicUsize,
    /// What negotiation found (the same on every connection).
    pub info: ExportInfo,
}

impl Pool {
    /// Connects (the first connection's failure is the error); further connections
    /// that fail or negotiate something else are dropped with a warning.
    pub fn open(cfg: &Config) -> io::Result<Pool> {
        let first = Connection::open(cfg)?;
        let info = first.info;
        let mut conns = vec![first];
        let want = cfg.connections.clamp(1, MAX_CONNECTIONS);
        if want > 1 && info.has(proto::TFLAG_CAN_MULTI_CONN) {
            while conns.len() < want {
                match Connection::open(cfg) {
                    Ok(c) if c.info == info => conns.push(c),
                    Ok(c) => {
                        tracing::warn!(
                            "NBD connection {} negotiated {:?}, not {:?}: not used",
                            conns.len() + 1,
                            c.info,
                            info
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("NBD connection {}: {e}: not used", conns.len() + 1);
                        break;
                    }
                }
            }
        }
        tracing::debug!("NBD export open with {} connection(s)", conns.len());
        Ok(Pool {
            conns,
            next: AtomicUsize::new(0),
            info,
        })
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn turn(&self, n: usize) -> usize {
        self.next.fetch_add(n.max(1), Ordering::Relaxed) % self.conns.len().max(1)
    }

    /// Sends a request on the next connection and waits for its reply.
    pub fn call(&self, req: Request<'_>) -> io::Result<Reply> {
        match self.conns.get(self.turn(1)) {
            Some(c) => c.call(req),
            None => Err(io::Error::other("no NBD connection")),
        }
    }

    /// Several requests in flight at once, spread over every connection, each waited
    /// for in order (see [`pipelined`]).
    pub fn call_many<'a>(
        &self,
        reqs: impl Iterator<Item = Request<'a>>,
        each: impl FnMut(usize, Reply),
    ) -> io::Result<()> {
        let start = self.turn(1);
        pipelined(&self.conns, start, reqs.map(|r| (r, None)), each)
    }

    /// Reads `buf.len()` bytes at `offset` in READs of at most `step` bytes, spread
    /// over every connection and in flight at once; each payload is received straight
    /// into its part of `buf` by the connection's reader (no copy). `offset`, the
    /// length and `step` are the caller's to align.
    pub fn read_into(&self, buf: &mut [u8], offset: u64, step: usize) -> io::Result<()> {
        let step = step.max(1);
        let start = self.turn(1);
        let reqs = buf.chunks_mut(step).enumerate().map(|(i, c)| {
            let r = Request::new(
                proto::CMD_READ,
                0,
                offset + (i * step) as u64,
                c.len() as u32,
            );
            (r, Some(c))
        });
        pipelined(&self.conns, start, reqs, |_, _| {})
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let alive = lock(&self.inner.shared).dead.is_none();
        if alive {
            let mut h = Buf::with_capacity(32);
            proto::request_header(&mut h, self.info.extended, 0, proto::CMD_DISC, 0, 0, 0);
            let _ = lock(&self.writer).write_all(&h.0);
        }
        self.inner.kill("the NBD connection was closed".into());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// The reader thread.

/// Most `base:allocation` descriptors kept from one reply (the rest are read and
/// dropped: the first ones answer the query).
const MAX_EXTENTS: usize = 4096;
/// Largest non-data chunk payload accepted.
const MAX_CHUNK: u64 = 1 << 20;
/// Most chunks one READ may arrive in.
const MAX_READ_CHUNKS: usize = 1 << 16;

/// The reader's receive buffer.
const READER_BUF: usize = 16 << 10;

/// Whether `e` is a socket receive timeout (`SO_RCVTIMEO` expired).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Waits, without a limit, until the next reply starts (or the socket ends or fails).
/// Between replies silence is normal: requests' waiters keep their own deadlines.
fn await_reply(r: &mut BufReader<Sock>) -> io::Result<()> {
    loop {
        match r.fill_buf() {
            Ok(_) => return Ok(()),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads replies until the connection ends. The reader holds a request's lock while
/// it receives that request's payload (into the caller's buffer), so a server that
/// stops in the middle of a reply must not block it forever: the socket's receive
/// timeout (the connection's `timeout`) ends such a reply, and the connection.
fn reader_loop(inner: Arc<Inner>, sock: Sock, info: ExportInfo, timeout: Duration) {
    // Small: it batches the headers of small replies, while a READ payload, which
    // goes straight into the caller's buffer, passes through it only for what one
    // fill caught beyond a header (a larger buffer copied ~15% of the payload bytes
    // of 2 MiB READs a second time).
    let mut r = BufReader::with_capacity(READER_BUF, sock);
    let why = loop {
        match await_reply(&mut r).and_then(|()| read_reply(&inner, &mut r, &info)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                break "NBD server closed the connection".to_string()
            }
            Err(e) if is_timeout(&e) => {
                break format!(
                    "NBD server stopped in the middle of a reply (nothing for {} s)",
                    timeout.as_secs_f64()
                )
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                break format!("NBD protocol error: {e}")
            }
            Err(e) => break format!("NBD connection failed: {e}"),
        }
    };
    inner.kill(why);
}

/// The pending request `cookie` names. It stays pending until [`retire`]: should the
/// connection die while its reply is being read, the kill still fails it.
fn find(inner: &Inner, cookie: u64) -> io::Result<Arc<Slot>> {
    lock(&inner.shared)
        .pending
        .get(&cookie)
        .cloned()
        .ok_or_else(|| proto_err(format!("reply for unknown cookie {cookie}")))
}

/// Ends a request whose reply has been read whole: no longer pending, then finished.
fn retire(inner: &Inner, cookie: u64, slot: &Slot, error: Option<io::Error>) {
    let wake = {
        let mut sh = lock(&inner.shared);
        sh.pending.remove(&cookie);
        sh.room_waiters > 0
    };
    if wake {
        inner.room.notify_all();
    }
    slot.finish(error);
}

fn errno_error(e: u32) -> io::Error {
    if e == 0 {
        return proto_err("error chunk with error 0");
    }
    io::Error::from_raw_os_error(proto::host_errno(e))
}

/// Reads one reply (simple) or one chunk (structured) and files it.
fn read_reply(inner: &Inner, r: &mut impl Read, info: &ExportInfo) -> io::Result<()> {
    let magic = proto::read_u32(r)?;
    match magic {
        // With extended headers every reply is an extended chunk.
        proto::SIMPLE_REPLY_MAGIC if !info.extended => {
            let error = proto::read_u32(r)?;
            let cookie = proto::read_u64(r)?;
            let slot = find(inner, cookie)?;
            if error != 0 {
                let e = io::Error::from_raw_os_error(proto::host_errno(error));
                retire(inner, cookie, &slot, Some(e));
                return Ok(());
            }
            match slot.kind {
                Kind::Read if info.structured => {
                    return Err(proto_err("simple reply with data to a READ"))
                }
                Kind::Read => {
                    let mut st = lock(&slot.state);
                    match st.lent(0, slot.len) {
                        Some(dst) => r.read_exact(dst)?,
                        None => read_fresh(r, &mut st.reply.data, slot.len)?,
                    }
                }
                Kind::BlockStatus => {
                    return Err(proto_err("simple reply to BLOCK_STATUS"));
                }
                Kind::Other => {}
            }
            retire(inner, cookie, &slot, None);
            Ok(())
        }
        proto::STRUCTURED_REPLY_MAGIC | proto::EXTENDED_REPLY_MAGIC
            if info.structured && (magic == proto::EXTENDED_REPLY_MAGIC) == info.extended =>
        {
            let flags = proto::read_u16(r)?;
            let typ = proto::read_u16(r)?;
            let cookie = proto::read_u64(r)?;
            let len = if info.extended {
                // The request's offset (or 0) comes first; the chunk says its own.
                let _offset = proto::read_u64(r)?;
                proto::read_u64(r)?
            } else {
                proto::read_u32(r)? as u64
            };
            let done = flags & proto::REPLY_FLAG_DONE != 0;
            let slot = find(inner, cookie)?;
            chunk(&slot, typ, len, r, info)?;
            if done {
                let err = {
                    let mut st = lock(&slot.state);
                    if st.error.is_none() {
                        complete(&slot, &mut st)
                    } else {
                        None
                    }
                };
                retire(inner, cookie, &slot, err);
            }
            Ok(())
        }
        m => Err(proto_err(format!("bad reply magic {m:#x}"))),
    }
}

/// Reads exactly `n` bytes into the empty `buf` (its spare capacity: no zeroing).
fn read_fresh(r: &mut impl Read, buf: &mut Vec<u8>, n: u64) -> io::Result<()> {
    buf.reserve_exact(n as usize);
    let got = r.take(n).read_to_end(buf)?;
    if got as u64 != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed {got} bytes into a {n}-byte READ payload"),
        ));
    }
    Ok(())
}

/// Checks a successful request's chunks add up: a READ covered exactly once.
fn complete(slot: &Slot, st: &mut SlotState) -> Option<io::Error> {
    match slot.kind {
        Kind::Read => {
            st.covered.sort_unstable();
            let mut at = 0;
            for &(o, l) in &st.covered {
                if o != at {
                    return Some(proto_err(format!(
                        "READ reply chunks leave bytes {at}..{o} of the request unanswered or overlap"
                    )));
                }
                at = o + l;
            }
            (at != slot.len)
                .then(|| proto_err(format!("READ reply covers {at} of {} bytes", slot.len)))
        }
        Kind::BlockStatus if st.reply.extents.is_empty() => Some(proto_err(
            "BLOCK_STATUS reply without base:allocation extents",
        )),
        _ => None,
    }
}

fn chunk(slot: &Slot, typ: u16, len: u64, r: &mut impl Read, info: &ExportInfo) -> io::Result<()> {
    let cmd = proto::cmd_name(slot.typ);
    match typ {
        proto::REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(proto_err(format!("NONE chunk of {len} bytes")));
            }
        }
        proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE => {
            if !matches!(slot.kind, Kind::Read) {
                return Err(proto_err(format!("data chunk in the reply to {cmd}")));
            }
            let data = typ == proto::REPLY_TYPE_OFFSET_DATA;
            if (data && len <= 8) || (!data && len != 12) {
                return Err(proto_err(format!("chunk type {typ} of {len} bytes")));
            }
            let off = proto::read_u64(r)?;
            let n = if data {
                len - 8
            } else {
                proto::read_u32(r)? as u64
            };
            let rel = off
                .checked_sub(slot.offset)
                .filter(|rel| n > 0 && rel.checked_add(n).is_some_and(|e| e <= slot.len));
            let Some(rel) = rel else {
                return Err(proto_err(format!(
                    "READ chunk {off}+{n} outside the request {}+{}",
                    slot.offset, slot.len
                )));
            };
            let mut st = lock(&slot.state);
            if st.covered.len() >= MAX_READ_CHUNKS {
                return Err(proto_err("READ reply in too many chunks"));
            }
            if let Some(dst) = st.lent(rel, n) {
                // The caller's buffer: the payload lands where it is wanted.
                if data {
                    r.read_exact(dst)?;
                } else {
                    dst.fill(0);
                }
            } else if data && rel == 0 && n == slot.len && st.reply.data.is_empty() {
                // The common case, one chunk for the whole request: read straight into
                // fresh capacity (no zeroing pass over the buffer first).
                read_fresh(r, &mut st.reply.data, n)?;
            } else {
                if st.reply.data.is_empty() {
                    st.reply.data = vec![0; slot.len as usize];
                }
                let dst = &mut st.reply.data[rel as usize..(rel + n) as usize];
                if data {
                    r.read_exact(dst)?;
                } else {
                    dst.fill(0);
                }
            }
            st.covered.push((rel, n));
        }
        proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT
            if (typ == proto::REPLY_TYPE_BLOCK_STATUS_EXT) != info.extended =>
        {
            return Err(proto_err(format!(
                "block status chunk type {typ} with extended headers {}",
                if info.extended { "on" } else { "off" }
            )))
        }
        proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
            if !matches!(slot.kind, Kind::BlockStatus) {
                return Err(proto_err(format!(
                    "block status chunk in the reply to {cmd}"
                )));
            }
            if len < 24 || !(len - 8).is_multiple_of(16) || len > 64 << 20 {
                return Err(proto_err(format!("block status chunk of {len} bytes")));
            }
            let ctx = proto::read_u32(r)?;
            let count = proto::read_u32(r)? as u64;
            if count != (len - 8) / 16 {
                return Err(proto_err(format!(
                    "block status chunk of {len} bytes says {count} descriptors"
                )));
            }
            let mut st = lock(&slot.state);
            let keep = Some(ctx) == info.alloc_context;
            for _ in 0..count {
                let l = proto::read_u64(r)?;
                let f = proto::read_u64(r)?;
                if l == 0 {
                    return Err(proto_err("block status descriptor of length 0"));
                }
                if keep && st.reply.extents.len() < MAX_EXTENTS {
                    // Our requests are at most 4 GiB, so a longer extent only says
                    // the status goes on past the request; base:allocation's flags
                    // are the low bits.
                    st.reply
                        .extents
                        .push((l.min(u32::MAX as u64) as u32, f as u32));
                }
            }
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            if !matches!(slot.kind, Kind::BlockStatus) {
                return Err(proto_err(format!(
                    "block status chunk in the reply to {cmd}"
                )));
            }
            if len < 12 || !(len - 4).is_multiple_of(8) || len > 64 << 20 {
                return Err(proto_err(format!("block status chunk of {len} bytes")));
            }
            let ctx = proto::read_u32(r)?;
            let count = (len - 4) / 8;
            let mut st = lock(&slot.state);
            let keep = Some(ctx) == info.alloc_context;
            for _ in 0..count {
                let l = proto::read_u32(r)?;
                let f = proto::read_u32(r)?;
                if keep && st.reply.extents.len() < MAX_EXTENTS {
                    st.reply.extents.push((l, f));
                }
            }
        }
        t if t & proto::REPLY_TYPE_ERROR_BIT != 0 => {
            if !(6..=MAX_CHUNK).contains(&len) {
                return Err(proto_err(format!("error chunk of {len} bytes")));
            }
            let e = proto::read_u32(r)?;
            let mlen = proto::read_u16(r)? as u64;
            if mlen + 6 > len {
                return Err(proto_err("error chunk message longer than the chunk"));
            }
            let mut msg = vec![0; mlen as usize];
            r.read_exact(&mut msg)?;
            proto::skip(r, len - 6 - mlen)?;
            let err = errno_error(e);
            if err.kind() == io::ErrorKind::InvalidData {
                return Err(err);
            }
            if !msg.is_empty() {
                tracing::debug!(
                    "NBD server error for {cmd}: {}",
                    String::from_utf8_lossy(&msg)
                );
            }
            lock(&slot.state).error.get_or_insert(err);
        }
        t => {
            return Err(proto_err(format!(
                "unknown chunk type {t} in the reply to {cmd}"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_validated() {
        let ok = ExportInfo {
            size: 1 << 20,
            flags: proto::TFLAG_HAS_FLAGS,
            min_block: 512,
            pref_block: 4096,
            max_block: 1 << 25,
            structured: true,
            extended: false,
            alloc_context: None,
        };
        assert_eq!(check_info(ok).unwrap().max_block, proto::MAX_PAYLOAD);
        for (min, pref, max) in [
            (3, 4096, 8192),
            (4096, 512, 8192),
            (512, 4096, 1000),
            (1 << 20, 1 << 20, 1 << 20),
        ] {
            let bad = ExportInfo {
                min_block: min,
                pref_block: pref,
                max_block: max,
                ..ok
            };
            assert!(check_info(bad).is_err(), "{min} {pref} {max}");
        }
    }

    #[test]
    fn option_errors_name_the_export() {
        let e = opt_error(proto::OPT_GO, proto::REP_ERR_UNKNOWN, b"no such export");
        assert_eq!(
            e.to_string(),
            "Requested export not available\nserver reported: no such export"
        );
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = opt_error(proto::OPT_GO, proto::REP_ERR_POLICY, b"");
        assert_eq!(e.to_string(), "Denied by server for option 7 (go)");
    }

    fn slot(kind: Kind, offset: u64, len: u64) -> Slot {
        Slot {
            kind,
            typ: proto::CMD_READ,
            offset,
            len,
            state: Mutex::default(),
            cv: Condvar::new(),
        }
    }

    fn info() -> ExportInfo {
        ExportInfo {
            size: 1 << 20,
            flags: 0,
            min_block: 1,
            pref_block: 4096,
            max_block: 1 << 20,
            structured: true,
            extended: false,
            alloc_context: Some(7),
        }
    }

    /// Hands the reader's chunk parser one chunk of type `typ` and length `len`.
    fn feed(s: &Slot, typ: u16, len: u64, b: &Buf) -> io::Result<()> {
        chunk(s, typ, len, &mut &b.0[..], &info())
    }

    #[test]
    fn read_chunks_are_bounded_and_must_cover_the_request() {
        let s = slot(Kind::Read, 100, 10);
        let mut b = Buf::default();
        b.u64(100).bytes(&[1, 2, 3, 4]);
        feed(&s, proto::REPLY_TYPE_OFFSET_DATA, 12, &b).unwrap();
        let mut b = Buf::default();
        b.u64(104).u32(6);
        feed(&s, proto::REPLY_TYPE_OFFSET_HOLE, 12, &b).unwrap();
        let mut st = s.state.lock().unwrap();
        assert!(complete(&s, &mut st).is_none());
        assert_eq!(st.reply.data, [1, 2, 3, 4, 0, 0, 0, 0, 0, 0]);
        drop(st);

        // Outside the request, or a gap.
        let s = slot(Kind::Read, 100, 10);
        let mut b = Buf::default();
        b.u64(108).bytes(&[1, 2, 3, 4]);
        let e = feed(&s, proto::REPLY_TYPE_OFFSET_DATA, 12, &b).unwrap_err();
        assert!(e.to_string().contains("outside the request"), "{e}");
        let mut b = Buf::default();
        b.u64(102).bytes(&[1, 2]);
        feed(&s, proto::REPLY_TYPE_OFFSET_DATA, 10, &b).unwrap();
        let mut st = s.state.lock().unwrap();
        assert!(complete(&s, &mut st).is_some());
    }

    /// An OFFSET_DATA chunk of `bytes` at export offset `off`.
    fn data_chunk(s: &Slot, off: u64, bytes: &[u8]) -> io::Result<()> {
        let mut b = Buf::default();
        b.u64(off).bytes(bytes);
        feed(s, proto::REPLY_TYPE_OFFSET_DATA, 8 + bytes.len() as u64, &b)
    }

    /// An OFFSET_HOLE chunk of `len` bytes at export offset `off`.
    fn hole_chunk(s: &Slot, off: u64, len: u32) -> io::Result<()> {
        let mut b = Buf::default();
        b.u64(off).u32(len);
        feed(s, proto::REPLY_TYPE_OFFSET_HOLE, 12, &b)
    }

    #[test]
    fn read_payloads_land_in_the_lent_buffer_until_it_is_taken_back() {
        let mut buf = [0xffu8; 10];
        let s = Arc::new(slot(Kind::Read, 100, 10));
        lock(&s.state).dest = Some(Dest {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        });
        let p = Pending {
            slot: Arc::clone(&s),
            _buf: std::marker::PhantomData,
        };
        data_chunk(&s, 104, &[1, 2, 3, 4]).unwrap();
        hole_chunk(&s, 100, 4).unwrap();
        data_chunk(&s, 108, &[5, 6]).unwrap();
        {
            let mut st = lock(&s.state);
            assert!(complete(&s, &mut st).is_none());
            assert!(st.reply.data.is_empty(), "no reply buffer when one is lent");
        }
        // Taken back (the waiter gave up): a late chunk goes to a reply buffer of
        // its own, never into the caller's.
        drop(p);
        assert!(lock(&s.state).dest.is_none());
        data_chunk(&s, 100, &[9, 9]).unwrap();
        assert_eq!(buf, [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(lock(&s.state).reply.data[..2], [9, 9]);
    }

    #[test]
    fn chunks_must_fit_their_command() {
        let s = slot(Kind::Other, 0, 0);
        let mut b = Buf::default();
        b.u64(0).u32(6);
        assert!(feed(&s, proto::REPLY_TYPE_OFFSET_HOLE, 12, &b).is_err());
        let s = slot(Kind::BlockStatus, 0, 4096);
        let mut b = Buf::default();
        b.u32(7).u32(4096).u32(3);
        feed(&s, proto::REPLY_TYPE_BLOCK_STATUS, 12, &b).unwrap();
        assert_eq!(s.state.lock().unwrap().reply.extents, [(4096, 3)]);
        let mut b = Buf::default();
        b.u32(proto::EIO).u16(2).bytes(b"no");
        feed(&s, proto::REPLY_TYPE_ERROR, 8, &b).unwrap();
        let e = s.state.lock().unwrap().error.take().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let mut b = Buf::default();
        b.u32(proto::EIO).u16(20);
        assert!(feed(&s, proto::REPLY_TYPE_ERROR, 6, &b).is_err());
        assert!(chunk(&s, 77, 0, &mut &[][..], &info()).is_err());
    }

    #[test]
    fn block_status_ext_only_with_extended_headers() {
        let ext = ExportInfo {
            extended: true,
            ..info()
        };
        let s = slot(Kind::BlockStatus, 0, 8192);
        let mut b = Buf::default();
        b.u32(7).u32(2).u64(4096).u64(3).u64(1 << 40).u64(0);
        chunk(
            &s,
            proto::REPLY_TYPE_BLOCK_STATUS_EXT,
            40,
            &mut &b.0[..],
            &ext,
        )
        .unwrap();
        assert_eq!(
            s.state.lock().unwrap().reply.extents,
            [(4096, 3), (u32::MAX, 0)]
        );
        // A count that disagrees with the length, a zero-length descriptor.
        let mut b = Buf::default();
        b.u32(7).u32(3).u64(4096).u64(3);
        let e = chunk(
            &s,
            proto::REPLY_TYPE_BLOCK_STATUS_EXT,
            24,
            &mut &b.0[..],
            &ext,
        );
        assert!(e.unwrap_err().to_string().contains("says 3 descriptors"));
        let mut b = Buf::default();
        b.u32(7).u32(1).u64(0).u64(3);
        assert!(chunk(
            &s,
            proto::REPLY_TYPE_BLOCK_STATUS_EXT,
            24,
            &mut &b.0[..],
            &ext
        )
        .is_err());
        // The compact form with extended headers on, and the extended one without.
        let mut b = Buf::default();
        b.u32(7).u32(4096).u32(3);
        assert!(chunk(&s, proto::REPLY_TYPE_BLOCK_STATUS, 12, &mut &b.0[..], &ext).is_err());
        let mut b = Buf::default();
        b.u32(7).u32(1).u64(4096).u64(3);
        assert!(feed(&s, proto::REPLY_TYPE_BLOCK_STATUS_EXT, 24, &b).is_err());
    }
}
