//! Options trees: what an image name means once parsed, whatever form it came in.
//!
//! A plain file name, `file:NAME`, a protocol URL (`nbd://host/export`), a `json:{…}`
//! pseudo-filename and an `--image-opts` key=value list all become one [`Node`]: a
//! small tree whose leaves are the option values and whose inner nodes are the
//! children (`file`, `backing`, `data-file`, `server`…), as QEMU's flattened QDict
//! `file.filename=…` is a tree in disguise. The layers above consume it: the chain
//! takes the format node's keys, the protocol registry the storage node's, and
//! whatever is left is an option nobody supports, reported with QEMU's sentence.
//!
//! Every tree is bounded ([`MAX_DEPTH`], [`MAX_ENTRIES`], [`MAX_NAME_LEN`]): names come
//! from image headers and command lines, both untrusted.

/// Longest image name (or option string) parsed; qcow2 backing names are ≤ 1023 bytes,
/// command lines rarely reach a few hundred.
pub const MAX_NAME_LEN: usize = 64 * 1024;
/// Deepest nesting of children (`a.b.c…` components, or nested JSON objects).
pub const MAX_DEPTH: usize = 16;
/// Most leaves and children in one tree.
pub const MAX_ENTRIES: usize = 1024;

/// Errors turning an image name into a tree, or a tree into storage.
///
/// `Display` keeps QEMU's wording where QEMU has one (the CLI prefixes
/// `Could not open 'NAME': `).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text after `json:` is not valid JSON.
    #[error("Could not parse the JSON options: {0}")]
    Json(String),
    /// The JSON value after `json:` is not an object.
    #[error("Invalid JSON object given")]
    JsonNotObject,
    /// The same key given twice (in one JSON object, or flattened and nested).
    #[error("Could not parse the options: duplicate key '{0}'")]
    Duplicate(String),
    /// A key used both as a value and as a group of options (`file=x,file.filename=y`).
    #[error("Parameters '{0}.*' used inconsistently")]
    Inconsistent(String),
    /// A malformed key (empty component, stray dot).
    #[error("Invalid parameter '{0}'")]
    BadKey(String),
    /// A key=value list item without `=`.
    #[error("Invalid parameter '{0}': expected key=value")]
    MissingValue(String),
    /// A value of the wrong JSON type (`"filename": 5`).
    #[error("Invalid parameter type for '{key}', expected: {expected}")]
    Type {
        /// Dotted key.
        key: String,
        /// What was wanted (`string`, `boolean`, `object`…).
        expected: &'static str,
    },
    /// A value of the right type that is not one of the allowed ones.
    #[error("Parameter '{key}' expects {expected}")]
    Value {
        /// Dotted key.
        key: String,
        /// What was wanted.
        expected: String,
    },
    /// An enumerated option given a word it does not know (QEMU's wording).
    #[error("invalid parameter value: {0}")]
    BadValue(String),
    /// `aio=native` on a node opened with the host page cache.
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    AioNativeNeedsDirect,
    /// `host_device` on a file that is neither a block nor a character device.
    #[error("'host_device' driver requires '{0}' to be either a character or block device")]
    NotADevice(String),
    /// A name past [`MAX_NAME_LEN`], or a tree past [`MAX_DEPTH`] / [`MAX_ENTRIES`].
    #[error("Image options too large: {0}")]
    TooLarge(String),
    /// A `proto:` prefix, or `driver`, naming no storage protocol this build opens.
    #[error("Unknown protocol '{0}'")]
    UnknownProtocol(String),
    /// A URL that does not follow its protocol's syntax.
    #[error("No valid URL specified: {0}")]
    BadUrl(String),
    /// A protocol node was given an option its protocol does not declare.
    #[error("Block protocol '{protocol}' doesn't support the option '{key}'")]
    ProtocolOption {
        /// Protocol name.
        protocol: String,
        /// Dotted key, relative to the protocol's node.
        key: String,
    },
    /// A format node was given an option its format does not take.
    #[error("Block format '{format}' does not support the option '{key}'")]
    FormatOption {
        /// Format name.
        format: String,
        /// Dotted key, relative to the format's node.
        key: String,
    },
    /// A node lacks a required option.
    #[error("{0}")]
    Missing(String),
    /// A reference to a node by name (`"file": "node0"`): there are no named nodes.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeReference(String),
}

/// One option value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string (every key=value value; JSON strings).
    Str(String),
    /// A JSON number, kept as written (sizes and counts are parsed by their consumer).
    Num(String),
    /// A JSON boolean.
    Bool(bool),
    /// JSON `null` (`"backing": null` disables a backing file).
    Null,
    /// A child node (a nested object, or the common prefix of dotted keys).
    Node(Node),
}

impl Value {
    /// The value's type, for errors (`string`, `number`, `boolean`, `null`, `object`).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Num(_) => "number",
            Value::Bool(_) => "boolean",
            Value::Null => "null",
            Value::Node(_) => "object",
        }
    }
}

/// A node of an options tree: ordered keys, each a leaf or a child node.
///
/// `path` is the node's dotted position in the whole tree (`""` for the root, `file`,
/// `backing.file`), used to name keys in errors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    path: String,
    entries: Vec<(String, Value)>,
}

impl Node {
    /// An empty node at the root of a tree.
    pub fn new() -> Node {
        Node::default()
    }

    /// An empty node at `path` (dotted) of its tree.
    fn at(path: String) -> Node {
        Node {
            path,
            entries: Vec::new(),
        }
    }

    /// The node's dotted position in its tree (`""` for the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Dotted name of `key` in the whole tree.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Whether the node has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The keys of this node, in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Inserts a string leaf under a dotted key (`file.filename`).
    pub fn insert_str(&mut self, key: &str, value: impl Into<String>) -> Result<(), SpecError> {
        self.insert(key, Value::Str(value.into()))
    }

    /// Inserts `value` under a dotted key, creating the intermediate children.
    /// A key present twice is [`SpecError::Duplicate`]; a key both a leaf and a group
    /// is [`SpecError::Inconsistent`]. Child nodes merge (a nested `file` object and
    /// flattened `file.*` keys describe one child).
    pub fn insert(&mut self, key: &str, value: Value) -> Result<(), SpecError> {
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(SpecError::BadKey(self.key_path(key)));
        }
        if parts.len() + depth_of(&self.path) > MAX_DEPTH {
            return Err(SpecError::TooLarge(format!(
                "'{}' nests deeper than {MAX_DEPTH} levels",
                self.key_path(key)
            )));
        }
        let (last, parents) = parts.split_last().ok_or(SpecError::BadKey(String::new()))?;
        let mut node = self;
        for p in parents {
            node = node.child_mut(p)?;
        }
        node.put(last, value)
    }

    /// The child node `key`, created if absent.
    fn child_mut(&mut self, key: &str) -> Result<&mut Node, SpecError> {
        let i = match self.entries.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                let path = self.key_path(key);
                self.entries
                    .push((key.to_string(), Value::Node(Node::at(path))));
                self.entries.len() - 1
            }
        };
        let path = self.key_path(key);
        match &mut self.entries[i].1 {
            Value::Node(n) => Ok(n),
            _ => Err(SpecError::Inconsistent(path)),
        }
    }

    /// Sets `key` (no dots) of this node; a node value merges into an existing child.
    fn put(&mut self, key: &str, value: Value) -> Result<(), SpecError> {
        match value {
            Value::Node(n) => {
                let child = self.child_mut(key)?;
                for (k, v) in n.entries {
                    child.put(&k, v)?;
                }
                Ok(())
            }
            leaf => {
                if let Some((_, old)) = self.entries.iter().find(|(k, _)| k == key) {
                    return Err(match old {
                        Value::Node(_) => SpecError::Inconsistent(self.key_path(key)),
                        _ => SpecError::Duplicate(self.key_path(key)),
                    });
                }
                self.entries.push((key.to_string(), leaf));
                Ok(())
            }
        }
    }

    /// Removes and returns `key` (dotted keys reach into children; a child emptied by
    /// the removal goes too, so leftovers name only keys nobody consumed).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        let (first, rest) = match key.split_once('.') {
            Some((f, r)) => (f, Some(r)),
            None => (key, None),
        };
        let i = self.entries.iter().position(|(k, _)| k == first)?;
        let Some(rest) = rest else {
            return Some(self.entries.remove(i).1);
        };
        let Value::Node(child) = &mut self.entries[i].1 else {
            return None;
        };
        let v = child.take(rest);
        if v.is_some() && child.is_empty() {
            self.entries.remove(i);
        }
        v
    }

    /// Removes `key`, which must be a string if present.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, SpecError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(SpecError::Type {
                key: self.key_path(key),
                expected: "string",
            }),
        }
    }

    /// Removes `key`, a boolean: JSON `true`/`false` or QEMU's spellings `on`/`off`
    /// (also `yes`/`no`, `true`/`false`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, SpecError> {
        let v = match self.take(key) {
            None => return Ok(None),
            Some(Value::Bool(b)) => return Ok(Some(b)),
            Some(Value::Str(s)) => s,
            Some(_) => {
                return Err(SpecError::Type {
                    key: self.key_path(key),
                    expected: "boolean",
                })
            }
        };
        match v.as_str() {
            "on" | "yes" | "true" => Ok(Some(true)),
            "off" | "no" | "false" => Ok(Some(false)),
            _ => Err(SpecError::Value {
                key: self.key_path(key),
                expected: "'on' or 'off'".into(),
            }),
        }
    }

    /// Removes `key`, a number or a string holding one (kept as text for the consumer
    /// to parse: sizes take suffixes, ports are checked against their range).
    pub fn take_scalar(&mut self, key: &str) -> Result<Option<String>, SpecError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Str(s) | Value::Num(s)) => Ok(Some(s)),
            Some(v) => Err(SpecError::Type {
                key: self.key_path(key),
                expected: if matches!(v, Value::Node(_)) {
                    "scalar"
                } else {
                    "number"
                },
            }),
        }
    }

    /// Removes the child node `key`, if present. A string there names another node
    /// by reference, which vdisk has none of ([`SpecError::NodeReference`]).
    pub fn take_node(&mut self, key: &str) -> Result<Option<Node>, SpecError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Node(n)) => Ok(Some(n)),
            Some(Value::Str(s)) => Err(SpecError::NodeReference(s)),
            Some(_) => Err(SpecError::Type {
                key: self.key_path(key),
                expected: "object",
            }),
        }
    }

    /// Every leaf as (dotted key relative to this node, value text), in order. Child
    /// nodes with no leaves appear as their key with an empty value `{}`.
    pub fn flatten(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.flatten_into("", &mut out);
        out
    }

    fn flatten_into(&self, prefix: &str, out: &mut Vec<(String, String)>) {
        for (k, v) in &self.entries {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Node(n) if n.is_empty() => out.push((key, "{}".into())),
                Value::Node(n) => n.flatten_into(&key, out),
                Value::Str(s) | Value::Num(s) => out.push((key, s.clone())),
                Value::Bool(b) => out.push((key, if *b { "on" } else { "off" }.into())),
                Value::Null => out.push((key, "null".into())),
            }
        }
    }

    /// The node as a `json:{…}` pseudo-filename (nested objects, values as parsed), the
    /// way QEMU names an image opened from options, e.g. as a backing file name.
    pub fn to_json_filename(&self) -> String {
        format!("json:{}", self.to_json_value())
    }

    fn to_json_value(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.entries {
            let j = match v {
                Value::Str(s) => serde_json::Value::String(s.clone()),
                Value::Num(n) => match n.parse::<serde_json::Number>() {
                    Ok(n) => serde_json::Value::Number(n),
                    Err(_) => serde_json::Value::String(n.clone()),
                },
                Value::Bool(b) => serde_json::Value::Bool(*b),
                Value::Null => serde_json::Value::Null,
                Value::Node(n) => n.to_json_value(),
            };
            m.insert(k.clone(), j);
        }
        serde_json::Value::Object(m)
    }

    /// Makes every relative `filename` in this node and below absolute against `dir`,
    /// so the options still name the same files when read from elsewhere (an overlay
    /// in another directory naming them as its backing file).
    pub fn absolutize_filenames(&mut self, dir: &std::path::Path) {
        for (k, v) in &mut self.entries {
            match v {
                Value::Str(f)
                    if k == "filename" && super::spec::is_plain_path(f) && !f.starts_with('/') =>
                {
                    *f = dir.join(&*f).to_string_lossy().into_owned();
                }
                Value::Node(n) => n.absolutize_filenames(dir),
                _ => {}
            }
        }
    }

    /// Total leaves and children below this node.
    pub fn count(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, v)| match v {
                Value::Node(n) => 1 + n.count(),
                _ => 1,
            })
            .sum()
    }

    /// Fails with `err(first leftover key)` if any key was not consumed; the key is
    /// dotted relative to this node (`bogus`, `server.bogus`).
    pub fn finish(self, err: impl FnOnce(String) -> SpecError) -> Result<(), SpecError> {
        match self.flatten().into_iter().next() {
            Some((k, _)) => Err(err(k)),
            None => Ok(()),
        }
    }

    /// Checks that every leaf below this node is `allowed` (dotted keys relative to
    /// this node), failing with `err(key)` on the first that is not.
    pub fn check_keys(
        &self,
        allowed: impl Fn(&str) -> bool,
        err: impl FnOnce(String) -> SpecError,
    ) -> Result<(), SpecError> {
        match self.flatten().into_iter().find(|(k, _)| !allowed(k)) {
            Some((k, _)) => Err(err(k)),
            None => Ok(()),
        }
    }

    /// Replaces this node's path (when a parsed tree becomes a child of another).
    pub fn rebase(&mut self, path: String) {
        for (k, v) in &mut self.entries {
            if let Value::Node(n) = v {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                n.rebase(p);
            }
        }
        self.path = path;
    }
}

/// `(key, value)` pairs as [`Node::flatten`] returns them, for tests' tables.
#[cfg(test)]
pub(crate) fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn depth_of(path: &str) -> usize {
    if path.is_empty() {
        0
    } else {
        path.split('.').count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_keys_build_children_and_merge() {
        let mut n = Node::new();
        n.insert_str("driver", "qcow2").unwrap();
        n.insert_str("file.driver", "file").unwrap();
        let mut f = Node::new();
        f.insert_str("filename", "a").unwrap();
        n.insert("file", Value::Node(f)).unwrap();
        assert_eq!(
            n.flatten(),
            vec![
                ("driver".into(), "qcow2".into()),
                ("file.driver".into(), "file".into()),
                ("file.filename".into(), "a".into())
            ]
        );
        let file = n.take_node("file").unwrap().unwrap();
        assert_eq!(file.path(), "file");
        assert_eq!(file.key_path("filename"), "file.filename");
    }

    #[test]
    fn json_filename_round_trips() {
        let mut n = super::super::spec::parse_image_opts(
            "driver=qcow2,file.driver=file,file.filename=a.qcow2,file.locking=off",
        )
        .unwrap();
        n.absolutize_filenames(std::path::Path::new("/d"));
        let j = n.to_json_filename();
        assert_eq!(
            j,
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/d/a.qcow2","locking":"off"}}"#
        );
        let back = super::super::spec::parse_filename(&j).unwrap();
        assert_eq!(back.flatten(), n.flatten());
    }

    #[test]
    fn conflicts_and_bad_keys_are_named() {
        let mut n = Node::new();
        n.insert_str("file.filename", "a").unwrap();
        assert_eq!(
            n.insert_str("file.filename", "b"),
            Err(SpecError::Duplicate("file.filename".into()))
        );
        assert_eq!(
            n.insert_str("file", "x"),
            Err(SpecError::Inconsistent("file".into()))
        );
        assert_eq!(
            n.insert_str("file.filename.x", "x"),
            Err(SpecError::Inconsistent("file.filename".into()))
        );
        for bad in ["", ".a", "a.", "a..b"] {
            assert!(matches!(n.insert_str(bad, "v"), Err(SpecError::BadKey(_))));
        }
        let deep = vec!["a"; MAX_DEPTH + 1].join(".");
        assert!(matches!(
            n.insert_str(&deep, "v"),
            Err(SpecError::TooLarge(_))
        ));
    }

    #[test]
    fn typed_takes() {
        let mut n = Node::new();
        n.insert("a", Value::Bool(true)).unwrap();
        n.insert_str("b", "off").unwrap();
        n.insert_str("c", "maybe").unwrap();
        n.insert("d", Value::Num("5".into())).unwrap();
        n.insert_str("e", "node0").unwrap();
        assert_eq!(n.take_bool("a"), Ok(Some(true)));
        assert_eq!(n.take_bool("b"), Ok(Some(false)));
        assert!(matches!(n.take_bool("c"), Err(SpecError::Value { .. })));
        assert_eq!(
            n.clone().take_str("d"),
            Err(SpecError::Type {
                key: "d".into(),
                expected: "string"
            })
        );
        assert_eq!(n.take_scalar("d"), Ok(Some("5".into())));
        assert_eq!(
            n.take_node("e"),
            Err(SpecError::NodeReference("node0".into()))
        );
        assert_eq!(n.take_str("missing"), Ok(None));
        assert!(n.is_empty());
    }

    #[test]
    fn finish_names_the_first_leftover() {
        let mut n = Node::new();
        n.insert_str("server.bogus", "1").unwrap();
        let e = n
            .finish(|key| SpecError::ProtocolOption {
                protocol: "nbd".into(),
                key,
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Block protocol 'nbd' doesn't support the option 'server.bogus'"
        );
    }
}
