//! Output exactly as qemu-img prints it: QEMU's pretty JSON (QDict key order included)
//! and its human-readable sizes.

use std::ffi::CString;

/// Number of hash buckets of a QEMU `QDict`; its iteration order follows the buckets.
const QDICT_BUCKETS: u32 = 512;

/// The bucket QEMU's `QDict` puts `key` in (its `tdb_hash` modulo the bucket count).
fn qdict_bucket(key: &str) -> u32 {
    let mut v: u32 = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        v = v.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % QDICT_BUCKETS
}

/// A JSON value as QEMU's QObject model holds it.
#[derive(Clone, Debug)]
pub enum QValue {
    /// Integer.
    Int(i128),
    /// Boolean.
    Bool(bool),
    /// String.
    Str(String),
    /// Array.
    List(Vec<QValue>),
    /// Object, keys in the order QEMU's visitor inserts them.
    Dict(QDict),
}

/// An object; printed in QEMU's hash-table order, not insertion order.
#[derive(Clone, Debug, Default)]
pub struct QDict {
    entries: Vec<(String, QValue)>,
}

impl QDict {
    /// An empty object.
    pub fn new() -> Self {
        QDict::default()
    }
    /// Inserts (or replaces) a key, in QAPI field order.
    pub fn put(&mut self, key: &str, v: QValue) {
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_string(), v));
    }
    /// Inserts an integer.
    pub fn int(&mut self, key: &str, v: impl Into<i128>) {
        self.put(key, QValue::Int(v.into()));
    }
    /// Inserts a boolean.
    pub fn bool(&mut self, key: &str, v: bool) {
        self.put(key, QValue::Bool(v));
    }
    /// Inserts a string.
    pub fn str(&mut self, key: &str, v: impl Into<String>) {
        self.put(key, QValue::Str(v.into()));
    }
    /// Entries in the order QEMU iterates them: by bucket, and within a bucket the most
    /// recently inserted first (QEMU inserts at the head of a bucket's list).
    fn ordered(&self) -> Vec<&(String, QValue)> {
        let mut v: Vec<(usize, &(String, QValue))> = self.entries.iter().enumerate().collect();
        v.sort_by(|(ia, a), (ib, b)| qdict_bucket(&a.0).cmp(&qdict_bucket(&b.0)).then(ib.cmp(ia)));
        v.into_iter().map(|(_, e)| e).collect()
    }
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    for _ in 0..indent {
        out.push_str("    ");
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_value(out: &mut String, v: &QValue, indent: usize) {
    match v {
        QValue::Int(i) => out.push_str(&i.to_string()),
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::Str(s) => quote(out, s),
        QValue::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                write_value(out, item, indent + 1);
            }
            newline(out, indent);
            out.push(']');
        }
        QValue::Dict(d) => {
            out.push('{');
            for (i, (k, item)) in d.ordered().into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                quote(out, k);
                out.push_str(": ");
                write_value(out, item, indent + 1);
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// QEMU's pretty JSON of `v` (no trailing newline).
/// A dict as qemu-img's human output dumps one (`dump_qdict` in QEMU's
/// `block/qapi.c`): its order, `-` in keys shown as spaces, four spaces per level,
/// list elements as `[i]:`.
pub fn dump_human(d: &QDict, indent: usize) -> String {
    let mut out = String::new();
    dump_dict(&mut out, d, indent);
    out
}

fn dump_scalar(v: &QValue) -> String {
    match v {
        QValue::Int(i) => i.to_string(),
        QValue::Bool(b) => b.to_string(),
        QValue::Str(s) => s.clone(),
        _ => String::new(),
    }
}

fn dump_value(out: &mut String, label: &str, v: &QValue, indent: usize) {
    let pad = "    ".repeat(indent);
    match v {
        QValue::Dict(d) => {
            out.push_str(&format!("{pad}{label}:\n"));
            dump_dict(out, d, indent + 1);
        }
        QValue::List(l) => {
            out.push_str(&format!("{pad}{label}:\n"));
            for (i, e) in l.iter().enumerate() {
                dump_value(out, &format!("[{i}]"), e, indent + 1);
            }
        }
        s => out.push_str(&format!("{pad}{label}: {}\n", dump_scalar(s))),
    }
}

fn dump_dict(out: &mut String, d: &QDict, indent: usize) {
    for (k, v) in d.ordered() {
        dump_value(out, &k.replace('-', " "), v, indent);
    }
}

pub fn to_json_pretty(v: &QValue) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

/// C `printf` of one double with `fmt` (e.g. `%0.3g`), so rounding matches qemu-img's.
pub fn c_format_f64(fmt: &str, v: f64) -> String {
    let Ok(cfmt) = CString::new(fmt) else {
        return v.to_string();
    };
    let mut buf = [0u8; 64];
    // SAFETY: the buffer is large enough for one formatted double of these formats,
    // snprintf never writes past the given length, and the format takes one double.
    let n = unsafe {
        libc::snprintf(
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
            cfmt.as_ptr(),
            v,
        )
    };
    if n < 0 {
        return v.to_string();
    }
    let n = (n as usize).min(buf.len() - 1);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// qemu's `size_to_str`: `1 GiB`, `196 KiB`, `1.5 MiB`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) exponent, as QEMU computes it.
    let x = val as f64 / (1000.0 / 1024.0);
    let exp = if x == 0.0 {
        0
    } else {
        // x = m * 2^e with 0.5 <= m < 1
        x.log2().floor() as i32 + 1
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!(
        "{} {}B",
        c_format_f64("%0.3g", val as f64 / div),
        SUFFIXES[i]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1536 * 1024), "1.5 MiB");
    }

    #[test]
    fn qdict_order_matches_qemu() {
        let mut d = QDict::new();
        for k in [
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "format-specific",
            "children",
        ] {
            d.int(k, 0);
        }
        let keys: Vec<&str> = d.ordered().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag"
            ]
        );
    }
}
