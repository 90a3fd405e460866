//! NBD wire format: every constant and every header layout of the protocol lives here
//! (NetworkBlockDevice `doc/proto.md`, including the extended-headers extension).
//! All integers on the wire are big-endian. The server (`vdisk-nbd`) and the client
//! storage ([`super`]) both encode and decode through this module.

use std::io::{self, Read};

/// `NBDMAGIC`, first word the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting, and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Oldstyle negotiation's second word (servers that predate options; not spoken).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags we understand.
pub const CLIENT_FLAGS_KNOWN: u32 = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32;

/// Options (client to server during negotiation).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// STARTTLS (not offered).
pub const OPT_STARTTLS: u32 = 5;
/// Export information without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Export information then transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Enable extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply types with this bit set are errors.
pub const REP_ERR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: TLS required / not available.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option error: request too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Option error: extended headers negotiated, structured replies can't downgrade.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// TRIM supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// DF on READ supported (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Flushes are visible across connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// FAST_ZERO supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// BLOCK_STATUS payload form supported (extended headers only).
pub const TFLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Compact request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request magic.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: READ must not be fragmented.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: BLOCK_STATUS wants one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: WRITE_ZEROES must fail fast if it can't be fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: the length field is a payload length (extended headers).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk: nothing (final).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk: 32-bit block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk: 64-bit block status descriptors (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk types with this bit set are errors.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk: error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Errors in replies.
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space (write past the end).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported (e.g. FAST_ZERO that can't be fast).
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status bit: hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Largest READ/WRITE payload we accept (advertised maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, query, description) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Maps a host errno to the restricted set of NBD error values.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Maps an NBD error value to the host errno it stands for (unknown values are EIO).
pub fn host_errno(error: u32) -> i32 {
    match error {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// Reads a big-endian u16.
pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian u32.
pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian u64.
pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads and throws away `n` bytes in small pieces (bounded memory).
pub fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed {} bytes into a {n}-byte payload", got),
        ));
    }
    Ok(())
}

/// A big-endian byte-string builder for messages.
#[derive(Default)]
pub struct Buf(pub Vec<u8>);

impl Buf {
    /// An empty buffer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Buf {
        Buf(Vec::with_capacity(n))
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// A request header as received, in a form common to compact and extended headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// Client's opaque cookie.
    pub cookie: u64,
    /// Export offset.
    pub offset: u64,
    /// Length: payload length for WRITE (and PAYLOAD_LEN), effect length otherwise.
    pub length: u64,
}

/// Why a request header could not be read.
#[derive(Debug)]
pub enum HeaderError {
    /// The socket failed or closed.
    Io(io::Error),
    /// The magic number is wrong: the stream can't be trusted any more.
    BadMagic(u32),
}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        HeaderError::Io(e)
    }
}

/// Reads one request header (28 bytes compact, 32 extended).
pub fn read_request(r: &mut impl Read, extended: bool) -> Result<Request, HeaderError> {
    let mut h = [0u8; 32];
    let n = if extended { 32 } else { 28 };
    r.read_exact(&mut h[..n])?;
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(HeaderError::BadMagic(magic));
    }
    let be64 = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_be_bytes(a)
    };
    let length = if extended {
        be64(&h[24..32])
    } else {
        u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as u64
    };
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        typ: u16::from_be_bytes([h[6], h[7]]),
        cookie: be64(&h[8..16]),
        offset: be64(&h[16..24]),
        length,
    })
}

/// Encodes a reply chunk header (structured or extended) into `out`.
pub fn chunk_header(
    out: &mut Buf,
    extended: bool,
    flags: u16,
    typ: u16,
    cookie: u64,
    req_offset: u64,
    len: u64,
) {
    if extended {
        out.u32(EXTENDED_REPLY_MAGIC)
            .u16(flags)
            .u16(typ)
            .u64(cookie)
            .u64(req_offset)
            .u64(len);
    } else {
        out.u32(STRUCTURED_REPLY_MAGIC)
            .u16(flags)
            .u16(typ)
            .u64(cookie)
            .u32(len as u32);
    }
}

/// Encodes a request header: 28 bytes compact (`length` must then fit 32 bits), 32
/// bytes extended (64-bit length).
pub fn request_header(
    out: &mut Buf,
    extended: bool,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) {
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    out.u32(magic).u16(flags).u16(typ).u64(cookie).u64(offset);
    if extended {
        out.u64(length);
    } else {
        out.u32(length as u32);
    }
}

/// Encodes a simple reply header.
pub fn simple_header(out: &mut Buf, error: u32, cookie: u64) {
    out.u32(SIMPLE_REPLY_MAGIC).u32(error).u64(cookie);
}

/// Human name of a command, for messages.
pub fn cmd_name(t: u16) -> &'static str {
    match t {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_round_trip() {
        let mut b = Buf::default();
        b.u32(REQUEST_MAGIC)
            .u16(CMD_FLAG_FUA)
            .u16(CMD_WRITE)
            .u64(7)
            .u64(4096)
            .u32(512);
        let r = read_request(&mut &b.0[..], false).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                typ: CMD_WRITE,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        assert!(matches!(
            read_request(&mut &b.0[..], true),
            Err(HeaderError::Io(_))
        ));
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut b = Buf::default();
        b.u32(0xdead_beef).bytes(&[0u8; 24]);
        assert!(matches!(
            read_request(&mut &b.0[..], false),
            Err(HeaderError::BadMagic(0xdead_beef))
        ));
    }

    #[test]
    fn extended_request_has_64_bit_length() {
        let mut b = Buf::default();
        b.u32(EXTENDED_REQUEST_MAGIC)
            .u16(0)
            .u16(CMD_TRIM)
            .u64(1)
            .u64(0)
            .u64(1 << 40);
        let r = read_request(&mut &b.0[..], true).unwrap();
        assert_eq!(r.length, 1 << 40);
    }

    #[test]
    fn request_headers_round_trip_both_sizes() {
        for ext in [false, true] {
            let mut b = Buf::default();
            request_header(&mut b, ext, CMD_FLAG_FUA, CMD_WRITE, 9, 1 << 33, 4096);
            assert_eq!(b.0.len(), if ext { 32 } else { 28 });
            let r = read_request(&mut &b.0[..], ext).unwrap();
            assert_eq!(
                r,
                Request {
                    flags: CMD_FLAG_FUA,
                    typ: CMD_WRITE,
                    cookie: 9,
                    offset: 1 << 33,
                    length: 4096
                }
            );
        }
    }

    #[test]
    fn errno_mapping_is_restricted() {
        assert_eq!(nbd_errno(libc::EDQUOT), ENOSPC);
        assert_eq!(nbd_errno(libc::EROFS), EPERM);
        assert_eq!(nbd_errno(libc::ELOOP), EIO);
    }
}
