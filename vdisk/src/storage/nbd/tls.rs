//! TLS for NBD (`NBD_OPT_STARTTLS`) on both ends: QEMU's credential objects
//! (`--object tls-creds-x509,…` / `tls-creds-psk,…` / `authz-simple,…`) and a TLS
//! session over a connected [`Stream`].
//!
//! The TLS stack is OpenSSL (the `openssl` crate): rustls, which the HTTPS storage uses,
//! has no external pre-shared keys, and one stack for both credential kinds keeps one
//! code path. OpenSSL is driven through memory buffers (the session is a state machine
//! fed with ciphertext), so a TLS connection splits like a socket: one thread reads
//! while others write, as the NBD client and server need. The socket is read and
//! written with no session lock held; only encryption and decryption take it.
//!
//! Files are those QEMU names in the credentials directory: `ca-cert.pem`,
//! `server-cert.pem`/`server-key.pem` (server), `client-cert.pem`/`client-key.pem`
//! (client, optional), and `keys.psk` (`username:hexkey` lines) for PSK.

use super::Stream;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslStream,
    SslVerifyMode, SslVersion,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// Which side of the connection credentials are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A client (`endpoint=client`, QEMU's default).
    Client,
    /// A server (`endpoint=server`).
    Server,
}

/// What a credentials object holds.
#[derive(Clone, Debug)]
enum Kind {
    /// x509; `verify` is verify-peer (a client then needs a host name, as QEMU).
    X509 { verify: bool },
    /// PSK (the key or table of keys lives in the context's callback).
    Psk,
}

/// A `tls-creds-x509` or `tls-creds-psk` object, loaded when defined (as QEMU does:
/// a missing file is an error of `--object`).
#[derive(Clone)]
pub struct TlsCreds {
    id: String,
    endpoint: Endpoint,
    kind: Kind,
    ctx: SslContext,
    /// A client without a host name to check still checks the chain (libnbd URL
    /// credentials over a Unix socket) instead of refusing, as QEMU's objects do.
    chain_only_without_host: bool,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsCreds({:?}, {:?})", self.id, self.endpoint)
    }
}

impl TlsCreds {
    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The side the credentials are for.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }
    /// Whether these are x509 credentials (a client then checks a host name).
    pub fn is_x509(&self) -> bool {
        matches!(self.kind, Kind::X509 { .. })
    }
}

/// What a client connection needs for TLS.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// Client credentials.
    pub creds: Arc<TlsCreds>,
    /// The name the server's certificate must carry (`None`: not checked, as QEMU
    /// over a Unix socket without `tls-hostname`).
    pub hostname: Option<String>,
}

/// What a server needs for TLS (`--tls-creds`, `--tls-authz`).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// Server credentials.
    pub creds: Arc<TlsCreds>,
    /// The one client identity allowed (`authz-simple`'s `identity`), if any.
    pub authz: Option<String>,
}

struct Objects {
    creds: HashMap<String, Arc<TlsCreds>>,
    authz: HashMap<String, String>,
}

fn objects() -> &'static RwLock<Objects> {
    static T: OnceLock<RwLock<Objects>> = OnceLock::new();
    T.get_or_init(|| {
        RwLock::new(Objects {
            creds: HashMap::new(),
            authz: HashMap::new(),
        })
    })
}

/// The credentials object with this id, for `endpoint` (QEMU's wording otherwise).
pub fn lookup(id: &str, endpoint: Endpoint) -> Result<Arc<TlsCreds>, String> {
    let t = objects().read().unwrap_or_else(|e| e.into_inner());
    let c = t
        .creds
        .get(id)
        .cloned()
        .ok_or_else(|| format!("No TLS credentials with id '{id}'"))?;
    if c.endpoint != endpoint {
        let want = match endpoint {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        };
        return Err(format!("Expecting TLS credentials with a {want} endpoint"));
    }
    Ok(c)
}

/// The identity an `authz-simple` object allows.
pub fn lookup_authz(id: &str) -> Result<String, String> {
    let t = objects().read().unwrap_or_else(|e| e.into_inner());
    t.authz
        .get(id)
        .cloned()
        .ok_or_else(|| format!("No authorization object with id '{id}'"))
}

/// Defines one `--object` when it is a TLS credentials or `authz-simple` object:
/// `None` for any other object type (the caller tries the next table).
pub fn define_object(spec: &str) -> Option<Result<(), String>> {
    let pairs = crate::crypto::secret::split_opts(spec);
    let kind = match pairs.first() {
        Some((k, None)) => k.clone(),
        Some((k, Some(v))) if k == "qom-type" => v.clone(),
        _ => return None,
    };
    if !matches!(
        kind.as_str(),
        "tls-creds-x509" | "tls-creds-psk" | "authz-simple"
    ) {
        return None;
    }
    Some(define(&kind, &pairs[1..]))
}

fn define(kind: &str, pairs: &[(String, Option<String>)]) -> Result<(), String> {
    let mut props: HashMap<&str, &str> = HashMap::new();
    for (k, v) in pairs {
        let v = v
            .as_deref()
            .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
        let known: &[&str] = match kind {
            "authz-simple" => &["id", "identity"],
            "tls-creds-psk" => &[
                "id",
                "dir",
                "endpoint",
                "username",
                "priority",
                "verify-peer",
            ],
            _ => &[
                "id",
                "dir",
                "endpoint",
                "verify-peer",
                "priority",
                "sanity-check",
                "loaded",
            ],
        };
        if !known.contains(&k.as_str()) {
            return Err(format!("Property '{kind}.{k}' not found"));
        }
        props.insert(k.as_str(), v);
    }
    let id = props
        .get("id")
        .ok_or("Parameter 'id' is missing")?
        .to_string();
    let mut t = objects().write().unwrap_or_else(|e| e.into_inner());
    if t.creds.contains_key(&id) || t.authz.contains_key(&id) {
        return Err(format!(
            "attempt to add duplicate property '{id}' to object"
        ));
    }
    if kind == "authz-simple" {
        let identity = props
            .get("identity")
            .ok_or("Parameter 'identity' is missing")?;
        t.authz.insert(id, identity.to_string());
        return Ok(());
    }
    let endpoint = match props.get("endpoint").copied() {
        None | Some("client") => Endpoint::Client,
        Some("server") => Endpoint::Server,
        Some(v) => return Err(format!("Parameter 'endpoint' does not accept value '{v}'")),
    };
    let verify_peer = match props.get("verify-peer").copied() {
        None | Some("on" | "yes" | "true") => true,
        Some("off" | "no" | "false") => false,
        Some(v) => {
            return Err(format!(
                "Parameter 'verify-peer' expects 'on' or 'off', not '{v}'"
            ))
        }
    };
    let dir = PathBuf::from(props.get("dir").copied().unwrap_or("/etc/pki/qemu"));
    let creds = if kind == "tls-creds-psk" {
        let username = props.get("username").copied().unwrap_or("qemu").to_string();
        load_psk(id.clone(), endpoint, &dir, username)?
    } else {
        load_x509(id.clone(), endpoint, &dir, verify_peer)?
    };
    t.creds.insert(id, Arc::new(creds));
    Ok(())
}

/// Client credentials named in a libnbd URL (`nbd_connect_uri`'s query keys), loaded
/// for one open and not registered as an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlCreds {
    /// `tls-certificates=DIR`: x509 from `DIR/ca-cert.pem` (and `client-cert.pem` +
    /// `client-key.pem` when present), as libnbd; `verify` is vdisk's
    /// `tls-verify-peer` (default on).
    Certificates {
        /// The directory.
        dir: PathBuf,
        /// Whether the server's certificate is checked.
        verify: bool,
    },
    /// `tls-psk-file=FILE` with the URL's user (libnbd's default: `$LOGNAME`, else
    /// the login name).
    PskFile {
        /// The psktool-format file.
        file: PathBuf,
        /// The identity to send (`None`: neither the URL nor the environment names
        /// one, an error once the file is found).
        username: Option<String>,
    },
}

/// Loads the credentials a libnbd URL names, with the errors of the QEMU objects
/// ("Unable to access credentials FILE: …").
pub fn load_url_creds(c: &UrlCreds) -> Result<Arc<TlsCreds>, String> {
    let creds = match c {
        UrlCreds::Certificates { dir, verify } => {
            // Over a Unix socket libnbd checks no name (nor, with GnuTLS, anything);
            // vdisk still checks the chain against ca-cert.pem.
            let mut c = load_x509("url".into(), Endpoint::Client, dir, *verify)?;
            c.chain_only_without_host = true;
            c
        }
        UrlCreds::PskFile { file, username } => {
            // A missing file is named first, as the objects name it.
            access(file)?;
            let username = username.clone().ok_or(
                "tls-psk-file: no username (name one as nbds://USER@host/…; \
                 the default, $LOGNAME or the login name, is not set)",
            )?;
            load_psk_file("url".into(), Endpoint::Client, file, username)?
        }
    };
    Ok(Arc::new(creds))
}

/// libnbd's default TLS username (`nbd_get_tls_username`): `$LOGNAME`, else
/// `getlogin_r`.
pub fn local_username() -> Option<String> {
    if let Some(n) = std::env::var_os("LOGNAME").and_then(|n| n.into_string().ok()) {
        return Some(n);
    }
    // The libc crate lacks getlogin_r (getlogin is not thread-safe).
    extern "C" {
        fn getlogin_r(buf: *mut libc::c_char, len: libc::size_t) -> libc::c_int;
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid for the call.
    let r = unsafe { getlogin_r(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let n = buf.iter().position(|&b| b == 0)?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

fn access(p: &Path) -> Result<(), String> {
    std::fs::metadata(p).map(|_| ()).map_err(|e| {
        format!(
            "Unable to access credentials {}: {}",
            p.display(),
            crate::error::strip_os_error(&e.to_string())
        )
    })
}

fn ssl_err(what: &str, p: &Path, e: openssl::error::ErrorStack) -> String {
    format!("Cannot load {what} {}: {e}", p.display())
}

fn builder() -> Result<SslContextBuilder, String> {
    let mut b = SslContext::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| e.to_string())?;
    Ok(b)
}

fn load_x509(
    id: String,
    endpoint: Endpoint,
    dir: &Path,
    verify_peer: bool,
) -> Result<TlsCreds, String> {
    let mut b = builder()?;
    let ca = dir.join("ca-cert.pem");
    // A client always checks the server; a server checks clients with verify-peer.
    if verify_peer || endpoint == Endpoint::Client {
        access(&ca)?;
        b.set_ca_file(&ca)
            .map_err(|e| ssl_err("CA certificate", &ca, e))?;
    }
    let (cert, key) = match endpoint {
        Endpoint::Server => ("server-cert.pem", "server-key.pem"),
        Endpoint::Client => ("client-cert.pem", "client-key.pem"),
    };
    let (cert, key) = (dir.join(cert), dir.join(key));
    // A client certificate is optional, as in QEMU; a server's is not.
    let have_cert = endpoint == Endpoint::Server || cert.exists();
    if have_cert {
        access(&cert)?;
        access(&key)?;
        b.set_certificate_chain_file(&cert)
            .map_err(|e| ssl_err("certificate", &cert, e))?;
        b.set_private_key_file(&key, SslFiletype::PEM)
            .map_err(|e| ssl_err("private key", &key, e))?;
        b.check_private_key()
            .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    }
    let mode = match (endpoint, verify_peer) {
        (Endpoint::Server, true) => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        (Endpoint::Server, false) => SslVerifyMode::NONE,
        (Endpoint::Client, true) => SslVerifyMode::PEER,
        (Endpoint::Client, false) => SslVerifyMode::NONE,
    };
    b.set_verify(mode);
    Ok(TlsCreds {
        id,
        endpoint,
        kind: Kind::X509 {
            verify: verify_peer,
        },
        ctx: b.build(),
        chain_only_without_host: false,
    })
}

/// `keys.psk`: `username:hexkey` lines (GnuTLS's psktool format).
fn parse_psk_file(text: &str) -> Result<HashMap<String, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (user, hex) = line
            .split_once(':')
            .ok_or_else(|| format!("keys.psk line {}: expected username:hexkey", n + 1))?;
        let key = decode_hex(hex)
            .ok_or_else(|| format!("keys.psk line {}: the key is not hexadecimal", n + 1))?;
        keys.entry(user.to_string()).or_insert(key);
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 2 * 512 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn load_psk(
    id: String,
    endpoint: Endpoint,
    dir: &Path,
    username: String,
) -> Result<TlsCreds, String> {
    load_psk_file(id, endpoint, &dir.join("keys.psk"), username)
}

fn load_psk_file(
    id: String,
    endpoint: Endpoint,
    file: &Path,
    username: String,
) -> Result<TlsCreds, String> {
    access(file)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("Unable to read {}: {e}", file.display()))?;
    let keys = Arc::new(parse_psk_file(&text)?);
    let mut b = builder()?;
    match endpoint {
        Endpoint::Client => {
            let key = keys.get(&username).cloned().ok_or_else(|| {
                format!(
                    "Key for username {username} not found in {}",
                    file.display()
                )
            })?;
            let user = username.clone();
            b.set_psk_client_callback(move |_ssl, _hint, ident, psk| {
                // The identity goes out NUL-terminated.
                if user.len() >= ident.len() || key.len() > psk.len() {
                    return Err(openssl::error::ErrorStack::get());
                }
                ident[..user.len()].copy_from_slice(user.as_bytes());
                ident[user.len()] = 0;
                psk[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
        }
        Endpoint::Server => {
            let table = Arc::clone(&keys);
            b.set_psk_server_callback(move |_ssl, ident, psk| {
                let key = ident
                    .and_then(|i| std::str::from_utf8(i).ok())
                    .and_then(|i| table.get(i));
                match key {
                    Some(k) if k.len() <= psk.len() => {
                        psk[..k.len()].copy_from_slice(k);
                        Ok(k.len())
                    }
                    // Zero length: an unknown identity fails the handshake.
                    _ => Ok(0),
                }
            });
        }
    }
    // PSK suites for TLS 1.2 peers; TLS 1.3 uses its own PSK mode with (EC)DHE.
    b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:HIGH:!aNULL")
        .map_err(|e| e.to_string())?;
    Ok(TlsCreds {
        id,
        endpoint,
        kind: Kind::Psk,
        ctx: b.build(),
        chain_only_without_host: false,
    })
}

// ---------------------------------------------------------------------------------
// The session.

/// The session's ends in memory: ciphertext received and not yet decrypted, and
/// ciphertext produced and not yet sent.
#[derive(Debug, Default)]
struct MemIo {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
    /// Where the received ciphertext is in its record framing.
    records: Records,
}

/// Follows the TLS record framing (a 5-byte header whose last two bytes are the
/// length of the body) of the bytes received, so an end of the socket inside a
/// record can be told from an end between records.
#[derive(Debug, Default)]
struct Records {
    header: [u8; 5],
    have: usize,
    body_left: usize,
}

impl Records {
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
            }
        }
    }

    /// Whether the bytes so far end inside a record.
    fn inside(&self) -> bool {
        self.have > 0 || self.body_left > 0
    }
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.input[self.pos..];
        if avail.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.pos += n;
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MemIo {
    fn feed(&mut self, data: &[u8]) {
        self.records.advance(data);
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(data);
    }
}

struct Shared {
    ssl: Mutex<SslStream<MemIo>>,
    /// Held while ciphertext goes to the socket, so records leave in the order they
    /// were made; never held by the reader.
    send: Mutex<()>,
}

/// A TLS connection over a TCP or Unix socket. Clones share the session: one may
/// read while others write (a single reader at a time, as every NBD peer has).
pub struct TlsStream {
    raw: Box<Stream>,
    shared: Arc<Shared>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream({:?})", self.raw)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_err(e: openssl::ssl::Error) -> io::Error {
    if let Some(io) = e.io_error() {
        return io::Error::new(io.kind(), io.to_string());
    }
    let why = match e.ssl_error() {
        Some(stack) => stack
            .errors()
            .iter()
            .map(|x| x.reason().unwrap_or("unknown error").to_string())
            .collect::<Vec<_>>()
            .join(", "),
        None => e.to_string(),
    };
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS error: {why}"))
}

/// How a failed handshake reads: the certificate check's own reason when it failed.
fn handshake_err(e: openssl::ssl::Error, ssl: &SslStream<MemIo>, host: Option<&str>) -> io::Error {
    let v = ssl.ssl().verify_result();
    if v.as_raw() == openssl_sys_verify::HOSTNAME_MISMATCH
        || v.as_raw() == openssl_sys_verify::IP_MISMATCH
    {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "Certificate does not match the hostname {}",
                host.unwrap_or("")
            ),
        );
    }
    if v.as_raw() != 0 {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "TLS handshake failed: the certificate is not trusted: {}",
                v.error_string()
            ),
        );
    }
    let e = tls_err(e);
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "TLS handshake failed: {}",
            e.to_string().trim_start_matches("TLS error: ")
        ),
    )
}

/// X509_V_ERR_* values the handshake error names.
mod openssl_sys_verify {
    pub const HOSTNAME_MISMATCH: i32 = 62;
    pub const IP_MISMATCH: i32 = 64;
}

fn send(raw: &mut Stream, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    raw.write_all(data)
}

/// Runs the handshake on `raw` (its timeouts bound each wait).
fn handshake(mut raw: Stream, ssl: Ssl, server: bool, host: Option<&str>) -> io::Result<TlsStream> {
    let mut s = SslStream::new(ssl, MemIo::default()).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let r = if server { s.accept() } else { s.connect() };
        // What the step produced goes out first: data, or the alert of a failure.
        let out = std::mem::take(&mut s.get_mut().output);
        let sent = send(&mut raw, &out);
        match r {
            Ok(()) => {
                sent?;
                break;
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                sent?;
                let n = raw.read(&mut buf).map_err(|e| {
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    } else {
                        e
                    }
                })?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "TLS handshake failed: the peer closed the connection",
                    ));
                }
                s.get_mut().feed(&buf[..n]);
            }
            Err(e) => return Err(handshake_err(e, &s, host)),
        }
    }
    Ok(TlsStream {
        raw: Box::new(raw),
        shared: Arc::new(Shared {
            ssl: Mutex::new(s),
            send: Mutex::new(()),
        }),
        rbuf: buf,
        wbuf: Vec::new(),
    })
}

/// The client's side of `NBD_OPT_STARTTLS` once the server acknowledged it: checks
/// the server's certificate (and `hostname`, when given: QEMU checks the host of a
/// TCP address unless `tls-hostname` replaces it) or proves the PSK.
pub fn connect(raw: Stream, creds: &TlsCreds, hostname: Option<&str>) -> io::Result<Stream> {
    let mut ssl = Ssl::new(&creds.ctx).map_err(io::Error::other)?;
    if let (Kind::X509 { verify: true }, None, false) =
        (&creds.kind, hostname, creds.chain_only_without_host)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "No hostname for certificate validation",
        ));
    }
    if let (Kind::X509 { .. }, Some(h)) = (&creds.kind, hostname) {
        match h.parse::<std::net::IpAddr>() {
            Ok(ip) => ssl.param_mut().set_ip(ip),
            Err(_) => {
                ssl.set_hostname(h).map_err(io::Error::other)?;
                ssl.param_mut().set_host(h)
            }
        }
        .map_err(io::Error::other)?;
    }
    let s = handshake(raw, ssl, false, hostname)?;
    tracing::debug!("NBD TLS: {}", s.describe());
    Ok(Stream::Tls(s))
}

/// The server's side of `NBD_OPT_STARTTLS` (after its ACK). With `authz`, the
/// client's identity (its certificate's distinguished name, or its PSK username)
/// must be the one allowed.
pub fn accept(raw: Stream, creds: &TlsCreds, authz: Option<&str>) -> io::Result<Stream> {
    let ssl = Ssl::new(&creds.ctx).map_err(io::Error::other)?;
    let s = handshake(raw, ssl, true, None)?;
    if let Some(allowed) = authz {
        let who = {
            let st = lock(&s.shared.ssl);
            match creds.kind {
                Kind::Psk => st
                    .ssl()
                    .psk_identity()
                    .map(|i| String::from_utf8_lossy(i).into_owned()),
                Kind::X509 { .. } => st.ssl().peer_certificate().map(|c| dn(c.subject_name())),
            }
        };
        if who.as_deref() != Some(allowed) {
            let _ = s.raw.shutdown(Shutdown::Both);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "TLS x509 authz check for {} is denied",
                    who.as_deref().unwrap_or("<no identity>")
                ),
            ));
        }
    }
    Ok(Stream::Tls(s))
}

/// A distinguished name as GnuTLS (and so QEMU's authz) writes it: RFC 4514, the most
/// specific component first (`CN=client,O=Example,C=GB`).
fn dn(name: &openssl::x509::X509NameRef) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in name.entries() {
        let key = match e.object().nid().short_name() {
            Ok("emailAddress") => "EMAIL".to_string(),
            Ok(k) => k.to_string(),
            Err(_) => e.object().to_string(),
        };
        let val = e.data().to_string().unwrap_or_default();
        parts.push(format!("{key}={}", escape_dn(&val)));
    }
    parts.reverse();
    parts.join(",")
}

fn escape_dn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl TlsStream {
    /// Another handle on the same session and socket.
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            raw: Box::new(self.raw.try_clone()?),
            shared: Arc::clone(&self.shared),
            rbuf: vec![0u8; 64 << 10],
            wbuf: Vec::new(),
        })
    }

    /// The protocol version and cipher agreed (`TLSv1.3 TLS_AES_256_GCM_SHA384`), for
    /// logs.
    pub fn describe(&self) -> String {
        let st = lock(&self.shared.ssl);
        let cipher = st.ssl().current_cipher().map(|c| c.name()).unwrap_or("-");
        format!("{} {cipher}", st.ssl().version_str())
    }

    /// The socket under the session.
    pub fn raw(&self) -> &Stream {
        &self.raw
    }

    /// Shuts the socket down; a close_notify goes first when no writer is busy.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how != Shutdown::Read {
            if let Ok(_g) = self.shared.send.try_lock() {
                let out = self.shared.ssl.try_lock().ok().map(|mut st| {
                    let _ = st.shutdown();
                    std::mem::take(&mut st.get_mut().output)
                });
                if let (Some(out), Ok(mut raw)) = (out, self.raw.try_clone()) {
                    let _ = raw.set_write_timeout(Some(std::time::Duration::from_millis(100)));
                    let _ = send(&mut raw, &out);
                }
            }
        }
        self.raw.shutdown(how)
    }

    fn encrypt(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let _g = lock(&self.shared.send);
        let mut total = 0;
        {
            let mut st = lock(&self.shared.ssl);
            for b in bufs {
                let mut done = 0;
                while done < b.len() {
                    done += st.ssl_write(&b[done..]).map_err(tls_err)?;
                }
                total += b.len();
            }
            self.wbuf.clear();
            std::mem::swap(&mut self.wbuf, &mut st.get_mut().output);
        }
        let r = self.raw.write_all(&self.wbuf);
        self.wbuf.clear();
        r.map(|()| total)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut st = lock(&self.shared.ssl);
                match st.ssl_read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                    Err(e) => return Err(tls_err(e)),
                }
            }
            // The socket is read with no lock held: writers go on meanwhile.
            let n = self.raw.read(&mut self.rbuf)?;
            if n == 0 {
                // The end of the socket inside a record is a cut stream, not an end.
                if lock(&self.shared.ssl).get_ref().records.inside() {
                    // Not UnexpectedEof: callers read that as a clean close.
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the TLS stream was cut in the middle of a record",
                    ));
                }
                return Ok(0);
            }
            lock(&self.shared.ssl).get_mut().feed(&self.rbuf[..n]);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.encrypt(&[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.encrypt(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_and_bound() {
        let k = parse_psk_file("qemu:00ff10\nalice:abcd\r\n\n").unwrap();
        assert_eq!(k["qemu"], vec![0, 0xff, 0x10]);
        assert_eq!(k["alice"], vec![0xab, 0xcd]);
        assert!(parse_psk_file("nocolon").is_err());
        assert!(parse_psk_file("u:abc").is_err());
        assert!(parse_psk_file("u:zz").is_err());
        assert!(parse_psk_file(&format!("u:{}", "00".repeat(513))).is_err());
    }

    #[test]
    fn record_framing_is_followed_across_chunks() {
        let mut r = Records::default();
        // A header split in two, a 3-byte body, then a whole empty record.
        r.advance(&[23, 3]);
        assert!(r.inside());
        r.advance(&[3, 0, 3, 1, 2]);
        assert!(r.inside());
        r.advance(&[3, 23, 3, 3, 0, 0]);
        assert!(!r.inside());
        r.advance(&[23, 3, 3, 0x40, 0]);
        r.advance(&[0; 0x4000]);
        assert!(!r.inside());
    }

    #[test]
    fn dn_escaping() {
        assert_eq!(escape_dn("a,b"), "a\\,b");
        assert_eq!(escape_dn(" x "), "\\ x\\ ");
        assert_eq!(escape_dn("plain"), "plain");
    }

    #[test]
    fn objects_are_checked() {
        assert!(define_object("secret,id=s,data=x").is_none());
        let e = define_object("tls-creds-x509,id=t1,dir=/nonexistent,endpoint=server")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e,
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        );
        let e = define_object("tls-creds-psk,id=t2,bogus=1")
            .unwrap()
            .unwrap_err();
        assert_eq!(e, "Property 'tls-creds-psk.bogus' not found");
        define_object("authz-simple,id=az1,identity=CN=x")
            .unwrap()
            .unwrap();
        assert_eq!(lookup_authz("az1").unwrap(), "CN=x");
        assert!(lookup("nope", Endpoint::Client).is_err());
    }
}
