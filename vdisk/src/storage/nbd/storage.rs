//! [`NbdStorage`]: an NBD export as a [`Storage`], and the protocol's `open`.
//!
//! Reads and writes are split at the server's maximum block size and pipelined (over
//! several connections with the `connections` key and a CAN_MULTI_CONN server); reads past the end of the export read as zeroes (as a file's do),
//! writes past it fail (an export cannot grow). `punch_hole` is `WRITE_ZEROES` that
//! may unmap (never `TRIM`: a trimmed range need not read as zeroes); write-through
//! cache modes send writes with FUA. Block status comes from `base:allocation`; the
//! last reply is kept so a walk over an image asks once per reply, not per extent.

use super::client::{Address, Config, ExportInfo, Pool, Request};
use super::proto;
use crate::storage::options::{Node, SpecError};
use crate::storage::registry::ProtocolOpen;
use crate::storage::{uri, Storage, StorageError, StorageOp, StorageResult};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a request may wait for the server when the node sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests in flight on one connection.
const IN_FLIGHT: usize = 16;

/// Block status runs from one reply: where they start, and (length, data) each.
type Runs = (u64, Vec<(u64, bool)>);

/// An NBD export.
#[derive(Debug)]
pub struct NbdStorage {
    conn: Pool,
    name: String,
    read_only: bool,
    fua: bool,
    ignore_flush: bool,
    /// Serialises read-modify-write of unaligned writes (servers with a minimum block
    /// size above 1).
    rmw: Mutex<()>,
    /// The last block status reply: start and merged (length, data) runs.
    extents: Mutex<Option<Runs>>,
    /// Bumped by every change, so a block status reply that raced a write is not kept.
    generation: AtomicU64,
}

impl NbdStorage {
    /// Connects to the export `cfg` names; `name` is how messages name it.
    pub fn connect(cfg: &Config, name: String, ctx: &ProtocolOpen) -> StorageResult<NbdStorage> {
        // The caller names the image ("Could not open 'NAME': …"); the reason follows.
        let conn = Pool::open(cfg).map_err(StorageError::from)?;
        let info = conn.info;
        if !ctx.read_only && info.has(proto::TFLAG_READ_ONLY) {
            return Err(StorageError::from(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the NBD export is read-only",
            )));
        }
        Ok(NbdStorage {
            conn,
            name,
            read_only: ctx.read_only,
            fua: ctx.cache.write_through(),
            ignore_flush: ctx.cache.ignore_flush(),
            rmw: Mutex::new(()),
            extents: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    /// What negotiation found.
    pub fn info(&self) -> ExportInfo {
        self.conn.info
    }

    /// How many connections to the export are open.
    pub fn connections(&self) -> usize {
        self.conn.connections()
    }

    fn err(&self, op: StorageOp, offset: u64, e: io::Error) -> StorageError {
        StorageError::op(op, &self.name, Some(offset), e)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        *self.extents.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn writable(&self, op: StorageOp, offset: u64, len: u64) -> StorageResult<()> {
        if self.read_only {
            return Err(self.err(op, offset, io::Error::from_raw_os_error(libc::EROFS)));
        }
        let size = self.conn.info.size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(self.err(
                op,
                offset,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at offset {offset} reach past the end of the NBD export ({size} bytes)"),
                ),
            ));
        }
        Ok(())
    }

    /// Whether `offset..offset+len` is aligned to the server's minimum block size.
    fn aligned(&self, offset: u64, len: u64) -> bool {
        let m = self.conn.info.min_block as u64;
        offset.is_multiple_of(m) && len.is_multiple_of(m)
    }

    /// Largest request that keeps the minimum-block alignment.
    fn max_request(&self) -> u64 {
        self.conn.info.max_block as u64
    }

    /// Reads an aligned range inside the export.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Each READ's payload is received straight into its part of `buf`.
        self.conn
            .read_into(buf, offset, self.max_request() as usize)
    }

    /// Writes an aligned range inside the export.
    fn write_aligned(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let step = self.max_request() as usize;
        let flags = if self.fua && self.conn.info.has(proto::TFLAG_SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        };
        let reqs = buf
            .chunks(step)
            .enumerate()
            .map(|(i, c)| Request::write(flags, offset + (i * step) as u64, c));
        self.conn.call_many(reqs, |_, _| {})?;
        if self.fua && flags == 0 {
            self.flush_now()?;
        }
        Ok(())
    }

    /// The aligned range around `offset..offset+len`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let m = self.conn.info.min_block as u64;
        let start = offset / m * m;
        let end = (offset + len).div_ceil(m) * m;
        (start, end.min(self.conn.info.size.div_ceil(m) * m) - start)
    }

    fn flush_now(&self) -> io::Result<()> {
        if self.conn.info.has(proto::TFLAG_SEND_FLUSH) {
            self.conn.call(Request::new(proto::CMD_FLUSH, 0, 0, 0))?;
        }
        Ok(())
    }

    /// `WRITE_ZEROES` over a range inside the export (falling back to writing zeroes).
    fn zeroes(&self, op: StorageOp, offset: u64, len: u64, may_unmap: bool) -> StorageResult<()> {
        self.writable(op.clone(), offset, len)?;
        self.changed();
        let r = if self.conn.info.has(proto::TFLAG_SEND_WRITE_ZEROES) && self.aligned(offset, len) {
            let mut flags = if may_unmap {
                0
            } else {
                proto::CMD_FLAG_NO_HOLE
            };
            if self.fua && self.conn.info.has(proto::TFLAG_SEND_FUA) {
                flags |= proto::CMD_FLAG_FUA;
            }
            // The length field is 32 bits: requests of at most 2 GiB, kept aligned.
            let step =
                (1u64 << 31) / self.conn.info.min_block as u64 * self.conn.info.min_block as u64;
            let reqs = split(proto::CMD_WRITE_ZEROES, flags, offset, len, step);
            self.conn.call_many(reqs, |_, _| {})
        } else {
            let chunk = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            let mut r = Ok(());
            while done < len && r.is_ok() {
                let n = (len - done).min(chunk.len() as u64) as usize;
                r = self
                    .write_at(&chunk[..n], offset + done)
                    .map_err(|e| match e {
                        StorageError::Io { source, .. } => source,
                        e => io::Error::other(e.to_string()),
                    });
                done += n as u64;
            }
            r
        };
        self.changed();
        r.map_err(|e| self.err(op, offset, e))
    }

    /// Block status at `offset` from the kept reply, if it covers it.
    fn cached_extent(&self, offset: u64) -> Option<(bool, u64)> {
        let g = self.extents.lock().unwrap_or_else(|p| p.into_inner());
        let (start, runs) = g.as_ref()?;
        let mut at = *start;
        if offset < at {
            return None;
        }
        for &(len, data) in runs {
            if offset < at + len {
                return Some((data, at + len - offset));
            }
            at += len;
        }
        None
    }
}

/// Requests of at most `step` bytes covering `offset..offset+len`.
fn split(
    typ: u16,
    flags: u16,
    offset: u64,
    len: u64,
    step: u64,
) -> impl Iterator<Item = Request<'static>> {
    (0..len.div_ceil(step)).map(move |i| {
        let o = i * step;
        Request::new(typ, flags, offset + o, (len - o).min(step) as u32)
    })
}

/// Merges `base:allocation` descriptors into (length, data) runs; a range is a hole
/// only when the server says it is both unallocated and zero.
fn runs(extents: &[(u32, u32)], max: u64) -> Vec<(u64, bool)> {
    let mut out: Vec<(u64, bool)> = Vec::new();
    let mut total = 0u64;
    for &(len, flags) in extents {
        if len == 0 || total >= max {
            break;
        }
        let len = (len as u64).min(max - total);
        let hole = flags & proto::STATE_HOLE != 0 && flags & proto::STATE_ZERO != 0;
        match out.last_mut() {
            Some((l, d)) if *d != hole => *l += len,
            _ => out.push((len, !hole)),
        }
        total += len;
    }
    out
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        let size = self.conn.info.size;
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        let buf = &mut buf[..inside];
        let r = if self.aligned(offset, inside as u64) {
            self.read_aligned(buf, offset)
        } else {
            let (start, len) = self.widen(offset, inside as u64);
            let mut tmp = vec![0; len as usize];
            self.read_aligned(&mut tmp, start).map(|()| {
                let o = (offset - start) as usize;
                buf.copy_from_slice(&tmp[o..o + inside]);
            })
        };
        r.map_err(|e| self.err(StorageOp::Read, offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.writable(StorageOp::Write, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.changed();
        let r = if self.aligned(offset, buf.len() as u64) {
            self.write_aligned(buf, offset)
        } else {
            let _g = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
            let (start, len) = self.widen(offset, buf.len() as u64);
            let mut tmp = vec![0; len as usize];
            self.read_aligned(&mut tmp, start).and_then(|()| {
                let o = (offset - start) as usize;
                tmp[o..o + buf.len()].copy_from_slice(buf);
                self.write_aligned(&tmp, start)
            })
        };
        self.changed();
        r.map_err(|e| self.err(StorageOp::Write, offset, e))
    }

    fn flush(&self) -> StorageResult<()> {
        if self.read_only || self.ignore_flush {
            return Ok(());
        }
        self.flush_now()
            .map_err(|e| StorageError::op(StorageOp::Flush, &self.name, None, e))
    }

    fn len(&self) -> StorageResult<u64> {
        Ok(self.conn.info.size)
    }

    fn set_len(&self, len: u64) -> StorageResult<()> {
        if len == self.conn.info.size {
            return Ok(());
        }
        Err(StorageError::op(
            StorageOp::Truncate,
            &self.name,
            None,
            io::Error::new(io::ErrorKind::Unsupported, "Cannot resize NBD nodes"),
        ))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.zeroes(StorageOp::PunchHole, offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.zeroes(StorageOp::WriteZeroes, offset, len, false)
    }

    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.writable(StorageOp::Allocate, offset, len)
    }

    fn extent_at(&self, offset: u64) -> StorageResult<(bool, u64)> {
        let size = self.conn.info.size;
        if offset >= size {
            return Ok((false, 0));
        }
        let Some(_) = self.conn.info.alloc_context else {
            return Ok((true, size - offset));
        };
        if let Some(e) = self.cached_extent(offset) {
            return Ok(e);
        }
        let gen = self.generation.load(Ordering::Acquire);
        let m = self.conn.info.min_block as u64;
        let len = (size - offset).min(u32::MAX as u64 / m * m).max(1);
        let r = self
            .conn
            .call(Request::new(proto::CMD_BLOCK_STATUS, 0, offset, len as u32))
            .map_err(|e| self.err(StorageOp::SeekData, offset, e))?;
        let runs = runs(&r.extents, size - offset);
        let Some(&(first_len, data)) = runs.first() else {
            return Err(self.err(
                StorageOp::SeekData,
                offset,
                io::Error::new(io::ErrorKind::InvalidData, "empty NBD block status reply"),
            ));
        };
        let mut g = self.extents.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) == gen {
            *g = Some((offset, runs));
        }
        Ok((data, first_len))
    }

    fn alignment(&self) -> usize {
        self.conn.info.min_block as usize
    }

    fn protocol_name(&self) -> &'static str {
        super::PROTOCOL.name
    }

    fn exact_filename(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

/// How QEMU names an NBD node (`nbd_refresh_filename`): the name messages and
/// `info` use.
pub fn display_name(address: &Address, export: &str) -> String {
    match (address, export) {
        (Address::Unix(p), "") => format!("nbd+unix://?socket={}", p.display()),
        (Address::Unix(p), e) => format!("nbd+unix:///{e}?socket={}", p.display()),
        (Address::Tcp(h, port), "") => format!("nbd://{h}:{port}"),
        (Address::Tcp(h, port), e) => format!("nbd://{h}:{port}/{e}"),
    }
}

fn seconds(node: &mut Node, key: &str) -> Result<Option<Duration>, SpecError> {
    let Some(v) = node.take_scalar(key)? else {
        return Ok(None);
    };
    let bad = || SpecError::Value {
        key: node.key_path(key),
        expected: "a number of seconds".into(),
    };
    let s: f64 = v.parse().map_err(|_| bad())?;
    if !(0.0..=86_400.0 * 365.0).contains(&s) {
        return Err(bad());
    }
    Ok(Some(Duration::from_secs_f64(s)))
}

/// vdisk's own `connections` key (QEMU's nbd client has none; nbdcopy's
/// `--connections`): how many connections to open when the server advertises
/// CAN_MULTI_CONN. Default 1, as QEMU.
fn connections(node: &mut Node) -> Result<usize, SpecError> {
    let Some(v) = node.take_scalar("connections")? else {
        return Ok(1);
    };
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=super::client::MAX_CONNECTIONS).contains(n))
        .ok_or_else(|| SpecError::Value {
            key: node.key_path("connections"),
            expected: format!(
                "a number of connections from 1 to {}",
                super::client::MAX_CONNECTIONS
            ),
        })
}

/// libnbd's URL credentials (`tls-certificates`, `tls-psk-file` with `tls-username`,
/// and vdisk's `tls-verify-peer`), if the node names them.
fn url_creds(node: &mut Node) -> Result<Option<super::tls::UrlCreds>, SpecError> {
    use super::tls::UrlCreds;
    let dir = node.take_str("tls-certificates")?;
    let file = node.take_str("tls-psk-file")?;
    let user = node.take_str("tls-username")?;
    let verify = node.take_bool("tls-verify-peer")?;
    let misplaced = |what: &str| {
        SpecError::Missing(format!(
            "{what} goes with {}",
            match what {
                "tls-username" => "tls-psk-file",
                _ => "tls-certificates",
            }
        ))
    };
    Ok(match (dir, file) {
        (None, None) if user.is_some() => return Err(misplaced("tls-username")),
        (None, None) if verify.is_some() => return Err(misplaced("tls-verify-peer")),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(SpecError::Missing(
                "tls-certificates and tls-psk-file are exclusive".into(),
            ))
        }
        (Some(dir), None) => {
            if user.is_some() {
                return Err(misplaced("tls-username"));
            }
            Some(UrlCreds::Certificates {
                dir: dir.into(),
                verify: verify.unwrap_or(true),
            })
        }
        (None, Some(file)) => {
            if verify.is_some() {
                return Err(misplaced("tls-verify-peer"));
            }
            Some(UrlCreds::PskFile {
                file: file.into(),
                username: user.or_else(super::tls::local_username),
            })
        }
    })
}

/// The protocol's open: QEMU's keys → a connected [`NbdStorage`].
pub fn open(mut node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    let typ = node.take_str("server.type")?;
    let address = match typ.as_deref() {
        Some("unix") => {
            let path = node
                .take_str("server.path")?
                .filter(|p| !p.is_empty())
                .ok_or_else(|| SpecError::Missing("Parameter 'server.path' is missing".into()))?;
            Address::Unix(path.into())
        }
        Some("inet") => {
            let host = node
                .take_str("server.host")?
                .filter(|h| !h.is_empty())
                .ok_or_else(|| SpecError::Missing("Parameter 'server.host' is missing".into()))?;
            let port = match node.take_scalar("server.port")? {
                None => super::DEFAULT_PORT,
                Some(p) => uri::parse_port(&p).map_err(|e| SpecError::Value {
                    key: node.key_path("server.port"),
                    expected: e,
                })?,
            };
            Address::Tcp(host, port)
        }
        Some(_) => {
            return Err(SpecError::Value {
                key: node.key_path("server.type"),
                expected: "'inet' or 'unix'".into(),
            }
            .into())
        }
        None => return Err(SpecError::Missing("Parameter 'server.type' is missing".into()).into()),
    };
    let export = node.take_str("export")?.unwrap_or_default();
    let tls_hostname = node.take_str("tls-hostname")?;
    let url_creds = url_creds(&mut node)?;
    let creds = match (node.take_str("tls-creds")?, url_creds) {
        (None, None) => None,
        (Some(id), None) => Some(
            super::tls::lookup(&id, super::tls::Endpoint::Client).map_err(SpecError::Missing)?,
        ),
        (None, Some(c)) => Some(super::tls::load_url_creds(&c).map_err(SpecError::Missing)?),
        (Some(_), Some(_)) => {
            return Err(SpecError::Missing(
                "tls-creds and tls-certificates/tls-psk-file are exclusive".into(),
            )
            .into())
        }
    };
    let tls = match creds {
        None => None,
        Some(creds) => {
            // QEMU checks the TCP host unless tls-hostname names another.
            let hostname = tls_hostname.or_else(|| match (&address, creds.is_x509()) {
                (Address::Tcp(h, _), true) => Some(h.clone()),
                _ => None,
            });
            Some(super::tls::ClientTls { creds, hostname })
        }
    };
    // vdisk does not reconnect: a lost connection fails its requests at once.
    let _ = seconds(&mut node, "reconnect-delay")?;
    let open_timeout = seconds(&mut node, "open-timeout")?.unwrap_or_default();
    let timeout = seconds(&mut node, "timeout")?
        .filter(|t| !t.is_zero())
        .unwrap_or(DEFAULT_TIMEOUT);
    let connections = connections(&mut node)?;
    let name = match node.take_str("x-url")? {
        Some(url) => url,
        None => display_name(&address, &export),
    };
    node.finish(|key| SpecError::ProtocolOption {
        protocol: super::PROTOCOL.name.into(),
        key,
    })?;
    let cfg = Config {
        address,
        export,
        timeout,
        open_timeout,
        max_in_flight: IN_FLIGHT,
        tls,
        connections,
    };
    Ok(Arc::new(NbdStorage::connect(&cfg, name, ctx)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_only_zero_holes_are_holes() {
        let h = proto::STATE_HOLE | proto::STATE_ZERO;
        assert_eq!(
            runs(
                &[
                    (512, 0),
                    (512, 0),
                    (1024, h),
                    (4096, proto::STATE_HOLE),
                    (8, h)
                ],
                1 << 20
            ),
            [(1024, true), (1024, false), (4096, true), (8, false)]
        );
        assert_eq!(runs(&[(4096, h)], 100), [(100, false)]);
        assert!(runs(&[(0, 0)], 100).is_empty());
    }

    #[test]
    fn names_are_qemus() {
        assert_eq!(
            display_name(&Address::Unix("/tmp/s".into()), "ex"),
            "nbd+unix:///ex?socket=/tmp/s"
        );
        assert_eq!(
            display_name(&Address::Unix("/tmp/s".into()), ""),
            "nbd+unix://?socket=/tmp/s"
        );
        assert_eq!(
            display_name(&Address::Tcp("localhost".into(), 10809), "x"),
            "nbd://localhost:10809/x"
        );
    }
}
