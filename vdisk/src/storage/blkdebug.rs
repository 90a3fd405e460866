//! `blkdebug`: QEMU's rule-based error injection, as a storage protocol that wraps
//! another storage (its `image` child).
//!
//! Names: `blkdebug:CONFIG:IMAGE` (an empty CONFIG means none; IMAGE is any filename,
//! protocol prefixes included), or a node `driver=blkdebug` with `config`, `image`,
//! `align` and inline rule lists `inject-error.N.*` / `set-state.N.*` (JSON arrays
//! become those keys), as QEMU 10 accepts them.
//!
//! The config file is QEMU's config syntax: `[inject-error]` / `[set-state]` groups of
//! `key = "value"` lines, `#` comments. Rules:
//! - `[inject-error] event= errno= (default EIO) once= immediately= sector= state=
//!   iotype=`: when `event` is announced in `state` (0 or absent: any), the rule
//!   becomes active; every later request of a matching type (and touching `sector`,
//!   in 512-byte units, when given) fails with `errno`; `once` removes the rule after
//!   its first failure. `immediately` only changes when QEMU completes the request; a
//!   storage call here is synchronous, so it is accepted and has no effect.
//! - `[set-state] event= state= new_state=`: the state (1 at open) moves to
//!   `new_state` when `event` is announced in `state`.
//!
//! As QEMU: the rules of one event are processed newest first; the first inject rule
//! an event activates replaces the active list; `pwritev`/`pwritev_zero` are announced
//! by this storage before each write, `pwritev_done` after, and `none` once at open.
//! Everything else is announced by the format through [`Storage::event`].

use super::options::{Node, SpecError, Value};
use super::registry::{self, Protocol, ProtocolOpen};
use super::{BlkEvent, LockMode, Storage, StorageError, StorageOp, StorageResult};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The `blkdebug` protocol.
pub static PROTOCOL: Protocol = Protocol {
    name: "blkdebug",
    schemes: &["blkdebug"],
    options: &[
        "config",
        "align",
        "image.*",
        "inject-error.*",
        "set-state.*",
    ],
    parse_filename,
    open: Some(open),
};

/// Most rules one storage accepts (config file and inline together).
const MAX_RULES: usize = 4096;
/// Longest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// QEMU's `blkdebug_parse_filename`: `blkdebug:[CONFIG]:IMAGE`.
fn parse_filename(name: &str, node: &mut Node) -> Result<(), SpecError> {
    let rest = name.strip_prefix("blkdebug:").ok_or_else(|| {
        SpecError::Missing("blkdebug requires both config file and image path".into())
    })?;
    let (config, image) = rest.split_once(':').ok_or_else(|| {
        SpecError::Missing("blkdebug requires both config file and image path".into())
    })?;
    if !config.is_empty() {
        node.insert_str("config", config)?;
    }
    node.insert(
        "image",
        Value::Node(super::spec::parse_protocol_filename(image)?),
    )
}

/// The request types a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoType {
    Read = 0,
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    Flush = 4,
    BlockStatus = 5,
}

impl IoType {
    fn parse(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }
    fn bit(self) -> u32 {
        1 << self as u32
    }
    /// QEMU's default: everything but block status.
    const DEFAULT_MASK: u32 = 0b01_1111;
}

#[derive(Clone, Debug, PartialEq)]
enum Action {
    Inject {
        errno: i32,
        once: bool,
        /// Byte offset the request must touch (`sector` * 512).
        offset: Option<u64>,
        iotypes: u32,
    },
    SetState(u64),
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    event: BlkEvent,
    /// 0: any state.
    state: u64,
    action: Action,
}

#[derive(Debug, Default)]
struct Rules {
    state: u64,
    /// In definition order; `None` once a `once` rule has fired.
    rules: Vec<Option<Rule>>,
    /// Indices into `rules`, first checked first.
    active: Vec<usize>,
}

/// QEMU's suspend rules (`break EVENT TAG`) and the requests stopped at them.
#[derive(Debug, Default)]
struct Breaks {
    /// `(event, tag)`, oldest first; a point fires once (QEMU removes the rule).
    points: Vec<(BlkEvent, String)>,
    /// One `(tag, ticket)` per request stopped now.
    suspended: Vec<(String, u64)>,
    next_ticket: u64,
    /// Set by [`BlkdebugStorage::release_all`]: nothing stops any more.
    released: bool,
}

/// Longest a request stays suspended at a breakpoint when nobody resumes it (QEMU
/// waits forever; a storage call here holds a thread, so it is bounded).
pub const MAX_SUSPEND: Duration = Duration::from_secs(60);

/// A storage failing requests as its rules say; everything else goes to `inner`.
#[derive(Debug)]
pub struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    rules: Mutex<Rules>,
    breaks: Mutex<Breaks>,
    /// Signalled when a request stops or is resumed.
    moved: Condvar,
    /// `blkdebug:CONFIG:` as QEMU names the node (empty CONFIG when none), when the
    /// rules all came from the file.
    prefix: Option<String>,
}

impl BlkdebugStorage {
    /// A blkdebug over `inner` with no rules (breakpoints are added by the methods
    /// below); the base of tests that hold a request at an event.
    pub fn new(inner: Arc<dyn Storage>) -> BlkdebugStorage {
        let s = BlkdebugStorage::with_rules(inner, Vec::new(), None);
        s.announce(BlkEvent::None);
        s
    }

    fn with_rules(inner: Arc<dyn Storage>, rules: Vec<Rule>, prefix: Option<String>) -> Self {
        BlkdebugStorage {
            inner,
            rules: Mutex::new(Rules {
                state: 1,
                rules: rules.into_iter().map(Some).collect(),
                active: Vec::new(),
            }),
            breaks: Mutex::default(),
            moved: Condvar::new(),
            prefix,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_breaks(&self) -> MutexGuard<'_, Breaks> {
        self.breaks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// QEMU's `break EVENT TAG`: the next request announcing `event` stops there
    /// until [`resume`](Self::resume)d. `Err(ENOENT)` for an unknown event name.
    pub fn add_breakpoint(&self, event: &str, tag: &str) -> Result<(), i32> {
        let e = BlkEvent::parse(event).ok_or(libc::ENOENT)?;
        self.lock_breaks().points.push((e, tag.to_string()));
        Ok(())
    }

    /// QEMU's `remove_break TAG`: resumes every request stopped at `tag` and drops
    /// the breakpoints named `tag` not yet reached. As in QEMU, `Err(ENOENT)` when no
    /// breakpoint was dropped (a breakpoint is used up by the request it stops), even
    /// if requests were resumed.
    pub fn remove_breakpoint(&self, tag: &str) -> Result<(), i32> {
        let mut b = self.lock_breaks();
        let before = b.points.len();
        b.points.retain(|(_, t)| t != tag);
        b.suspended.retain(|(t, _)| t != tag);
        let dropped = before != b.points.len();
        drop(b);
        self.moved.notify_all();
        if dropped {
            Ok(())
        } else {
            Err(libc::ENOENT)
        }
    }

    /// The requests stopped now: their tag and a number unique to each stop (so a
    /// front-end can announce every stop once, as QEMU's blkdebug prints it).
    pub fn suspended(&self) -> Vec<(String, u64)> {
        self.lock_breaks().suspended.clone()
    }

    /// QEMU's `resume TAG`: lets the oldest request stopped at `tag` go on;
    /// `Err(ENOENT)` when none is stopped there.
    pub fn resume(&self, tag: &str) -> Result<(), i32> {
        let mut b = self.lock_breaks();
        let pos = b
            .suspended
            .iter()
            .position(|(t, _)| t == tag)
            .ok_or(libc::ENOENT)?;
        b.suspended.remove(pos);
        drop(b);
        self.moved.notify_all();
        Ok(())
    }

    /// Whether any breakpoint is set or any request stopped (front-ends then run
    /// asynchronous requests on their own threads, so one can wait at a breakpoint).
    pub fn has_breakpoints(&self) -> bool {
        let b = self.lock_breaks();
        !b.points.is_empty() || !b.suspended.is_empty()
    }

    /// Whether a request is stopped at `tag` now.
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.lock_breaks().suspended.iter().any(|(t, _)| t == tag)
    }

    /// QEMU's `wait_break TAG`, bounded: waits until a request is stopped at `tag`
    /// (true) or `timeout` passes (false).
    pub fn wait_suspended(&self, tag: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut b = self.lock_breaks();
        loop {
            if b.suspended.iter().any(|(t, _)| t == tag) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            b = self
                .moved
                .wait_timeout(b, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Resumes every stopped request and stops no more (what closing the image does in
    /// QEMU: no request stays held).
    pub fn release_all(&self) {
        let mut b = self.lock_breaks();
        b.released = true;
        b.points.clear();
        b.suspended.clear();
        drop(b);
        self.moved.notify_all();
    }

    /// Stops the calling request if a breakpoint is set on `event` (QEMU's
    /// `suspend_request`), until resumed, released or [`MAX_SUSPEND`] passes.
    fn maybe_suspend(&self, event: BlkEvent) {
        let mut b = self.lock_breaks();
        if b.released || b.points.is_empty() {
            return;
        }
        let Some(pos) = b.points.iter().position(|(e, _)| *e == event) else {
            return;
        };
        let (_, tag) = b.points.remove(pos);
        let ticket = b.next_ticket;
        b.next_ticket += 1;
        b.suspended.push((tag, ticket));
        self.moved.notify_all();
        let end = Instant::now() + MAX_SUSPEND;
        while b.suspended.iter().any(|(_, k)| *k == ticket) {
            let now = Instant::now();
            if now >= end {
                b.suspended.retain(|(_, k)| *k != ticket);
                break;
            }
            b = self
                .moved
                .wait_timeout(b, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// QEMU's `rule_check`: the error of the first active rule matching the request.
    fn check(&self, io: IoType, offset: u64, len: u64) -> StorageResult<()> {
        let mut r = self.lock();
        let hit = r.active.iter().position(|&i| match &r.rules[i] {
            Some(Rule {
                action:
                    Action::Inject {
                        offset: at,
                        iotypes,
                        ..
                    },
                ..
            }) => {
                iotypes & io.bit() != 0
                    && at.is_none_or(|a| len > 0 && a >= offset && a < offset.saturating_add(len))
            }
            _ => false,
        });
        let Some(pos) = hit else {
            return Ok(());
        };
        let i = r.active[pos];
        let Some(Rule {
            action: Action::Inject { errno, once, .. },
            ..
        }) = r.rules[i].clone()
        else {
            return Ok(());
        };
        if once {
            r.active.remove(pos);
            r.rules[i] = None;
        }
        drop(r);
        let op = match io {
            IoType::Read => StorageOp::Read,
            IoType::Write => StorageOp::Write,
            IoType::WriteZeroes => StorageOp::WriteZeroes,
            IoType::Discard => StorageOp::PunchHole,
            IoType::Flush => StorageOp::Flush,
            IoType::BlockStatus => StorageOp::SeekData,
        };
        Err(StorageError::Io {
            op,
            path: None,
            offset: (io != IoType::Flush).then_some(offset),
            source: std::io::Error::from_raw_os_error(errno),
        })
    }

    /// QEMU's `blkdebug_co_debug_event`.
    fn announce(&self, event: BlkEvent) {
        let mut guard = self.lock();
        let r = &mut *guard;
        let mut new_state = r.state;
        let mut injected = false;
        for i in (0..r.rules.len()).rev() {
            let Some(rule) = &r.rules[i] else { continue };
            if rule.event != event || (rule.state != 0 && rule.state != r.state) {
                continue;
            }
            match rule.action {
                Action::Inject { .. } => {
                    if !injected {
                        r.active.clear();
                        injected = true;
                    }
                    r.active.retain(|&a| a != i);
                    r.active.insert(0, i);
                }
                Action::SetState(s) => new_state = s,
            }
        }
        r.state = new_state;
        drop(guard);
        self.maybe_suspend(event);
    }
}

impl Storage for BlkdebugStorage {
    fn blkdebug(&self) -> Option<&BlkdebugStorage> {
        Some(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> StorageResult<()> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> StorageResult<()> {
        self.announce(BlkEvent::Pwritev);
        let r = self
            .check(IoType::Write, offset, buf.len() as u64)
            .and_then(|()| self.inner.write_at(buf, offset));
        self.announce(BlkEvent::PwritevDone);
        r
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> StorageResult<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(IoType::Read, offset, len)?;
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> StorageResult<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.announce(BlkEvent::Pwritev);
        let r = self
            .check(IoType::Write, offset, len)
            .and_then(|()| self.inner.write_vectored_at(bufs, offset));
        self.announce(BlkEvent::PwritevDone);
        r
    }
    fn flush(&self) -> StorageResult<()> {
        self.check(IoType::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn len(&self) -> StorageResult<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> StorageResult<()> {
        // QEMU's blkdebug has no truncate of its own: the request passes through.
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.check(IoType::Discard, offset, len)?;
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.announce(BlkEvent::PwritevZero);
        let r = self
            .check(IoType::WriteZeroes, offset, len)
            .and_then(|()| self.inner.write_zeroes(offset, len));
        self.announce(BlkEvent::PwritevDone);
        r
    }
    fn zero_fresh(&self, offset: u64, len: u64) -> StorageResult<bool> {
        // QEMU's qcow2 zeroes a new cluster's COW area with a no-fallback zero write
        // through blkdebug to the file; the rules see it as a zero write.
        self.check(IoType::WriteZeroes, offset, len)?;
        self.inner.zero_fresh(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> StorageResult<()> {
        self.check(IoType::WriteZeroes, offset, len)?;
        self.inner.allocate(offset, len)
    }
    fn extent_at(&self, offset: u64) -> StorageResult<(bool, u64)> {
        self.check(IoType::BlockStatus, offset, 1)?;
        self.inner.extent_at(offset)
    }
    fn relock(&self, mode: LockMode) -> StorageResult<()> {
        self.inner.relock(mode)
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn protocol_name(&self) -> &'static str {
        PROTOCOL.name
    }
    fn exact_filename(&self) -> Option<String> {
        let inner = self.inner.exact_filename()?;
        self.prefix.as_ref().map(|p| format!("{p}{inner}"))
    }
    fn event(&self, event: BlkEvent) {
        self.announce(event);
    }
}

fn missing(msg: impl Into<String>) -> SpecError {
    SpecError::Missing(msg.into())
}

/// One rule from its options (`group` is `inject-error` or `set-state`); `get`
/// takes an option's text, `Ok(None)` when absent.
fn rule_from(
    group: &str,
    mut get: impl FnMut(&str) -> Result<Option<String>, SpecError>,
) -> Result<Rule, SpecError> {
    let number = |key: &str, v: Option<String>| -> Result<Option<u64>, SpecError> {
        v.map(|s| {
            parse_number(&s).ok_or_else(|| SpecError::Value {
                key: key.into(),
                expected: "a number".into(),
            })
        })
        .transpose()
    };
    let boolean = |key: &str, v: Option<String>| -> Result<bool, SpecError> {
        match v.as_deref() {
            None => Ok(false),
            Some("on" | "yes" | "true") => Ok(true),
            Some("off" | "no" | "false") => Ok(false),
            Some(_) => Err(SpecError::Value {
                key: key.into(),
                expected: "'on' or 'off'".into(),
            }),
        }
    };
    let event = get("event")?.ok_or_else(|| missing("Missing event name for rule"))?;
    let event = BlkEvent::parse(&event).ok_or(SpecError::BadValue(event))?;
    let state = number("state", get("state")?)?.unwrap_or(0);
    let action = if group == "inject-error" {
        let errno = number("errno", get("errno")?)?.unwrap_or(libc::EIO as u64);
        let errno = i32::try_from(errno).map_err(|_| SpecError::Value {
            key: "errno".into(),
            expected: "a number".into(),
        })?;
        let once = boolean("once", get("once")?)?;
        boolean("immediately", get("immediately")?)?;
        number("delay-ns", get("delay-ns")?)?;
        let sector = number("sector", get("sector")?)?;
        let iotypes = match get("iotype")? {
            None => IoType::DEFAULT_MASK,
            Some(t) => IoType::parse(&t).ok_or(SpecError::BadValue(t))?.bit(),
        };
        Action::Inject {
            errno,
            once,
            offset: sector.map(|s| s.saturating_mul(512)),
            iotypes,
        }
    } else {
        Action::SetState(number("new_state", get("new_state")?)?.unwrap_or(0))
    };
    Ok(Rule {
        event,
        state,
        action,
    })
}

/// QemuOpts numbers: decimal, `0x` hex or leading-`0` octal (strtoull base 0).
fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

const INJECT_KEYS: &[&str] = &[
    "event",
    "state",
    "iotype",
    "errno",
    "sector",
    "once",
    "immediately",
    "delay-ns",
];
const SET_STATE_KEYS: &[&str] = &["event", "state", "new_state"];

fn group_keys(group: &str) -> &'static [&'static str] {
    if group == "inject-error" {
        INJECT_KEYS
    } else {
        SET_STATE_KEYS
    }
}

/// QEMU's `qemu_config_parse`, for blkdebug's two groups.
fn parse_config(text: &str, rules: &mut Vec<Rule>) -> Result<(), SpecError> {
    let mut group: Option<(String, Vec<(String, String)>)> = None;
    let mut groups = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let t = line.trim_start();
        if let Some(g) = t.strip_prefix('[') {
            let name = g.split([']', ' ', '"']).next().unwrap_or("");
            if name != "inject-error" && name != "set-state" {
                return Err(missing(format!("There is no option group '{name}'")));
            }
            groups.extend(group.take());
            group = Some((name.to_string(), Vec::new()));
            continue;
        }
        let key: String = t
            .split_whitespace()
            .next()
            .unwrap_or("")
            .chars()
            .take(63)
            .collect();
        if key.is_empty() {
            continue;
        }
        // ` = "value"`; anything else is an empty value, as sscanf leaves it.
        let after = t[t.find(char::is_whitespace).unwrap_or(t.len())..].trim_start();
        let value = after
            .strip_prefix('=')
            .map(str::trim_start)
            .and_then(|v| v.strip_prefix('"'))
            .and_then(|v| v.split_once('"').map(|(v, _)| v.to_string()))
            .unwrap_or_default();
        let Some((_, entries)) = group.as_mut() else {
            return Err(missing("no group defined"));
        };
        entries.push((key, value));
    }
    groups.extend(group);
    for (name, entries) in groups {
        let allowed = group_keys(&name);
        if let Some((k, _)) = entries.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(SpecError::BadKey(k.clone()));
        }
        let rule = rule_from(&name, |k| {
            Ok(entries
                .iter()
                .rev()
                .find(|(e, _)| e == k)
                .map(|(_, v)| v.clone()))
        })?;
        push(rules, rule)?;
    }
    Ok(())
}

fn push(rules: &mut Vec<Rule>, rule: Rule) -> Result<(), SpecError> {
    if rules.len() >= MAX_RULES {
        return Err(SpecError::TooLarge(format!(
            "more than {MAX_RULES} blkdebug rules"
        )));
    }
    rules.push(rule);
    Ok(())
}

/// Inline rules: `inject-error.N.key` (a list) or `inject-error.key` (one rule).
fn inline_rules(node: &mut Node, group: &str, rules: &mut Vec<Rule>) -> Result<(), SpecError> {
    let Some(mut list) = node.take_node(group)? else {
        return Ok(());
    };
    let allowed = group_keys(group);
    let single = list.keys().any(|k| allowed.contains(&k));
    let items: Vec<Node> = if single {
        vec![list]
    } else {
        let keys: Vec<String> = list.keys().map(str::to_string).collect();
        let mut v = Vec::new();
        for k in keys {
            if k.parse::<usize>().is_err() {
                return Err(SpecError::BadKey(list.key_path(&k)));
            }
            v.extend(list.take_node(&k)?);
        }
        v
    };
    for mut item in items {
        let rule = rule_from(group, |k| take_text(&mut item, k))?;
        push(rules, rule)?;
        if let Some((k, _)) = item.flatten().into_iter().next() {
            return Err(SpecError::BadKey(item.key_path(&k)));
        }
    }
    Ok(())
}

/// An option's text: strings and numbers as given, JSON booleans as `on`/`off`.
fn take_text(node: &mut Node, key: &str) -> Result<Option<String>, SpecError> {
    match node.take(key) {
        None => Ok(None),
        Some(Value::Str(s) | Value::Num(s)) => Ok(Some(s)),
        Some(Value::Bool(b)) => Ok(Some(if b { "on" } else { "off" }.into())),
        Some(_) => Err(SpecError::Type {
            key: node.key_path(key),
            expected: "scalar",
        }),
    }
}

/// Opens a `blkdebug` node: reads the rules, then opens `image` through the registry.
pub fn open(mut node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    let config = node.take_str("config")?;
    if let Some(a) = node.take_scalar("align")? {
        let v = crate::format::parse_size(&a)
            .ok()
            .filter(|v| *v < i32::MAX as u64 && (*v == 0 || v.is_power_of_two()));
        if v.is_none() {
            return Err(missing(format!("Cannot meet constraints with align {a}")).into());
        }
    }
    let mut rules = Vec::new();
    let mut from_file_only = true;
    if let Some(path) = &config {
        let text = read_config(path)?;
        parse_config(&text, &mut rules)?;
    }
    for group in ["inject-error", "set-state"] {
        let before = rules.len();
        inline_rules(&mut node, group, &mut rules)?;
        from_file_only &= rules.len() == before;
    }
    let image = node
        .take_node("image")?
        .ok_or_else(|| missing("A block device must be specified for \"image\""))?;
    node.finish(|key| SpecError::ProtocolOption {
        protocol: PROTOCOL.name.into(),
        key,
    })?;
    let inner = registry::open(image, ctx)?;
    let prefix = from_file_only.then(|| format!("blkdebug:{}:", config.unwrap_or_default()));
    let s = BlkdebugStorage::with_rules(inner, rules, prefix);
    s.announce(BlkEvent::None);
    Ok(Arc::new(s))
}

fn read_config(path: &str) -> StorageResult<String> {
    use std::io::Read;
    let fail = |e: std::io::Error| {
        missing(format!(
            "Could not read blkdebug config file: {}",
            e.to_string().split(" (os error").next().unwrap_or_default()
        ))
    };
    let f = std::fs::File::open(path).map_err(fail)?;
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(fail)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn storage(rules: Vec<Rule>) -> BlkdebugStorage {
        BlkdebugStorage::with_rules(Arc::new(MemStorage::new()), rules, None)
    }

    #[test]
    fn a_breakpoint_holds_one_request_until_resumed() {
        let s = Arc::new(storage(Vec::new()));
        assert_eq!(s.add_breakpoint("no_such_event", "A"), Err(libc::ENOENT));
        assert_eq!(s.resume("A"), Err(libc::ENOENT));
        assert_eq!(s.remove_breakpoint("A"), Err(libc::ENOENT));
        s.add_breakpoint("pwritev", "A").unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.write_at(b"held", 0));
        assert!(s.wait_suspended("A", Duration::from_secs(30)));
        // Held: nothing written yet; another tag is not stopped.
        let mut b = [0u8; 4];
        assert!(s.read_at(&mut b, 0).is_err() || b == [0; 4]);
        assert!(!s.is_suspended("B"));
        s.resume("A").unwrap();
        t.join().unwrap().unwrap();
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"held");
        // The point fired once: the next write passes.
        s.write_at(b"free", 0).unwrap();
        assert!(!s.is_suspended("A"));
    }

    #[test]
    fn remove_break_and_release_let_held_requests_go() {
        let s = Arc::new(storage(Vec::new()));
        s.add_breakpoint("pwritev", "A").unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.write_at(b"x", 0));
        assert!(s.wait_suspended("A", Duration::from_secs(30)));
        assert_eq!(s.suspended().len(), 1);
        // As QEMU: the stop used the breakpoint up, so removing it resumes the request
        // and still reports ENOENT; a breakpoint not reached yet is removed.
        assert_eq!(s.remove_breakpoint("A"), Err(libc::ENOENT));
        t.join().unwrap().unwrap();
        assert!(s.suspended().is_empty());
        s.add_breakpoint("pwritev", "A").unwrap();
        s.remove_breakpoint("A").unwrap();
        s.write_at(b"x", 0).unwrap();
        s.add_breakpoint("pwritev", "B").unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.write_at(b"y", 0));
        assert!(s.wait_suspended("B", Duration::from_secs(30)));
        s.release_all();
        t.join().unwrap().unwrap();
        // Released: later breakpoints no longer stop anything.
        s.add_breakpoint("pwritev", "C").unwrap();
        s.write_at(b"z", 0).unwrap();
        assert!(!s.wait_suspended("C", Duration::from_millis(10)));
    }

    fn parse(text: &str) -> Result<Vec<Rule>, SpecError> {
        let mut v = Vec::new();
        parse_config(text, &mut v)?;
        Ok(v)
    }

    #[test]
    fn config_syntax_as_qemu() {
        let r = parse(
            "# comment\n[inject-error]\nevent = \"l2_update\"\nerrno = \"28\"\nonce = \"on\"\nsector = \"8\"\n\n[set-state]\nevent = \"l1_update\"\nstate = \"1\"\nnew_state = \"2\"\n",
        )
        .unwrap();
        assert_eq!(
            r,
            vec![
                Rule {
                    event: BlkEvent::L2Update,
                    state: 0,
                    action: Action::Inject {
                        errno: 28,
                        once: true,
                        offset: Some(4096),
                        iotypes: IoType::DEFAULT_MASK
                    }
                },
                Rule {
                    event: BlkEvent::L1Update,
                    state: 1,
                    action: Action::SetState(2)
                }
            ]
        );
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert_eq!(err("event = \"l2_load\"\n"), "no group defined");
        assert_eq!(
            err("[inject-error]\nevent = l2_load\n"),
            "invalid parameter value: "
        );
        assert_eq!(
            err("[inject-error]\nerrno = \"5\"\n"),
            "Missing event name for rule"
        );
        assert_eq!(err("[bogus]\n"), "There is no option group 'bogus'");
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nfoo = \"1\"\n"),
            "Invalid parameter 'foo'"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nerrno = \"x\"\n"),
            "Parameter 'errno' expects a number"
        );
    }

    #[test]
    fn once_fails_one_request_and_always_every_later_one() {
        let inj = |once| Rule {
            event: BlkEvent::L2Update,
            state: 0,
            action: Action::Inject {
                errno: libc::ENOSPC,
                once,
                offset: None,
                iotypes: IoType::DEFAULT_MASK,
            },
        };
        let s = storage(vec![inj(true)]);
        s.write_at(b"a", 0).unwrap();
        s.event(BlkEvent::L2Load);
        s.write_at(b"a", 0).unwrap();
        s.event(BlkEvent::L2Update);
        assert_eq!(s.write_at(b"a", 0).unwrap_err().errno(), libc::ENOSPC);
        s.write_at(b"a", 0).unwrap();
        s.event(BlkEvent::L2Update);
        s.write_at(b"a", 0).unwrap();
        let s = storage(vec![inj(false)]);
        s.event(BlkEvent::L2Update);
        for _ in 0..3 {
            assert_eq!(s.flush().unwrap_err().errno(), libc::ENOSPC);
            let mut b = [0u8; 1];
            assert!(s.read_at(&mut b, 0).is_err());
        }
        assert!(s.len().is_ok());
    }

    #[test]
    fn sector_iotype_and_states() {
        let mut rules = parse(
            "[inject-error]\nevent = \"write_aio\"\nsector = \"2\"\niotype = \"write\"\nstate = \"2\"\n[set-state]\nevent = \"l1_update\"\nstate = \"1\"\nnew_state = \"2\"\n",
        )
        .unwrap();
        rules.truncate(2);
        let s = storage(rules);
        s.event(BlkEvent::WriteAio); // state 1: the rule does not apply
        s.write_at(&[0; 512], 1024).unwrap();
        s.event(BlkEvent::L1Update);
        s.event(BlkEvent::WriteAio);
        s.write_at(&[0; 512], 0).unwrap();
        let mut b = [0u8; 2048];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(s.write_at(&[0; 512], 1024).unwrap_err().errno(), libc::EIO);
        assert_eq!(s.write_at(&[0; 2048], 0).unwrap_err().errno(), libc::EIO);
        s.flush().unwrap();
    }

    #[test]
    fn filenames_and_inline_rules() {
        let mut n = Node::new();
        parse_filename("blkdebug::nbd+unix:///e?socket=/s", &mut n).unwrap();
        assert_eq!(
            n.flatten(),
            crate::storage::options::pairs(&[
                ("image.driver", "nbd"),
                ("image.export", "e"),
                ("image.server.type", "unix"),
                ("image.server.path", "/s"),
            ])
        );
        let mut n = Node::new();
        parse_filename("blkdebug:c.cfg:./a:b", &mut n).unwrap();
        assert_eq!(
            n.flatten(),
            crate::storage::options::pairs(&[
                ("config", "c.cfg"),
                ("image.driver", "file"),
                ("image.filename", "./a:b"),
            ])
        );
        assert_eq!(
            parse_filename("blkdebug:c.cfg:a:b", &mut Node::new()),
            Err(SpecError::UnknownProtocol("a".into()))
        );
        assert!(parse_filename("blkdebug:x", &mut Node::new()).is_err());

        let mut n = crate::storage::spec::parse_json(
            r#"{"inject-error":[{"event":"read_aio","errno":28,"once":true}],"set-state":{"event":"l2_load","new_state":3}}"#,
        )
        .unwrap();
        let mut rules = Vec::new();
        inline_rules(&mut n, "inject-error", &mut rules).unwrap();
        inline_rules(&mut n, "set-state", &mut rules).unwrap();
        assert!(n.is_empty());
        assert_eq!(
            rules[0].action,
            Action::Inject {
                errno: 28,
                once: true,
                offset: None,
                iotypes: IoType::DEFAULT_MASK
            }
        );
        assert_eq!(rules[1].action, Action::SetState(3));
    }
}
