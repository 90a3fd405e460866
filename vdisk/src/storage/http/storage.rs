//! [`HttpStorage`]: a file on a web server, read-only, through HTTP range requests.
//!
//! The size comes from a `HEAD` request (the server must answer `Accept-Ranges:
//! bytes`, as QEMU's curl driver demands). Reads go through a bounded cache of
//! `readahead`-sized blocks: a miss fetches the run of missing blocks around it in one
//! ranged `GET`, so small sequential reads (a format's metadata, a guest's boot) cost a
//! round trip per block, not per read. One agent keeps connections alive between
//! requests. Connection failures, timeouts, 5xx answers and short bodies are retried
//! with exponential backoff; every answer is checked (status, `Content-Range`, body
//! length) before its bytes are used.

use super::auth::{self, Credentials};
use crate::storage::cache::{BlockCache, ReadPolicy};
use crate::storage::options::{Node, SpecError};
use crate::storage::registry::ProtocolOpen;
use crate::storage::{Storage, StorageError, StorageOp, StorageResult};
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

/// QEMU's default readahead (and our cache block size): 256 KiB.
pub const DEFAULT_READAHEAD: u64 = 256 << 10;
/// QEMU's default timeout, in seconds.
pub const DEFAULT_TIMEOUT: u64 = 5;
/// Memory the block cache may hold.
const CACHE_BYTES: u64 = 64 << 20;
/// Longest run of blocks fetched by one GET.
const MAX_FETCH: u64 = 8 << 20;
/// Reads of at least this many bytes bypass the cache.
const BYPASS: u64 = 1 << 20;
/// Tries per request (the first and the retries).
const TRIES: u32 = 4;
/// The first retry's delay; each later one doubles it.
const BACKOFF: Duration = Duration::from_millis(100);

/// A remote file.
#[derive(Debug)]
pub struct HttpStorage {
    agent: ureq::Agent,
    url: String,
    protocol: &'static str,
    creds: Credentials,
    size: u64,
    cache: BlockCache,
}

/// What a failed request tells the retry loop.
enum Failure {
    /// Worth another try (connection, timeout, 5xx, short body).
    Transient(String),
    /// Final (4xx, a server that ignores ranges).
    Fatal(String),
}

impl HttpStorage {
    /// Opens `url` (its size by `HEAD`).
    pub(super) fn open(
        url: String,
        protocol: &'static str,
        readahead: u64,
        timeout: Duration,
        sslverify: bool,
        creds: Credentials,
    ) -> StorageResult<HttpStorage> {
        let mut tls = ureq::tls::TlsConfig::builder().disable_verification(!sslverify);
        if let Some(roots) = custom_roots()? {
            tls = tls.root_certs(roots);
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .tls_config(tls.build())
            .proxy(creds.proxy.clone())
            .build()
            .new_agent();
        let block = readahead.max(4096);
        let mut s = HttpStorage {
            agent,
            url,
            protocol,
            creds,
            size: 0,
            cache: BlockCache::new(block, (CACHE_BYTES / block).max(1) as usize),
        };
        s.size = s.retry(|| s.head()).map_err(StorageError::from)?;
        Ok(s)
    }

    fn head(&self) -> Result<u64, Failure> {
        let mut req = self.agent.head(&self.url);
        if let Some(c) = &self.creds.cookie {
            req = req.header("Cookie", c.as_str());
        }
        if let Some(a) = &self.creds.authorization {
            req = req.header("Authorization", a.as_str());
        }
        let resp = req.call().map_err(transport)?;
        let status = resp.status().as_u16();
        self.check_status(status)?;
        let h = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok());
        if !h("accept-ranges").is_some_and(|v| v.split(',').any(|t| t.trim() == "bytes")) {
            return Err(Failure::Fatal(
                "Server does not support 'range' (byte ranges).".into(),
            ));
        }
        h("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| Failure::Fatal("Server didn't report the file size".into()))
    }

    /// One ranged GET of `dst.len()` bytes at `offset` (inside the file) into `dst`.
    fn get(&self, offset: u64, dst: &mut [u8]) -> Result<(), Failure> {
        let len = dst.len() as u64;
        let last = offset + len - 1;
        let mut req = self
            .agent
            .get(&self.url)
            .header("Range", format!("bytes={offset}-{last}"));
        if let Some(c) = &self.creds.cookie {
            req = req.header("Cookie", c.as_str());
        }
        if let Some(a) = &self.creds.authorization {
            req = req.header("Authorization", a.as_str());
        }
        let resp = req.call().map_err(transport)?;
        let status = resp.status().as_u16();
        self.check_status(status)?;
        match status {
            206 => {
                let cr = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if parse_content_range(cr) != Some((offset, last)) {
                    return Err(Failure::Fatal(format!(
                        "Server answered bytes {offset}-{last} with Content-Range '{cr}'"
                    )));
                }
            }
            200 if offset == 0 && len == self.size => {}
            s => {
                return Err(Failure::Fatal(format!(
                    "Server ignored the range request (HTTP {s})"
                )))
            }
        }
        let mut body = resp.into_body();
        let mut r = body.with_config().limit(len + 1).reader();
        let mut got = 0;
        while got < dst.len() {
            match r.read(&mut dst[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Transient(format!("reading the body failed: {e}"))),
            }
        }
        if got != dst.len() || r.read(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
            return Err(Failure::Transient(format!(
                "body of the wrong length: {got} bytes read of {len}"
            )));
        }
        Ok(())
    }

    /// Runs `f` up to [`TRIES`] times while it fails transiently.
    fn retry<T>(&self, mut f: impl FnMut() -> Result<T, Failure>) -> io::Result<T> {
        let mut delay = BACKOFF;
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(m)) => return Err(io::Error::other(m)),
                Err(Failure::Transient(m)) if attempt >= TRIES => {
                    return Err(io::Error::other(format!("{m} (after {TRIES} tries)")))
                }
                Err(Failure::Transient(m)) => {
                    tracing::debug!("{}: {m}; retrying in {delay:?}", self.url);
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// The retry loop's view of an answer's status; 401 names what was (not) sent.
    fn check_status(&self, status: u16) -> Result<(), Failure> {
        match status {
            401 if self.creds.has_authorization() => Err(Failure::Fatal(
                "HTTP 401 Unauthorized: the server refused the username and password".into(),
            )),
            401 => Err(Failure::Fatal(
                "HTTP 401 Unauthorized: the server wants a username and password \
                 (username, password-secret)"
                    .into(),
            )),
            s => check_status(s),
        }
    }

    fn read_only(&self, op: StorageOp, offset: Option<u64>) -> StorageError {
        StorageError::op(
            op,
            &self.url,
            offset,
            io::Error::from_raw_os_error(libc::EROFS),
        )
    }
}

fn check_status(status: u16) -> Result<(), Failure> {
    match status {
        200..=299 => Ok(()),
        500..=599 | 408 | 429 => Err(Failure::Transient(format!("HTTP {status}"))),
        s => Err(Failure::Fatal(format!("HTTP {s}"))),
    }
}

fn transport(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::HostNotFound | ureq::Error::InvalidProxyUrl => {
            Failure::Fatal(e.to_string())
        }
        // A proxy that wants (other) credentials will not change its mind.
        ureq::Error::ConnectProxyFailed(r) if r.contains("407") => Failure::Fatal(format!(
            "HTTP 407 Proxy Authentication Required: the proxy refused the request \
             (proxy-username, proxy-password-secret; {r})"
        )),
        e => Failure::Transient(e.to_string()),
    }
}

/// `bytes FIRST-LAST/TOTAL` → (first, last).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let r = v.trim().strip_prefix("bytes ")?;
    let (range, _total) = r.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Extra trust anchors from `SSL_CERT_FILE` (PEM), as curl and OpenSSL honour it;
/// without it, the Mozilla roots built in.
fn custom_roots() -> StorageResult<Option<ureq::tls::RootCerts>> {
    let Some(path) = std::env::var_os("SSL_CERT_FILE") else {
        return Ok(None);
    };
    let name = std::path::Path::new(&path).display().to_string();
    let pem =
        std::fs::read(&path).map_err(|e| StorageError::op(StorageOp::Open, &name, None, e))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(StorageError::op(
            StorageOp::Open,
            &name,
            None,
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no PEM certificate in SSL_CERT_FILE",
            ),
        ));
    }
    Ok(Some(ureq::tls::RootCerts::new_with_certs(&certs)))
}

impl Storage for HttpStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        let policy = ReadPolicy {
            size: self.size,
            max_fetch: MAX_FETCH,
            bypass: BYPASS,
        };
        self.cache
            .read(&policy, buf, offset, |off, dst| {
                self.retry(|| self.get(off, dst))
            })
            .map_err(|e| StorageError::op(StorageOp::Read, &self.url, Some(offset), e))
    }

    fn write_at(&self, _buf: &[u8], offset: u64) -> StorageResult<()> {
        Err(self.read_only(StorageOp::Write, Some(offset)))
    }

    fn flush(&self) -> StorageResult<()> {
        Ok(())
    }

    fn len(&self) -> StorageResult<u64> {
        Ok(self.size)
    }

    fn set_len(&self, _len: u64) -> StorageResult<()> {
        Err(self.read_only(StorageOp::Truncate, None))
    }

    fn punch_hole(&self, offset: u64, _len: u64) -> StorageResult<()> {
        Err(self.read_only(StorageOp::PunchHole, Some(offset)))
    }

    fn write_zeroes(&self, offset: u64, _len: u64) -> StorageResult<()> {
        Err(self.read_only(StorageOp::WriteZeroes, Some(offset)))
    }

    fn allocate(&self, offset: u64, _len: u64) -> StorageResult<()> {
        Err(self.read_only(StorageOp::Allocate, Some(offset)))
    }

    fn protocol_name(&self) -> &'static str {
        self.protocol
    }

    fn exact_filename(&self) -> Option<String> {
        Some(self.url.clone())
    }
}

/// A size with an optional K/M/G suffix (QEMU's size syntax, binary units).
fn size(node: &Node, key: &str, v: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::Value {
        key: node.key_path(key),
        expected: "a size".into(),
    };
    let v = v.trim();
    let (num, mul) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 1u64 << 10),
        Some(b'M') => (&v[..v.len() - 1], 1 << 20),
        Some(b'G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(bad)
}

/// The protocol's open (`protocol` is `http` or `https`).
pub fn open(
    mut node: Node,
    ctx: &ProtocolOpen,
    protocol: &'static str,
) -> StorageResult<Arc<dyn Storage>> {
    let url = node
        .take_str("url")?
        .ok_or_else(|| SpecError::Missing("Parameter 'url' is missing".into()))?;
    let readahead = match node.take_scalar("readahead")? {
        None => DEFAULT_READAHEAD,
        Some(v) => {
            let n = size(&node, "readahead", &v)?;
            if n % 512 != 0 || n > 1 << 30 {
                return Err(SpecError::Value {
                    key: node.key_path("readahead"),
                    expected: "a multiple of 512 bytes, at most 1 GiB".into(),
                }
                .into());
            }
            n
        }
    };
    let timeout = match node.take_scalar("timeout")? {
        None => DEFAULT_TIMEOUT,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|t| (1..=100_000).contains(t))
            .ok_or_else(|| SpecError::Value {
                key: node.key_path("timeout"),
                expected: "a number of seconds from 1 to 100000".into(),
            })?,
    };
    let sslverify = node.take_bool("sslverify")?.unwrap_or(true);
    let creds = auth::take(&mut node)?;
    node.finish(|key| SpecError::ProtocolOption {
        protocol: protocol.into(),
        key,
    })?;
    if !ctx.read_only {
        return Err(StorageError::from(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "curl block device does not support writes",
        )));
    }
    Ok(Arc::new(HttpStorage::open(
        url,
        protocol,
        readahead,
        Duration::from_secs(timeout),
        sslverify,
        creds,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn sizes_take_suffixes() {
        let n = Node::new();
        assert_eq!(size(&n, "r", "512").unwrap(), 512);
        assert_eq!(size(&n, "r", "64k").unwrap(), 64 << 10);
        assert_eq!(size(&n, "r", "1M").unwrap(), 1 << 20);
        assert!(size(&n, "r", "x").is_err());
    }
}
