//! Argument parsing for qemu-io commands: the command line is split on spaces, options
//! are read getopt-style, and numbers take qemu's size suffixes.

/// Largest single request qemu accepts (`BDRV_REQUEST_MAX_BYTES`); we keep the limit
/// so the same scripts fail (or succeed) the same way.
pub const REQUEST_MAX_BYTES: u64 = 2_147_483_136;

/// Why a number did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    /// Not a number, or an unknown suffix.
    Invalid,
    /// Larger than a signed 64-bit value.
    Range,
}

/// Splits a command line on spaces, dropping empty words (qemu's `breakline`; there is
/// no quoting).
pub fn breakline(line: &str) -> Vec<String> {
    line.split(' ')
        .map(|w| w.trim_matches(|c| c == '\n' || c == '\r' || c == '\t'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses a size or offset: decimal with an optional fraction and a binary suffix
/// (`4k`, `1.5M`), or hexadecimal (`0x10000`, optionally with a suffix).
pub fn cvtnum(s: &str) -> Result<u64, NumError> {
    // A negative plain number parses, then is out of range (qemu_strtosz's ERANGE).
    if s.strip_prefix('-')
        .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(NumError::Range);
    }
    let (body, suffix) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && !is_hex_body(&s[..i], c) => (&s[..i], &s[i..]),
        _ => (s, ""),
    };
    if body.is_empty() {
        return Err(NumError::Invalid);
    }
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        "P" => 1 << 50,
        "E" => 1 << 60,
        _ => return Err(NumError::Invalid),
    };
    let value = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(NumError::Invalid);
        }
        u64::from_str_radix(hex, 16)
            .map_err(|_| NumError::Range)?
            .checked_mul(mult)
            .ok_or(NumError::Range)?
    } else {
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let digits = |t: &str| t.chars().all(|c| c.is_ascii_digit());
        if int.is_empty()
            || !digits(int)
            || !digits(frac)
            || (body.contains('.') && frac.is_empty())
        {
            return Err(NumError::Invalid);
        }
        // A fraction of a byte means nothing: qemu only takes fractions with a unit.
        if !frac.is_empty() && mult == 1 {
            return Err(NumError::Invalid);
        }
        if int.trim_start_matches('0').len() > 20 {
            return Err(NumError::Range);
        }
        vdisk::format::parse_size(&format!("{body}{suffix}")).map_err(|_| NumError::Range)?
    };
    if value > i64::MAX as u64 {
        return Err(NumError::Range);
    }
    Ok(value)
}

/// `0x1b` ends in a letter that is a hex digit, not a suffix.
fn is_hex_body(head: &str, last: char) -> bool {
    (head.starts_with("0x") || head.starts_with("0X"))
        && last.is_ascii_hexdigit()
        && head[2..].chars().all(|c| c.is_ascii_hexdigit())
}

/// The message qemu-io prints for a number that does not parse.
pub fn cvtnum_error(e: NumError, arg: &str) -> String {
    match e {
        NumError::Invalid => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
        ),
        NumError::Range => format!("Parsing error: argument too large -- {arg}"),
    }
}

/// Parses a pattern byte like `strtol(arg, 0)`: decimal, `0x` hex or `0` octal.
pub fn parse_pattern(arg: &str) -> Option<u8> {
    let v = if let Some(h) = arg.strip_prefix("0x").or_else(|| arg.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if arg.len() > 1 && arg.starts_with('0') {
        u64::from_str_radix(&arg[1..], 8).ok()?
    } else {
        arg.parse::<u64>().ok()?
    };
    u8::try_from(v).ok()
}

/// A getopt-style option scanner over one command's words (the first word is the
/// command name). Stops at the first non-option word or after `--`.
pub struct Getopt<'a> {
    args: &'a [String],
    spec: &'static str,
    /// Index of the next word to scan; after scanning, the first positional argument.
    pub optind: usize,
    pos: usize,
}

impl<'a> Getopt<'a> {
    /// Scans `args[1..]` with `spec` in getopt's syntax (`"bP:q"`: `P` takes a value).
    pub fn new(args: &'a [String], spec: &'static str) -> Self {
        Getopt {
            args,
            spec,
            optind: 1,
            pos: 0,
        }
    }

    /// The next option and its value; `Err` carries getopt's message for a bad option.
    pub fn next_opt(&mut self) -> Option<Result<(char, Option<String>), String>> {
        let cmd = self.args.first().map(String::as_str).unwrap_or("");
        if self.pos == 0 {
            let w = self.args.get(self.optind)?;
            if w == "--" {
                self.optind += 1;
                return None;
            }
            if !w.starts_with('-') || w.len() == 1 {
                return None;
            }
            self.pos = 1;
        }
        let word = &self.args[self.optind];
        let c = word[self.pos..].chars().next()?;
        self.pos += c.len_utf8();
        let at_end = self.pos >= word.len();
        let Some(i) = self.spec.find(c).filter(|_| c != ':') else {
            if at_end {
                self.optind += 1;
                self.pos = 0;
            }
            return Some(Err(format!("{cmd}: invalid option -- '{c}'")));
        };
        let takes_value = self.spec[i + c.len_utf8()..].starts_with(':');
        if !takes_value {
            if at_end {
                self.optind += 1;
                self.pos = 0;
            }
            return Some(Ok((c, None)));
        }
        let value = if !at_end {
            let v = word[self.pos..].to_string();
            self.optind += 1;
            v
        } else {
            self.optind += 1;
            match self.args.get(self.optind) {
                Some(v) => {
                    self.optind += 1;
                    v.clone()
                }
                None => {
                    self.pos = 0;
                    return Some(Err(format!("{cmd}: option requires an argument -- '{c}'")));
                }
            }
        };
        self.pos = 0;
        Some(Ok((c, Some(value))))
    }
}

/// The text of an errno, without Rust's " (os error N)" tail.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        breakline(s)
    }

    #[test]
    fn numbers() {
        assert_eq!(cvtnum("4096"), Ok(4096));
        assert_eq!(cvtnum("4k"), Ok(4096));
        assert_eq!(cvtnum("1.5M"), Ok(1536 * 1024));
        assert_eq!(cvtnum("0x10000"), Ok(65536));
        assert_eq!(cvtnum("0x1b"), Ok(27));
        assert_eq!(cvtnum("0x2k"), Ok(2048));
        assert_eq!(cvtnum("abc"), Err(NumError::Invalid));
        assert_eq!(cvtnum("1.5"), Err(NumError::Invalid));
        assert_eq!(cvtnum("4q"), Err(NumError::Invalid));
        assert_eq!(cvtnum("16E"), Err(NumError::Range));
        assert_eq!(cvtnum("99999999999999999999999"), Err(NumError::Range));
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("0xab"), Some(0xab));
        assert_eq!(parse_pattern("205"), Some(205));
        assert_eq!(parse_pattern("010"), Some(8));
        assert_eq!(parse_pattern("0"), Some(0));
        assert_eq!(parse_pattern("300"), None);
        assert_eq!(parse_pattern("x"), None);
    }

    #[test]
    fn getopt_forms() {
        let a = words("read -qv -P0xab -l 512 10 20");
        let mut g = Getopt::new(&a, "bCl:pP:qrs:v");
        let mut seen = Vec::new();
        while let Some(o) = g.next_opt() {
            seen.push(o.unwrap());
        }
        assert_eq!(
            seen,
            vec![
                ('q', None),
                ('v', None),
                ('P', Some("0xab".into())),
                ('l', Some("512".into()))
            ]
        );
        assert_eq!(&a[g.optind..], &["10".to_string(), "20".to_string()]);

        let a = words("read -x 1 2");
        let mut g = Getopt::new(&a, "q");
        assert!(g.next_opt().unwrap().is_err());
        let a = words("read -P");
        let mut g = Getopt::new(&a, "P:");
        assert!(g.next_opt().unwrap().is_err());
    }
}
