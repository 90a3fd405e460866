//! Declared format options: each format lists its creation options once (name, type,
//! default, help text, whether `amend` may change it) and everything else — the CLI's
//! `-o help`, the parsing and validation of `-o key=value`, the `Formatting ...` line —
//! reads that one table.
//!
//! Validation happens in two steps, as in qemu: the *type* of a value (size, bool,
//! number) is checked when the options are parsed, before anything is created;
//! the *choice* of an enumerated value is checked by the driver when it creates the
//! image (qemu-img prints its `Formatting` line between the two), through
//! [`OptionValues::get_enum`].

use crate::error::{Error, Invalid, Result};
use crate::format::{parse_bool, parse_size};

/// The type of an option's value (qemu's `QemuOptType`, with enumerations spelled out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptKind {
    /// A byte count with an optional `k`, `M`, `G`, `T`, `P`, `E` suffix.
    Size,
    /// `on` / `off`.
    Bool,
    /// A plain unsigned number.
    Number,
    /// Free text.
    Str,
    /// One word out of `values`. Listed by `-o help` as a string, as qemu does.
    Enum {
        /// The accepted words.
        values: &'static [&'static str],
        /// The name qemu's error message uses for a word not in `values` (the QAPI
        /// member, which may differ from the option: `version` for `compat`); `None`
        /// for the file protocol's wording, `invalid parameter value: X`.
        qapi: Option<&'static str>,
    },
}

impl OptKind {
    /// The type as `-o help` prints it.
    pub fn help_name(self) -> &'static str {
        match self {
            OptKind::Size => "size",
            OptKind::Bool => "bool (on/off)",
            OptKind::Number => "num",
            OptKind::Str | OptKind::Enum { .. } => "str",
        }
    }
}

/// One declared option.
#[derive(Clone, Copy, Debug)]
pub struct OptionDesc {
    /// The `-o` key.
    pub name: &'static str,
    /// Value type.
    pub kind: OptKind,
    /// The value the `Formatting` line shows when the option is not given (`None`: the
    /// option is left out of the line).
    pub default: Option<&'static str>,
    /// qemu-img's help text, verbatim.
    pub help: &'static str,
    /// Whether `amend` may change the option on an existing image.
    pub amend: bool,
}

impl OptionDesc {
    /// A creation-only option.
    pub const fn new(
        name: &'static str,
        kind: OptKind,
        default: Option<&'static str>,
        help: &'static str,
    ) -> OptionDesc {
        OptionDesc {
            name,
            kind,
            default,
            help,
            amend: false,
        }
    }
    /// The same option, also changeable by `amend`.
    pub const fn amendable(self) -> OptionDesc {
        OptionDesc {
            amend: true,
            ..self
        }
    }
}

/// `size`, declared identically by every format.
pub const SIZE: OptionDesc = OptionDesc::new("size", OptKind::Size, None, "Virtual disk size");
/// `backing_file`, declared identically by the formats with backing files.
pub const BACKING_FILE: OptionDesc = OptionDesc::new(
    "backing_file",
    OptKind::Str,
    None,
    "File name of a base image",
);
/// `backing_fmt`, declared identically by the formats with backing files.
pub const BACKING_FMT: OptionDesc = OptionDesc::new(
    "backing_fmt",
    OptKind::Str,
    None,
    "Image format of the base image",
);

/// Creation options of the `file` protocol (qemu's file-posix), which qemu merges into
/// every format's list when the target file name is known. Their values are hints to the
/// host file: preallocation is done by the raw driver (the other formats start from an
/// empty file, where qemu preallocates nothing); `nocow` and `extent_size_hint` (default
/// 1 MiB, as qemu's) are applied to the new file by [`crate::Image::create`].
pub const FILE_PROTOCOL_OPTIONS: &[OptionDesc] = &[
    SIZE,
    OptionDesc::new(
        "nocow",
        OptKind::Bool,
        None,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    OptionDesc::new(
        "preallocation",
        OptKind::Enum {
            values: &["off", "falloc", "full"],
            qapi: None,
        },
        None,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    OptionDesc::new(
        "extent_size_hint",
        OptKind::Size,
        None,
        "Extent size hint for the image file, 0 to disable",
    ),
];

/// A parsed, type-checked value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptValue {
    /// A size in bytes.
    Size(u64),
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(u64),
    /// Text (strings and not yet checked enumeration words).
    Str(String),
}

impl OptValue {
    /// The value as the `Formatting` line prints it (sizes in bytes).
    pub fn display(&self) -> String {
        match self {
            OptValue::Size(n) | OptValue::Number(n) => n.to_string(),
            OptValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            OptValue::Str(s) => s.clone(),
        }
    }
}

/// One given option: its declaration, the text as given, the typed value.
#[derive(Clone, Debug)]
pub struct GivenOption {
    /// The declaration it matched.
    pub desc: &'static OptionDesc,
    /// The text after `=`.
    pub raw: String,
    /// The typed value.
    pub value: OptValue,
}

/// Options given for one creation, type-checked against the format's (and its
/// protocol's) declarations. A key given twice keeps its last value, as in qemu.
#[derive(Clone, Debug, Default)]
pub struct OptionValues {
    given: Vec<GivenOption>,
}

/// qemu's message for a value that is not a size.
fn bad_size(key: &str) -> Error {
    Invalid::BadSizeOption(key.to_string()).into()
}

/// Parses one value by its declared type.
fn parse_value(d: &OptionDesc, v: &str) -> Result<OptValue> {
    Ok(match d.kind {
        OptKind::Size => {
            // qemu's size parser takes no sign and no surrounding space.
            if v.is_empty() || v.starts_with(['-', '+']) || v.trim() != v {
                return Err(bad_size(d.name));
            }
            OptValue::Size(parse_size(v).map_err(|_| bad_size(d.name))?)
        }
        OptKind::Bool => OptValue::Bool(parse_bool(d.name, v)?),
        OptKind::Number => {
            OptValue::Number(parse_number(v).ok_or_else(|| Invalid::BadNumber(d.name.to_string()))?)
        }
        OptKind::Str | OptKind::Enum { .. } => OptValue::Str(v.to_string()),
    })
}

/// A number as qemu's `qemu_strtou64` reads it: decimal, a leading `-` negating
/// modulo 2^64 (`keyslot=-1` reaches the driver, which reads it back as signed).
fn parse_number(v: &str) -> Option<u64> {
    match v.strip_prefix('-') {
        Some(rest) if !rest.starts_with(['-', '+']) => {
            rest.parse::<u64>().ok().map(u64::wrapping_neg)
        }
        _ => v.parse().ok(),
    }
}

/// Finds a declaration by key: the format's own first (it may redeclare a protocol
/// option, e.g. qcow2's `preallocation` adds `metadata`), then the protocol's.
pub fn find<'t>(tables: &[&'t [OptionDesc]], key: &str) -> Option<&'t OptionDesc> {
    tables.iter().flat_map(|t| t.iter()).find(|d| d.name == key)
}

impl OptionValues {
    /// Type-checks `key=value` pairs against `tables` (format first, then protocol).
    /// Unknown keys and mistyped values are refused with qemu's wording.
    pub fn parse(
        tables: &[&'static [OptionDesc]],
        pairs: &[(String, String)],
    ) -> Result<OptionValues> {
        let mut given: Vec<GivenOption> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let desc = find(tables, k).ok_or_else(|| Invalid::UnknownOption(k.to_string()))?;
            let value = parse_value(desc, v)?;
            given.retain(|g| g.desc.name != desc.name);
            given.push(GivenOption {
                desc,
                raw: v.clone(),
                value,
            });
        }
        Ok(OptionValues { given })
    }

    /// The options given, in the order given (last occurrence of each key).
    pub fn given(&self) -> &[GivenOption] {
        &self.given
    }

    fn get(&self, key: &str) -> Option<&OptValue> {
        self.given
            .iter()
            .find(|g| g.desc.name == key)
            .map(|g| &g.value)
    }
    /// Whether `key` was given.
    pub fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    /// A size option, if given.
    pub fn size(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(OptValue::Size(n)) => Some(*n),
            _ => None,
        }
    }
    /// A bool option, if given.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(OptValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }
    /// A number option, if given.
    pub fn number(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(OptValue::Number(n)) => Some(*n),
            _ => None,
        }
    }
    /// A string option, if given.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(OptValue::Str(s)) => Some(s),
            _ => None,
        }
    }
    /// An enumerated option, if given, checked against its declared words (qemu's
    /// wording for a word it does not know).
    pub fn get_enum(&self, key: &str) -> Result<Option<&'static str>> {
        let Some(g) = self.given.iter().find(|g| g.desc.name == key) else {
            return Ok(None);
        };
        let OptKind::Enum { values, qapi } = g.desc.kind else {
            return Err(Invalid::NotEnum(key.to_string()).into());
        };
        match values.iter().find(|w| **w == g.raw) {
            Some(w) => Ok(Some(w)),
            None => Err(match qapi {
                Some(q) => Invalid::BadOptionValue {
                    option: q.to_string(),
                    value: g.raw.clone(),
                },
                None => Invalid::BadEnumValue(g.raw.clone()),
            }
            .into()),
        }
    }
    /// The first given key that `amend` may not change (`None` when all may).
    pub fn not_amendable(&self) -> Option<&'static str> {
        self.given
            .iter()
            .find(|g| !g.desc.amend)
            .map(|g| g.desc.name)
    }
}

/// Renders `-o help` as qemu-img does. Without a target file name only the format's
/// options are listed, under `Supported <fmt> options:`, followed by qemu's note about
/// protocol options; with one, the protocol's options are merged in (the format's
/// declaration wins a shared name) under "Supported options:".
pub fn render_help(
    format_name: &str,
    format_opts: &[OptionDesc],
    protocol_opts: Option<&[OptionDesc]>,
) -> String {
    let all: Vec<&OptionDesc> = format_opts.iter().collect();
    let mut s = match protocol_opts {
        Some(_) => "Supported options:\n".to_string(),
        None => format!("Supported {format_name} options:\n"),
    };
    s.push_str(&option_lines(all, protocol_opts.unwrap_or(&[])));
    if protocol_opts.is_none() {
        s.push_str(
            "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n",
        );
    }
    s
}

/// Renders `amend -o help` as qemu-img does (`Amend options for '<fmt>':`).
pub fn render_amend_help(format_name: &str, opts: Vec<&OptionDesc>) -> String {
    format!(
        "Amend options for '{format_name}':\n{}",
        option_lines(opts, &[])
    )
}

/// One `  name=<type>  - help` line per option, sorted by name; `extra` options are
/// added unless `opts` already has one of that name.
fn option_lines<'a>(mut all: Vec<&'a OptionDesc>, extra: &'a [OptionDesc]) -> String {
    for d in extra {
        if !all.iter().any(|a| a.name == d.name) {
            all.push(d);
        }
    }
    all.sort_by_key(|d| d.name);
    let mut s = String::new();
    for d in all {
        let left = format!("{}=<{}>", d.name, d.kind.help_name());
        s.push_str(&format!("  {left:<22} - {}\n", d.help));
    }
    s
}

/// The options of a `Formatting '...', fmt=...` line, as qemu prints them: each declared
/// option in declaration order (format first, then the protocol's not redeclared), with
/// its given value or its default; options with neither are left out.
pub fn formatting_pairs(
    format_opts: &[OptionDesc],
    protocol_opts: &[OptionDesc],
    values: &OptionValues,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let protocol_only = protocol_opts
        .iter()
        .filter(|d| !format_opts.iter().any(|f| f.name == d.name));
    for d in format_opts.iter().chain(protocol_only) {
        let v = match values.given.iter().find(|g| g.desc.name == d.name) {
            Some(g) => g.value.display(),
            None => match d.default {
                Some(v) => v.to_string(),
                None => continue,
            },
        };
        out.push((d.name, v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[OptionDesc] = &[
        SIZE,
        OptionDesc::new("flag", OptKind::Bool, Some("off"), "A flag"),
        OptionDesc::new("n", OptKind::Number, None, "A number"),
        OptionDesc::new(
            "mode",
            OptKind::Enum {
                values: &["a", "b"],
                qapi: Some("the-mode"),
            },
            None,
            "Mode",
        )
        .amendable(),
    ];

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_typed_values_last_wins() {
        let v = OptionValues::parse(
            &[T],
            &pairs(&[("size", "1M"), ("flag", "on"), ("n", "7"), ("size", "2k")]),
        )
        .unwrap();
        assert_eq!(v.size("size"), Some(2048));
        assert_eq!(v.bool("flag"), Some(true));
        assert_eq!(v.number("n"), Some(7));
        assert_eq!(v.given().len(), 3);
    }

    #[test]
    fn rejects_with_qemu_wording() {
        let e = |p: &[(&str, &str)]| {
            OptionValues::parse(&[T], &pairs(p))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e(&[("nope", "1")]), "Invalid parameter 'nope'");
        assert_eq!(
            e(&[("flag", "maybe")]),
            "Parameter 'flag' expects 'on' or 'off'"
        );
        assert_eq!(e(&[("n", "x")]), "Parameter 'n' expects a number");
        assert!(e(&[("size", "-1")]).starts_with("Parameter 'size' expects a non-negative"));
    }

    #[test]
    fn enum_checked_on_demand() {
        let v = OptionValues::parse(&[T], &pairs(&[("mode", "c")])).unwrap();
        assert_eq!(
            v.get_enum("mode").unwrap_err().to_string(),
            "Parameter 'the-mode' does not accept value 'c'"
        );
        let v = OptionValues::parse(&[T], &pairs(&[("mode", "b")])).unwrap();
        assert_eq!(v.get_enum("mode").unwrap(), Some("b"));
        assert_eq!(v.not_amendable(), None);
        let v = OptionValues::parse(&[T], &pairs(&[("mode", "b"), ("n", "1")])).unwrap();
        assert_eq!(v.not_amendable(), Some("n"));
    }

    #[test]
    fn format_table_shadows_protocol() {
        let mine = [OptionDesc::new(
            "preallocation",
            OptKind::Enum {
                values: &["off", "metadata"],
                qapi: Some("preallocation"),
            },
            None,
            "mine",
        )];
        let mine: &'static [OptionDesc] = Box::leak(Box::new(mine));
        let v = OptionValues::parse(
            &[mine, FILE_PROTOCOL_OPTIONS],
            &pairs(&[("preallocation", "metadata"), ("nocow", "on")]),
        )
        .unwrap();
        assert_eq!(v.get_enum("preallocation").unwrap(), Some("metadata"));
        let h = render_help("x", mine, Some(FILE_PROTOCOL_OPTIONS));
        assert!(h.contains("preallocation=<str>    - mine\n"), "{h}");
        assert_eq!(h.matches("preallocation").count(), 1);
    }

    #[test]
    fn formatting_order_and_defaults() {
        let v = OptionValues::parse(
            &[T, FILE_PROTOCOL_OPTIONS],
            &pairs(&[("extent_size_hint", "1M"), ("size", "1k")]),
        )
        .unwrap();
        let p = formatting_pairs(T, FILE_PROTOCOL_OPTIONS, &v);
        assert_eq!(
            p,
            vec![
                ("size", "1024".to_string()),
                ("flag", "off".to_string()),
                ("extent_size_hint", "1048576".to_string())
            ]
        );
    }
}
