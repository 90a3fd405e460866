//! virtio-blk on the wire: the request header, discard/write-zeroes segments, the
//! device configuration space, and the split of an untrusted descriptor chain into
//! header, data and status. Everything here is pure: it works on descriptor lists and
//! byte arrays, so it is tested without guest memory.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Bytes per virtio-blk sector (fixed by the spec, whatever the block size).
pub const SECTOR: u64 = 512;
/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Segments accepted in one discard or write-zeroes request (`max_discard_seg`).
pub const MAX_SEGMENTS: u32 = 16;
/// Largest discard / write-zeroes segment, in sectors (1 GiB).
pub const MAX_SEGMENT_SECTORS: u32 = 1 << 21;
/// Data descriptors accepted in one request (`seg_max`).
pub const SEG_MAX: u32 = 254;
/// Size of the configuration space this device exposes (up to `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: usize = 60;

/// One descriptor of a chain, as the guest gave it (untrusted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A byte range of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read (`VIRTIO_BLK_T_IN`).
    In,
    /// Write (`VIRTIO_BLK_T_OUT`).
    Out,
    /// Flush.
    Flush,
    /// Device id string.
    GetId,
    /// Discard segments.
    Discard,
    /// Write-zeroes segments.
    WriteZeroes,
    /// Anything else (answered with UNSUPP).
    Other(u32),
}

impl Kind {
    /// From the header's `type` field.
    pub fn from_type(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            t => Kind::Other(t),
        }
    }
}

/// Why a chain cannot be served at all (the device answers IOERR when it has a place
/// for the status byte, and only returns the chain otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// No device-writable byte at the end for the status.
    NoStatus,
    /// Fewer than 16 device-readable bytes at the start for the header.
    ShortHeader,
    /// A readable descriptor after a writable one (the spec puts all readable first).
    Order,
    /// More data descriptors than `seg_max`.
    TooManySegments,
}

/// A chain split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Where the 16 header bytes are (one or more spans).
    pub header: Vec<Span>,
    /// Device-readable data after the header.
    pub readable: Vec<Span>,
    /// Device-writable data before the status byte.
    pub writable: Vec<Span>,
    /// The status byte.
    pub status: u64,
}

impl Layout {
    /// Total bytes of `readable`.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }
    /// Total bytes of `writable`.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Splits a descriptor chain: header (first 16 readable bytes), readable data, writable
/// data, status (last writable byte). Zero-length descriptors are dropped. The caller
/// bounds the chain's length (the queue size does).
pub fn layout(descs: &[Desc]) -> Result<Layout, ChainError> {
    let mut descs: Vec<Desc> = descs.iter().copied().filter(|d| d.len > 0).collect();
    // Status: the last byte of the last descriptor, which must be writable.
    let last = descs.pop().ok_or(ChainError::NoStatus)?;
    if !last.write {
        return Err(ChainError::NoStatus);
    }
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or(ChainError::NoStatus)?;
    if last.len > 1 {
        descs.push(Desc {
            addr: last.addr,
            len: last.len - 1,
            write: true,
        });
    }
    let mut header = Vec::new();
    let mut need = HEADER_LEN as u32;
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        if d.write {
            if need > 0 {
                return Err(ChainError::ShortHeader);
            }
            writable.push(Span {
                addr: d.addr,
                len: d.len,
            });
            continue;
        }
        if !writable.is_empty() {
            return Err(ChainError::Order);
        }
        let take = need.min(d.len);
        if take > 0 {
            header.push(Span {
                addr: d.addr,
                len: take,
            });
            need -= take;
        }
        if d.len > take {
            readable.push(Span {
                addr: d
                    .addr
                    .checked_add(u64::from(take))
                    .ok_or(ChainError::Order)?,
                len: d.len - take,
            });
        }
    }
    if need > 0 {
        return Err(ChainError::ShortHeader);
    }
    if readable.len() + writable.len() > SEG_MAX as usize {
        return Err(ChainError::TooManySegments);
    }
    Ok(Layout {
        header,
        readable,
        writable,
        status,
    })
}

/// The request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request type.
    pub kind: Kind,
    /// First sector (512 bytes each).
    pub sector: u64,
}

impl Header {
    /// Decodes the 16 little-endian header bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let t = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        Header {
            kind: Kind::from_type(t),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u32,
    /// Flags (bit 0: unmap, write-zeroes only).
    pub flags: u32,
}

/// `flags` bit of a write-zeroes segment: the range may be deallocated.
pub const SEGMENT_UNMAP: u32 = 1;

impl Segment {
    /// Decodes one 16-byte segment.
    pub fn decode(b: &[u8]) -> Segment {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[0..8]);
        Segment {
            sector: u64::from_le_bytes(s),
            sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// Byte range of `sectors` sectors from `sector`, if it lies inside a disk of `size`
/// bytes (overflow counts as outside).
pub fn byte_range(sector: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    let off = sector.checked_mul(SECTOR)?;
    let end = off.checked_add(len)?;
    (end <= size).then_some((off, len))
}

/// What the configuration space says.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Disk size in bytes.
    pub size: u64,
    /// Request queues.
    pub num_queues: u16,
    /// Logical block size reported (512 or 4096).
    pub blk_size: u32,
}

/// Encodes `struct virtio_blk_config` up to `write_zeroes_may_unmap` (little-endian).
pub fn encode_config(c: &Config) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    b[0..8].copy_from_slice(&(c.size / SECTOR).to_le_bytes()); // capacity
    b[8..12].copy_from_slice(&0u32.to_le_bytes()); // size_max (feature not offered)
    b[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
                                                       // 16..20 geometry: not offered.
    b[20..24].copy_from_slice(&c.blk_size.to_le_bytes()); // blk_size
                                                          // 24..32 topology: not offered.
    b[32] = 1; // writeback
    b[34..36].copy_from_slice(&c.num_queues.to_le_bytes()); // num_queues
    b[36..40].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes()); // max_discard_sectors
    b[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_discard_seg
    b[44..48].copy_from_slice(&(c.blk_size / SECTOR as u32).to_le_bytes()); // discard_sector_alignment
    b[48..52].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    b[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    b[56] = 1; // write_zeroes_may_unmap
    b
}

/// The GET_ID answer: the serial, cut or zero-padded to 20 bytes.
pub fn encode_id(serial: &str) -> [u8; ID_BYTES] {
    let mut b = [0u8; ID_BYTES];
    let s = serial.as_bytes();
    let n = s.len().min(ID_BYTES);
    b[..n].copy_from_slice(&s[..n]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }

    #[test]
    fn linux_read_layout() {
        let l = layout(&[r(0x1000, 16), w(0x2000, 4096), w(0x3000, 1)]).unwrap();
        assert_eq!(
            l.header,
            vec![Span {
                addr: 0x1000,
                len: 16
            }]
        );
        assert!(l.readable.is_empty());
        assert_eq!(
            l.writable,
            vec![Span {
                addr: 0x2000,
                len: 4096
            }]
        );
        assert_eq!(l.status, 0x3000);
    }

    #[test]
    fn header_split_and_data_in_one_descriptor() {
        // Header across two descriptors, the second carrying data too; the status
        // shares the last writable descriptor.
        let l = layout(&[r(0x100, 10), r(0x200, 518), w(0x900, 9)]).unwrap();
        assert_eq!(
            l.header,
            vec![
                Span {
                    addr: 0x100,
                    len: 10
                },
                Span {
                    addr: 0x200,
                    len: 6
                }
            ]
        );
        assert_eq!(
            l.readable,
            vec![Span {
                addr: 0x206,
                len: 512
            }]
        );
        assert_eq!(
            l.writable,
            vec![Span {
                addr: 0x900,
                len: 8
            }]
        );
        assert_eq!(l.status, 0x908);
    }

    #[test]
    fn malformed_chains() {
        assert_eq!(layout(&[]), Err(ChainError::NoStatus));
        assert_eq!(layout(&[r(0, 16), r(16, 1)]), Err(ChainError::NoStatus));
        assert_eq!(layout(&[r(0, 8), w(16, 1)]), Err(ChainError::ShortHeader));
        assert_eq!(layout(&[w(0, 64), w(64, 1)]), Err(ChainError::ShortHeader));
        assert_eq!(
            layout(&[r(0, 16), w(16, 8), r(32, 8), w(64, 1)]),
            Err(ChainError::Order)
        );
        // Status byte address overflow.
        assert_eq!(
            layout(&[r(0, 16), w(u64::MAX, 2)]),
            Err(ChainError::NoStatus)
        );
        let mut many = vec![r(0, 16)];
        many.extend((0..300).map(|i| r(0x1000 + i * 512, 512)));
        many.push(w(0x9000, 1));
        assert_eq!(layout(&many), Err(ChainError::TooManySegments));
        // Zero-length descriptors are ignored, not trusted.
        let l = layout(&[r(0, 0), r(0, 16), w(5, 0), w(7, 1)]).unwrap();
        assert_eq!(l.status, 7);
    }

    #[test]
    fn header_and_segment_decoding() {
        let mut h = [0u8; 16];
        h[0] = 1;
        h[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(
            Header::decode(&h),
            Header {
                kind: Kind::Out,
                sector: 0x0102_0304_0506_0708
            }
        );
        h[0] = 99;
        assert_eq!(Header::decode(&h).kind, Kind::Other(99));
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&7u64.to_le_bytes());
        s[8..12].copy_from_slice(&3u32.to_le_bytes());
        s[12..16].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            Segment::decode(&s),
            Segment {
                sector: 7,
                sectors: 3,
                flags: 1
            }
        );
    }

    #[test]
    fn ranges_and_config() {
        assert_eq!(byte_range(2, 1024, 4096), Some((1024, 1024)));
        assert_eq!(byte_range(7, 1024, 4096), None);
        assert_eq!(byte_range(u64::MAX / 256, 512, u64::MAX), None);
        assert_eq!(byte_range(0, u64::MAX, u64::MAX - 1), None);
        let c = encode_config(&Config {
            size: 1 << 30,
            num_queues: 4,
            blk_size: 512,
        });
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_SEGMENTS
        );
        assert_eq!(&encode_id("vdisk")[..6], b"vdisk\0");
        assert_eq!(encode_id(&"x".repeat(30)), [b'x'; 20]);
    }
}
