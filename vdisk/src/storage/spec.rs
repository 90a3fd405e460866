//! One parser for every form of image name, each turned into an options [`Node`]:
//!
//! - a plain path (`disk.qcow2`, `./a:b`, `/x/a:b`): `file.driver=file,file.filename=…`;
//! - `file:NAME`, and protocol URLs (`nbd://host/export`, `nbd+unix:///e?socket=P`,
//!   `https://host/path`): the protocol claiming the prefix before the first `:` (when
//!   no `/` precedes it, QEMU's `path_has_protocol`) parses the rest into its node;
//!   a prefix no protocol claims is QEMU's "Unknown protocol 'x'";
//! - `json:{…}`: nested objects and QEMU's dotted keys (`"file.filename"`), merged
//!   into one tree; a key given twice, either way, is refused;
//! - `--image-opts` key=value lists (`driver=qcow2,file.filename=a`), with `,,` for a
//!   literal comma as QemuOpts.
//!
//! The root of the tree is the format node: `driver` (a format name; absent means
//! probe) and its children. A filename inside a tree is taken literally (QEMU parses
//! protocol prefixes only in filename strings, never in `filename` options).

use super::options::{Node, SpecError, Value, MAX_ENTRIES, MAX_NAME_LEN};
use super::registry;

/// Parses an image name the way qemu-img reads a filename argument or a backing file
/// name: `json:{…}`, a protocol URL, `file:NAME`, or a plain path.
pub fn parse_filename(name: &str) -> Result<Node, SpecError> {
    check_len(name)?;
    if let Some(json) = name.strip_prefix("json:") {
        return parse_json(json);
    }
    let mut root = Node::new();
    root.insert("file", Value::Node(parse_protocol_filename(name)?))?;
    Ok(root)
}

/// The protocol node a filename string means (`driver` set): a plain path is the
/// `file` protocol; `proto:…` is the protocol claiming `proto`.
pub fn parse_protocol_filename(name: &str) -> Result<Node, SpecError> {
    check_len(name)?;
    let mut node = Node::new();
    match registry::protocol_prefix(name) {
        None => {
            node.insert_str("driver", "file")?;
            node.insert_str("filename", name)?;
        }
        Some(prefix) => {
            let proto = registry::by_scheme(prefix)
                .ok_or_else(|| SpecError::UnknownProtocol(prefix.to_string()))?;
            node.insert_str("driver", proto.name)?;
            (proto.parse_filename)(name, &mut node)?;
        }
    }
    Ok(node)
}

/// Whether `name` is a plain path: no `json:` and no protocol prefix. Only plain
/// backing names are resolved against the directory of the image naming them.
pub fn is_plain_path(name: &str) -> bool {
    registry::protocol_prefix(name).is_none()
}

fn check_len(s: &str) -> Result<(), SpecError> {
    if s.len() > MAX_NAME_LEN {
        return Err(SpecError::TooLarge(format!(
            "{} bytes, more than {MAX_NAME_LEN}",
            s.len()
        )));
    }
    Ok(())
}

fn check_count(n: usize) -> Result<(), SpecError> {
    if n > MAX_ENTRIES {
        return Err(SpecError::TooLarge(format!(
            "more than {MAX_ENTRIES} options"
        )));
    }
    Ok(())
}

/// Parses the text after `json:`: one JSON object, nested objects and dotted keys
/// merged; arrays become children keyed `0`, `1`… (QEMU's flattening).
pub fn parse_json(text: &str) -> Result<Node, SpecError> {
    check_len(text)?;
    let j: Json = serde_json::from_str(text).map_err(|e| SpecError::Json(e.to_string()))?;
    let Json::Obj(entries) = j else {
        return Err(SpecError::JsonNotObject);
    };
    let mut root = Node::new();
    let mut count = 0;
    for (k, v) in entries {
        add_json(&mut root, k, v, &mut count)?;
    }
    Ok(root)
}

fn add_json(node: &mut Node, key: String, v: Json, count: &mut usize) -> Result<(), SpecError> {
    *count += 1;
    check_count(*count)?;
    let value = match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(b),
        Json::Num(n) => Value::Num(n),
        Json::Str(s) => Value::Str(s),
        Json::Obj(entries) => {
            // Make the (possibly empty) child exist, then add its keys dotted.
            node.insert(&key, Value::Node(Node::new()))?;
            for (k, v) in entries {
                add_json(node, format!("{key}.{k}"), v, count)?;
            }
            return Ok(());
        }
        Json::Arr(items) => {
            node.insert(&key, Value::Node(Node::new()))?;
            for (i, v) in items.into_iter().enumerate() {
                add_json(node, format!("{key}.{i}"), v, count)?;
            }
            return Ok(());
        }
    };
    node.insert(&key, value)
}

/// Parses an `--image-opts` string: `key=value` items separated by `,`, where `,,` is
/// a literal comma. Every value is a string. A first item without `=` names a node by
/// reference, as in QEMU, and there are no named nodes.
pub fn parse_image_opts(s: &str) -> Result<Node, SpecError> {
    check_len(s)?;
    let items = split_items(s);
    let mut root = Node::new();
    for (i, item) in items.into_iter().enumerate() {
        check_count(i + 1)?;
        match item.split_once('=') {
            Some((k, v)) => root.insert_str(k, v)?,
            None if i == 0 => return Err(SpecError::NodeReference(item)),
            None => return Err(SpecError::MissingValue(item)),
        }
    }
    Ok(root)
}

/// Splits a QemuOpts list at `,`, where `,,` is a literal comma; empty items are
/// dropped (`a=1,,,b=2,` is `a=1,` and `b=2`).
pub fn split_items(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
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
    items.retain(|i| !i.is_empty());
    items
}

/// A JSON value that keeps every key of an object in order, duplicates included
/// (`serde_json::Value` keeps only the last), so duplicates can be refused.
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
        Ok(Json::Num(n.to_string()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
        Ok(Json::Num(n.to_string()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Json, E> {
        Ok(Json::Num(n.to_string()))
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::Str(s))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = a.next_element()? {
            if v.len() >= MAX_ENTRIES {
                return Err(serde::de::Error::custom("array too long"));
            }
            v.push(x);
        }
        Ok(Json::Arr(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
        let mut v: Vec<(String, Json)> = Vec::new();
        while let Some((k, x)) = a.next_entry::<String, Json>()? {
            if v.iter().any(|(e, _)| *e == k) {
                return Err(serde::de::Error::custom(format!("duplicate key '{k}'")));
            }
            if v.len() >= MAX_ENTRIES {
                return Err(serde::de::Error::custom("object too large"));
            }
            v.push((k, x));
        }
        Ok(Json::Obj(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(r: Result<Node, SpecError>) -> Vec<(String, String)> {
        r.unwrap_or_else(|e| panic!("{e}")).flatten()
    }

    use crate::storage::options::pairs as kv;

    #[test]
    fn filenames_become_trees() {
        let table: &[(&str, &[(&str, &str)])] = &[
            (
                "a.qcow2",
                &[("file.driver", "file"), ("file.filename", "a.qcow2")],
            ),
            (
                "/x/a:b",
                &[("file.driver", "file"), ("file.filename", "/x/a:b")],
            ),
            (
                "./a:b",
                &[("file.driver", "file"), ("file.filename", "./a:b")],
            ),
            (
                "file:a:b",
                &[("file.driver", "file"), ("file.filename", "a:b")],
            ),
            ("file:", &[("file.driver", "file"), ("file.filename", "")]),
            (
                "nbd://localhost/x",
                &[
                    ("file.driver", "nbd"),
                    ("file.export", "x"),
                    ("file.server.type", "inet"),
                    ("file.server.host", "localhost"),
                    ("file.server.port", "10809"),
                ],
            ),
            (
                "nbd+unix:///e?socket=/s",
                &[
                    ("file.driver", "nbd"),
                    ("file.export", "e"),
                    ("file.server.type", "unix"),
                    ("file.server.path", "/s"),
                ],
            ),
            (
                "https://h/p/a.img",
                &[("file.driver", "https"), ("file.url", "https://h/p/a.img")],
            ),
            (
                r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}"#,
                &[
                    ("driver", "qcow2"),
                    ("file.driver", "file"),
                    ("file.filename", "a.qcow2"),
                ],
            ),
            (r#"json:{"file.filename":"a"}"#, &[("file.filename", "a")]),
            (
                r#"json: {"file":{"cache.direct":true,"locking":"off"},"file.filename":"a","backing":null}"#,
                &[
                    ("file.cache.direct", "on"),
                    ("file.locking", "off"),
                    ("file.filename", "a"),
                    ("backing", "null"),
                ],
            ),
            (
                r#"json:{"l2-cache-size":1048576,"x":[1,{"y":2}],"file":{}}"#,
                &[
                    ("l2-cache-size", "1048576"),
                    ("x.0", "1"),
                    ("x.1.y", "2"),
                    ("file", "{}"),
                ],
            ),
        ];
        for (name, want) in table {
            assert_eq!(flat(parse_filename(name)), kv(want), "{name}");
        }
    }

    #[test]
    fn image_opts_become_trees() {
        assert_eq!(
            flat(parse_image_opts(
                "driver=qcow2,file.driver=file,file.filename=a.qcow2"
            )),
            kv(&[
                ("driver", "qcow2"),
                ("file.driver", "file"),
                ("file.filename", "a.qcow2")
            ])
        );
        assert_eq!(
            flat(parse_image_opts("file.filename=a,,b,,,driver=raw,")),
            kv(&[("file.filename", "a,b,"), ("driver", "raw")])
        );
        // A filename option is literal: no protocol parsing inside a tree.
        assert_eq!(
            flat(parse_image_opts("file.filename=nbd://x")),
            kv(&[("file.filename", "nbd://x")])
        );
        assert_eq!(flat(parse_image_opts("backing=")), kv(&[("backing", "")]));
    }

    #[test]
    fn bad_names_are_refused_with_reasons() {
        let cases: &[(&str, &str)] = &[
            ("foo:bar", "Unknown protocol 'foo'"),
            ("FILE:a", "Unknown protocol 'FILE'"),
            ("nbdx://h/x", "Unknown protocol 'nbdx'"),
            ("nbd+unix:///x", "No valid URL specified"),
            ("json:", "Could not parse the JSON options"),
            (
                r#"json:{"driver":"qcow2","file":{"filename":"a"}"#,
                "Could not parse the JSON options",
            ),
            (r#"json:{} {}"#, "Could not parse the JSON options"),
            ("json:[1]", "Invalid JSON object given"),
            (
                r#"json:{"driver":"qcow2","driver":"raw"}"#,
                "duplicate key 'driver'",
            ),
            (
                r#"json:{"file.filename":"a","file":{"filename":"b"}}"#,
                "duplicate key 'file.filename'",
            ),
            (
                r#"json:{"file":"node0","file.filename":"b"}"#,
                "Parameters 'file.*' used inconsistently",
            ),
            (r#"json:{"a..b":1}"#, "Invalid parameter 'a..b'"),
        ];
        for (name, want) in cases {
            let e = parse_filename(name).expect_err(name).to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
        let opts: &[(&str, &str)] = &[
            (
                "x.qcow2",
                "Cannot find device='x.qcow2' nor node-name='x.qcow2'",
            ),
            (
                "driver=qcow2,flag",
                "Invalid parameter 'flag': expected key=value",
            ),
            ("driver=qcow2,driver=raw", "duplicate key 'driver'"),
            ("=x", "Invalid parameter ''"),
            (
                "file=a,file.filename=b",
                "Parameters 'file.*' used inconsistently",
            ),
        ];
        for (s, want) in opts {
            let e = parse_image_opts(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn sizes_and_depths_are_bounded() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(parse_filename(&long), Err(SpecError::TooLarge(_))));
        let deep = format!("json:{}1{}", r#"{"a":"#.repeat(40), "}".repeat(40));
        assert!(parse_filename(&deep).is_err());
        let deep = format!("json:{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        assert!(parse_filename(&deep).is_err());
        let many: Vec<String> = (0..MAX_ENTRIES + 1).map(|i| format!("k{i}=v")).collect();
        assert!(matches!(
            parse_image_opts(&many.join(",")),
            Err(SpecError::TooLarge(_))
        ));
        let arr = format!("json:{{\"a\":[{}]}}", vec!["1"; MAX_ENTRIES + 1].join(","));
        assert!(parse_filename(&arr).is_err());
    }
}
