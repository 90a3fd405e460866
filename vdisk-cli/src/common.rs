//! Helpers shared by the subcommands: opening images from command-line flags, option
//! lists, error reporting.

use vdisk::{CacheMode, Format, Image, OpenOptions};

/// Prints an error the way qemu-img does (`vdisk: message`) to stderr.
pub fn error(msg: impl std::fmt::Display) {
    eprintln!("vdisk: {msg}");
}

/// Parses `-o a=b,c=d` lists (repeatable) into ordered pairs. `,,` escapes a comma.
pub fn parse_options(opts: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for o in opts {
        let mut cur = String::new();
        let mut items = Vec::new();
        let mut chars = o.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for it in items.into_iter().filter(|s| !s.is_empty()) {
            match it.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => return Err(format!("Invalid parameter '{it}'")),
            }
        }
    }
    Ok(out)
}

/// Parses a `-f`/`-O` format name.
pub fn parse_format(s: Option<&str>) -> Result<Option<Format>, String> {
    s.map(|f| Format::parse(f).map_err(|e| e.to_string()))
        .transpose()
}

/// Parses a `-t`/`-T` cache mode.
pub fn parse_cache(s: Option<&str>, default: CacheMode) -> Result<CacheMode, String> {
    match s {
        None => Ok(default),
        Some(m) => CacheMode::parse(m).ok_or_else(|| format!("Invalid cache option: {m}")),
    }
}

/// Opens an image for a subcommand.
pub fn open_image(
    filename: &str,
    format: Option<Format>,
    read_only: bool,
    force_share: bool,
    cache: CacheMode,
) -> Result<Image, String> {
    let opts = OpenOptions {
        format,
        read_only,
        force_share,
        cache,
        ..OpenOptions::default()
    };
    Image::open(filename, &opts).map_err(|e| format!("Could not open '{filename}': {e}"))
}
