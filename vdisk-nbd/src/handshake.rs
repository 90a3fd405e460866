//! Fixed-newstyle negotiation: greeting, option haggling, and the choice of reply style
//! and metadata contexts for the transmission phase.
//!
//! Every read is bounded by a deadline so a client that stalls in the handshake can't
//! hold a connection slot forever; every option length is bounded before anything is
//! allocated.

use crate::export::{Export, MetaContext};
use crate::proto::{self, Buf};
use crate::stream::Stream;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};
use vdisk::storage::nbd::tls::{self, ServerTls};

/// Largest option payload we read into memory; larger ones are skipped and refused
/// (the biggest legitimate one is a meta-context request with a few queries).
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Queries per meta-context request we look at.
const MAX_QUERIES: u32 = 128;

/// What the client and server agreed on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies (implied by extended headers).
    pub structured: bool,
    /// Extended (64-bit) headers.
    pub extended: bool,
    /// Metadata contexts selected for BLOCK_STATUS.
    pub contexts: Vec<MetaContext>,
}

/// How the handshake ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client chose the export: serve it.
    Transmission(Negotiated),
    /// The client aborted or was dropped for breaking the protocol.
    Closed(String),
}

/// A reader whose every `read` gives up at a fixed deadline.
struct Deadline<'a> {
    s: &'a mut Stream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake time limit reached",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

fn opt_reply(s: &mut Stream, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Buf::with_capacity(20 + data.len());
    b.u64(proto::REPLY_MAGIC_OPT)
        .u32(opt)
        .u32(typ)
        .u32(data.len() as u32)
        .bytes(data);
    s.write_all(&b.0)
}

fn opt_error(s: &mut Stream, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
    opt_reply(s, opt, typ, msg.as_bytes())
}

/// A cursor over an option's payload that reports truncation instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, n: u32) -> Option<&'a str> {
        if n as usize > proto::MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n as usize)?).ok()
    }
}

/// INFO/GO request: export name and information requests.
fn parse_info(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cursor(data);
    let nlen = c.u32()?;
    let name = c.string(nlen)?;
    let n = c.u16()?;
    let mut reqs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        reqs.push(c.u16()?);
    }
    if !c.0.is_empty() {
        return None;
    }
    Some((name, reqs))
}

/// META_CONTEXT request: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cursor(data);
    let nlen = c.u32()?;
    let name = c.string(nlen)?;
    let n = c.u32()?;
    if n > MAX_QUERIES {
        return None;
    }
    let mut qs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let l = c.u32()?;
        qs.push(c.string(l)?);
    }
    if !c.0.is_empty() {
        return None;
    }
    Some((name, qs))
}

/// Runs the handshake on a fresh connection. With `tls`, the client must upgrade with
/// `NBD_OPT_STARTTLS` first, as qemu-nbd demands: every other option before it gets
/// `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME`, which has no error reply, a hang-up),
/// and `s` is the TLS session from then on.
pub fn negotiate(
    s: &mut Stream,
    export: &Export,
    limit: Duration,
    tls: Option<&ServerTls>,
) -> io::Result<Outcome> {
    let until = Instant::now() + limit;
    s.set_write_timeout(Some(limit))?;
    let mut greet = Buf::with_capacity(18);
    greet
        .u64(proto::NBDMAGIC)
        .u64(proto::IHAVEOPT)
        .u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&greet.0)?;
    let cflags = proto::read_u32(&mut Deadline { s, until })?;
    if cflags & !proto::CLIENT_FLAGS_KNOWN != 0 {
        return Ok(Outcome::Closed(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & proto::FLAG_NO_ZEROES as u32 != 0;
    let mut neg = Negotiated::default();
    let mut secure = false;
    loop {
        let (magic, opt, len) = {
            let mut r = Deadline { s, until };
            (
                proto::read_u64(&mut r)?,
                proto::read_u32(&mut r)?,
                proto::read_u32(&mut r)?,
            )
        };
        if magic != proto::IHAVEOPT {
            return Ok(Outcome::Closed(format!("bad option magic {magic:#x}")));
        }
        if len > MAX_OPTION_LEN {
            proto::skip(&mut Deadline { s, until }, len as u64)?;
            if opt == proto::OPT_EXPORT_NAME {
                return Ok(Outcome::Closed(format!("export name of {len} bytes")));
            }
            opt_error(s, opt, proto::REP_ERR_TOO_BIG, "option data too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        Deadline { s, until }.read_exact(&mut data)?;
        if let (Some(t), false) = (tls, secure) {
            match opt {
                proto::OPT_STARTTLS if !data.is_empty() => {
                    opt_error(
                        s,
                        opt,
                        proto::REP_ERR_INVALID,
                        "OPT_STARTTLS should not have length",
                    )?;
                }
                proto::OPT_STARTTLS => {
                    opt_reply(s, opt, proto::REP_ACK, &[])?;
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Outcome::Closed("handshake time limit reached".into()));
                    }
                    s.set_read_timeout(Some(left))?;
                    match tls::accept(s.try_clone()?, &t.creds, t.authz.as_deref()) {
                        Ok(t) => {
                            if let Stream::Tls(t) = &t {
                                crate::vlog!("{}: TLS {}", t.raw().peer(), t.describe());
                            }
                            *s = t
                        }
                        Err(e) => return Ok(Outcome::Closed(e.to_string())),
                    }
                    secure = true;
                }
                proto::OPT_EXPORT_NAME => {
                    return Ok(Outcome::Closed(
                        "Option 0x1 not permitted before TLS".into(),
                    ))
                }
                proto::OPT_ABORT => {
                    let _ = opt_reply(s, opt, proto::REP_ACK, &[]);
                    return Ok(Outcome::Closed("client aborted negotiation".into()));
                }
                other => {
                    let msg = format!("Option {other:#x} not permitted before TLS");
                    opt_error(s, opt, proto::REP_ERR_TLS_REQD, &msg)?;
                }
            }
            continue;
        }
        match opt {
            proto::OPT_EXPORT_NAME => {
                let ok = std::str::from_utf8(&data).ok() == Some(export.cfg.name.as_str());
                if !ok || neg.extended {
                    // This option has no error reply: all we can do is hang up.
                    return Ok(Outcome::Closed("unknown export or bad EXPORT_NAME".into()));
                }
                let mut b = Buf::with_capacity(134);
                b.u64(export.size()).u16(export.transmission_flags(
                    neg.structured,
                    neg.extended,
                    !neg.contexts.is_empty(),
                ));
                if !no_zeroes {
                    b.bytes(&[0u8; 124]);
                }
                s.write_all(&b.0)?;
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                return Ok(Outcome::Transmission(neg));
            }
            proto::OPT_ABORT => {
                // The client may already be gone; the ACK is a courtesy.
                let _ = opt_reply(s, opt, proto::REP_ACK, &[]);
                return Ok(Outcome::Closed("client aborted negotiation".into()));
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    opt_error(s, opt, proto::REP_ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                let name = export.cfg.name.as_bytes();
                let mut b = Buf::default();
                b.u32(name.len() as u32).bytes(name);
                if let Some(d) = &export.cfg.description {
                    b.bytes(d.as_bytes());
                }
                opt_reply(s, opt, proto::REP_SERVER, &b.0)?;
                opt_reply(s, opt, proto::REP_ACK, &[])?;
            }
            proto::OPT_STARTTLS if secure => {
                opt_error(s, opt, proto::REP_ERR_INVALID, "TLS already enabled")?;
            }
            proto::OPT_STARTTLS => {
                opt_error(s, opt, proto::REP_ERR_POLICY, "TLS not configured")?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some((name, reqs)) = parse_info(&data) else {
                    opt_error(s, opt, proto::REP_ERR_INVALID, "malformed INFO/GO request")?;
                    continue;
                };
                if name != export.cfg.name {
                    let msg = format!("export '{name}' not present");
                    opt_error(s, opt, proto::REP_ERR_UNKNOWN, &msg)?;
                    continue;
                }
                let mut info = Buf::default();
                info.u16(proto::INFO_EXPORT)
                    .u64(export.size())
                    .u16(export.transmission_flags(
                        neg.structured,
                        neg.extended,
                        !neg.contexts.is_empty(),
                    ));
                opt_reply(s, opt, proto::REP_INFO, &info.0)?;
                if reqs.contains(&proto::INFO_NAME) {
                    let mut b = Buf::default();
                    b.u16(proto::INFO_NAME).bytes(export.cfg.name.as_bytes());
                    opt_reply(s, opt, proto::REP_INFO, &b.0)?;
                }
                if let (true, Some(d)) = (
                    reqs.contains(&proto::INFO_DESCRIPTION),
                    &export.cfg.description,
                ) {
                    let mut b = Buf::default();
                    b.u16(proto::INFO_DESCRIPTION).bytes(d.as_bytes());
                    opt_reply(s, opt, proto::REP_INFO, &b.0)?;
                }
                // Sent unasked too, as qemu-nbd does.
                let mut b = Buf::default();
                b.u16(proto::INFO_BLOCK_SIZE)
                    .u32(export.min_block())
                    .u32(proto::PREFERRED_BLOCK)
                    .u32(proto::MAX_PAYLOAD);
                opt_reply(s, opt, proto::REP_INFO, &b.0)?;
                opt_reply(s, opt, proto::REP_ACK, &[])?;
                if opt == proto::OPT_GO {
                    s.set_read_timeout(None)?;
                    s.set_write_timeout(None)?;
                    return Ok(Outcome::Transmission(neg));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_error(s, opt, proto::REP_ERR_INVALID, "option takes no data")?;
                } else if neg.extended {
                    opt_error(
                        s,
                        opt,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )?;
                } else if neg.structured {
                    opt_error(
                        s,
                        opt,
                        proto::REP_ERR_INVALID,
                        "structured replies already negotiated",
                    )?;
                } else {
                    neg.structured = true;
                    opt_reply(s, opt, proto::REP_ACK, &[])?;
                }
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    opt_error(s, opt, proto::REP_ERR_INVALID, "option takes no data")?;
                } else if neg.extended {
                    opt_error(
                        s,
                        opt,
                        proto::REP_ERR_INVALID,
                        "extended headers already negotiated",
                    )?;
                } else {
                    neg.extended = true;
                    neg.structured = true;
                    opt_reply(s, opt, proto::REP_ACK, &[])?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    neg.contexts.clear();
                }
                if !neg.structured {
                    opt_error(
                        s,
                        opt,
                        proto::REP_ERR_INVALID,
                        "structured replies not negotiated",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    opt_error(
                        s,
                        opt,
                        proto::REP_ERR_INVALID,
                        "malformed meta context request",
                    )?;
                    continue;
                };
                if name != export.cfg.name {
                    let msg = format!("export '{name}' not present");
                    opt_error(s, opt, proto::REP_ERR_UNKNOWN, &msg)?;
                    continue;
                }
                let mut chosen: Vec<MetaContext> = Vec::new();
                if set {
                    for q in &queries {
                        if let Some(c) = export.select_context(q) {
                            if !chosen.contains(&c) {
                                chosen.push(c);
                            }
                        }
                    }
                } else if queries.is_empty() {
                    chosen = export.contexts();
                } else {
                    for q in &queries {
                        for c in export.list_contexts(q) {
                            if !chosen.contains(&c) {
                                chosen.push(c);
                            }
                        }
                    }
                }
                for c in &chosen {
                    let mut b = Buf::default();
                    b.u32(if set { c.id() } else { 0 })
                        .bytes(export.context_name(*c).as_bytes());
                    opt_reply(s, opt, proto::REP_META_CONTEXT, &b.0)?;
                }
                opt_reply(s, opt, proto::REP_ACK, &[])?;
                if set {
                    neg.contexts = chosen;
                }
            }
            other => {
                let msg = format!("option {other} not supported");
                opt_error(s, opt, proto::REP_ERR_UNSUP, &msg)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parsing_rejects_truncation() {
        let mut b = Buf::default();
        b.u32(3).bytes(b"abc").u16(2).u16(1).u16(3);
        assert_eq!(parse_info(&b.0), Some(("abc", vec![1, 3])));
        assert_eq!(parse_info(&b.0[..b.0.len() - 1]), None);
        let mut huge = Buf::default();
        huge.u32(u32::MAX).bytes(b"x");
        assert_eq!(parse_info(&huge.0), None);
    }

    #[test]
    fn meta_parsing_bounds_queries() {
        let mut b = Buf::default();
        b.u32(0).u32(2).u32(5).bytes(b"base:").u32(3).bytes(b"q:x");
        assert_eq!(parse_meta(&b.0), Some(("", vec!["base:", "q:x"])));
        let mut bad = Buf::default();
        bad.u32(0).u32(1).u32(100).bytes(b"short");
        assert_eq!(parse_meta(&bad.0), None);
    }
}
