//! Helpers every format uses: backing reads past the end, range checks, qemu's size
//! and boolean option syntax.

use super::Driver;
use crate::error::{Error, Invalid, Result};
use std::sync::Arc;

/// Reads from a backing image into `buf`; bytes past the backing image's end (or all of
/// them without a backing image) read as zeroes.
pub fn read_backing(backing: Option<&Arc<dyn Driver>>, buf: &mut [u8], offset: u64) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let size = b.size();
    let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        b.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// Checks that `[offset, offset+len)` lies inside a guest disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Invalid::PastEnd { offset, len, size }.into()),
    }
}

/// The gate every [`Driver::direct`] passes first: a write needs a writable image
/// (`writable`), and the range must lie inside a guest disk of `size` bytes.
pub fn direct_gate(write: bool, writable: Result<()>, offset: u64, len: u64, size: u64) -> bool {
    (!write || writable.is_ok()) && check_range(offset, len, size).is_ok()
}

/// Parses a size with qemu's suffixes (`k`, `M`, `G`, `T`, `P`, `E`, binary; `b` = 512-byte
/// sectors are not accepted, as in qemu-img 10; a bare number is bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let bad = || Error::from(Invalid::BadSize(s.to_string()));
    let suffix = |c: char| -> Option<u64> {
        Some(match c.to_ascii_uppercase() {
            'B' => 1,
            'K' => 1 << 10,
            'M' => 1 << 20,
            'G' => 1 << 30,
            'T' => 1 << 40,
            'P' => 1 << 50,
            'E' => 1 << 60,
            _ => return None,
        })
    };
    // Hexadecimal, as qemu-img reads it: "0x" (any case) and hex digits only — no
    // suffix, no fraction ("0x1B" is 27 bytes, "0x2M" is refused).
    if s.len() > 2 && s[..2].eq_ignore_ascii_case("0x") {
        let hex = &s[2..];
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], suffix(c).ok_or_else(bad)?),
        _ => (s, 1),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if f.is_nan() || f < 0.0 {
        return Err(bad());
    }
    let v = f * mult as f64;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// Parses an on/off option value the way qemu does.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Invalid::BadBool(key.to_string()).into()),
    }
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_as_qemu_reads_them() {
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("0x100000").unwrap(), 1 << 20);
        assert_eq!(parse_size("0X10").unwrap(), 16);
        // Hex digits only: B is a digit here, not the byte suffix; no suffixes.
        assert_eq!(parse_size("0x1B").unwrap(), 27);
        for bad in ["0x", "0xg", "0x1.5", "0x2M", "0x1Bk", "1x", "", "k"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
