//! The `nbd` protocol's names: `nbd://host[:port]/export`, `nbd+tcp://…`,
//! `nbd+unix:///export?socket=PATH`, and QEMU's legacy `nbd:host:port[:exportname=E]`
//! / `nbd:unix:PATH[:exportname=E]`, turned into QEMU's keys (`server.type`,
//! `server.host`, `server.port`, `server.path`, `export`).
//!
//! - [`proto`]: the wire format (shared with the `vdisk serve` server).
//! - [`Stream`]: a TCP or Unix socket, or TLS over one ([`tls`]: QEMU's credential
//!   objects and the session).
//! - `client`: one connection: negotiation and pipelined transmission.
//! - [`storage`]: the export as a [`Storage`](super::Storage), and the protocol's open.

mod client;
pub mod proto;
pub mod storage;
mod stream;
pub mod tls;

pub use client::{Address, ExportInfo};
pub use storage::NbdStorage;
pub use stream::Stream;

use super::options::{Node, SpecError};
use super::registry::Protocol;
use super::uri;

/// The port an `nbd://` URL without one means.
pub const DEFAULT_PORT: u16 = 10809;

/// The `nbd` protocol (QEMU registers `nbd`, `nbd+tcp` and `nbd+unix` for it; the
/// TLS schemes `nbds`, `nbds+tcp`, `nbds+unix` are libnbd's, which QEMU lacks).
pub static PROTOCOL: Protocol = Protocol {
    name: "nbd",
    schemes: &[
        "nbd",
        "nbd+tcp",
        "nbd+unix",
        "nbds",
        "nbds+tcp",
        "nbds+unix",
    ],
    options: &[
        "server.type",
        "server.host",
        "server.port",
        "server.path",
        "export",
        "tls-creds",
        "tls-hostname",
        "tls-certificates",
        "tls-psk-file",
        "tls-username",
        "tls-verify-peer",
        // The nbds:// URL a node was parsed from: the export's name in `info` and
        // messages (set by the URL parser, not meant to be given).
        "x-url",
        "reconnect-delay",
        "open-timeout",
        "timeout",
        "connections",
    ],
    parse_filename,
    open: Some(storage::open),
};

/// QEMU's `nbd_parse_filename` / `nbd_parse_uri`.
fn parse_filename(name: &str, node: &mut Node) -> Result<(), SpecError> {
    if name.contains("://") {
        return parse_uri(name, node);
    }
    let bad = |why: &str| SpecError::BadUrl(format!("{why} in '{name}'"));
    let spec = name
        .strip_prefix("nbd:")
        .ok_or_else(|| bad("File name string for NBD must start with 'nbd:'"))?;
    let spec = match spec.split_once(":exportname=") {
        Some((_, "")) => return Err(bad("empty export name")),
        Some((s, export)) => {
            node.insert_str("export", export)?;
            s
        }
        None => spec,
    };
    if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("empty socket path"));
        }
        node.insert_str("server.type", "unix")?;
        node.insert_str("server.path", path)?;
        return Ok(());
    }
    // inet_parse: host:port with the port required; [v6]:port.
    let (host, port) = if let Some(rest) = spec.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| bad("expected [address]:port"))?;
        (h, p)
    } else {
        spec.rsplit_once(':')
            .ok_or_else(|| SpecError::BadUrl(format!("error parsing address '{spec}'")))?
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    uri::parse_port(port).map_err(|e| bad(&e))?;
    node.insert_str("server.type", "inet")?;
    node.insert_str("server.host", host)?;
    node.insert_str("server.port", port)?;
    Ok(())
}

fn parse_uri(name: &str, node: &mut Node) -> Result<(), SpecError> {
    let bad = |why: String| SpecError::BadUrl(format!("{why} in '{name}'"));
    let u = uri::parse(name).map_err(bad)?;
    let (unix, tls) = match u.scheme.as_str() {
        "nbd" | "nbd+tcp" => (false, false),
        "nbd+unix" => (true, false),
        "nbds" | "nbds+tcp" => (false, true),
        "nbds+unix" => (true, true),
        s => return Err(bad(format!("scheme '{s}' is not nbd"))),
    };
    let export = u.path.strip_prefix('/').unwrap_or(&u.path);
    if !export.is_empty() {
        node.insert_str("export", export)?;
    }
    // Query keys: QEMU's nbd+unix takes exactly `socket`. The TLS schemes also take
    // the JSON keys `tls-creds` and `tls-hostname`, and libnbd's `tls-certificates`
    // and `tls-psk-file` (the URL's user is then the PSK username); plain schemes
    // accept libnbd's two and ignore them, as libnbd does without TLS.
    let mut socket = None;
    for (k, v) in &u.query {
        let v = v.as_deref().filter(|v| !v.is_empty());
        match (k.as_str(), v) {
            ("socket", Some(p)) if unix && socket.is_none() => socket = Some(p),
            ("tls-certificates" | "tls-psk-file", Some(_)) if !tls => {}
            (
                "tls-creds" | "tls-hostname" | "tls-certificates" | "tls-psk-file"
                | "tls-verify-peer",
                Some(v),
            ) if tls && !node.contains(k) => node.insert_str(k, v)?,
            _ if !unix && !tls => return Err(bad(
                "nbd:// takes no query parameters (but libnbd's tls-certificates and tls-psk-file)"
                    .into(),
            )),
            _ if !tls => return Err(bad("nbd+unix:// needs exactly ?socket=PATH".into())),
            _ => return Err(bad(format!("unexpected query parameter '{k}'"))),
        }
    }
    if tls {
        let given: Vec<&str> = ["tls-creds", "tls-certificates", "tls-psk-file"]
            .into_iter()
            .filter(|k| node.contains(k))
            .collect();
        match given.as_slice() {
            // libnbd's default directories, as nbd_connect_uri looks in them.
            [] => match libnbd_certificates() {
                Ok(dir) => node.insert_str("tls-certificates", dir)?,
                Err(looked) => {
                    return Err(bad(format!(
                        "{}:// needs ?tls-creds=ID (an --object tls-creds-x509 or \
                         tls-creds-psk), ?tls-certificates=DIR or ?tls-psk-file=FILE \
                         (libnbd's default, {looked}, has no ca-cert.pem)",
                        u.scheme
                    )))
                }
            },
            [_] => {}
            [a, b, ..] => return Err(bad(format!("?{a}= and ?{b}= are exclusive"))),
        }
        if node.contains("tls-verify-peer") && !node.contains("tls-certificates") {
            return Err(bad("tls-verify-peer goes with tls-certificates".into()));
        }
        if let (Some(user), true) = (&u.user, node.contains("tls-psk-file")) {
            node.insert_str("tls-username", user)?;
        }
        // `info` and messages name the export by the URL as given (QEMU has no
        // nbds://, and its JSON opens keep their nbd:// names).
        node.insert_str("x-url", name)?;
    }
    if unix {
        if u.host.is_some() || u.port.is_some() {
            return Err(bad(format!("{}:// takes no host or port", u.scheme)));
        }
        let path = socket.ok_or_else(|| bad(format!("{}:// needs ?socket=PATH", u.scheme)))?;
        node.insert_str("server.type", "unix")?;
        node.insert_str("server.path", path)?;
    } else {
        let host = u
            .host
            .ok_or_else(|| bad(format!("{}:// needs a host", u.scheme)))?;
        node.insert_str("server.type", "inet")?;
        node.insert_str("server.host", host)?;
        node.insert_str("server.port", u.port.unwrap_or(DEFAULT_PORT).to_string())?;
    }
    Ok(())
}

/// The certificates directory libnbd uses when a URL names none: for root
/// `/etc/pki/libnbd`, for others `$HOME/.pki/libnbd` then `$HOME/.config/pki/libnbd`,
/// the first holding `ca-cert.pem`; else the places looked in. (libnbd then falls back
/// to the system CAs without checking the server; vdisk refuses instead.)
fn libnbd_certificates() -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let home = std::env::var("HOME").ok().filter(|h| !h.is_empty());
    let dirs: Vec<String> = match (root, home) {
        (false, Some(h)) => vec![
            format!("{h}/.pki/libnbd"),
            format!("{h}/.config/pki/libnbd"),
        ],
        (false, None) => Vec::new(),
        (true, _) => vec!["/etc/pki/libnbd".to_string()],
    };
    dirs.iter()
        .find(|d| std::path::Path::new(d).join("ca-cert.pem").exists())
        .cloned()
        .ok_or_else(|| match dirs.as_slice() {
            [] => "$HOME/.pki/libnbd ($HOME is not set)".to_string(),
            d => d.join(" or "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<(String, String)>, SpecError> {
        let mut n = Node::new();
        parse_filename(s, &mut n)?;
        Ok(n.flatten())
    }

    use crate::storage::options::pairs as kv;

    #[test]
    fn uri_forms() {
        assert_eq!(
            parse("nbd://localhost/x").unwrap(),
            kv(&[
                ("export", "x"),
                ("server.type", "inet"),
                ("server.host", "localhost"),
                ("server.port", "10809")
            ])
        );
        assert_eq!(
            parse("nbd+tcp://[::1]:1234").unwrap(),
            kv(&[
                ("server.type", "inet"),
                ("server.host", "::1"),
                ("server.port", "1234")
            ])
        );
        assert_eq!(
            parse("nbd+unix:///my%20disk?socket=/run/a%20b.sock").unwrap(),
            kv(&[
                ("export", "my disk"),
                ("server.type", "unix"),
                ("server.path", "/run/a b.sock")
            ])
        );
    }

    #[test]
    fn tls_forms() {
        assert_eq!(
            parse("nbds://localhost:1234/x?tls-creds=t0").unwrap(),
            kv(&[
                ("export", "x"),
                ("tls-creds", "t0"),
                ("x-url", "nbds://localhost:1234/x?tls-creds=t0"),
                ("server.type", "inet"),
                ("server.host", "localhost"),
                ("server.port", "1234")
            ])
        );
        assert_eq!(
            parse("nbds+unix:///e?socket=/s&tls-creds=t&tls-hostname=h").unwrap(),
            kv(&[
                ("export", "e"),
                ("tls-creds", "t"),
                ("tls-hostname", "h"),
                (
                    "x-url",
                    "nbds+unix:///e?socket=/s&tls-creds=t&tls-hostname=h"
                ),
                ("server.type", "unix"),
                ("server.path", "/s")
            ])
        );
        // libnbd's keys; the URL's user is the PSK username.
        assert_eq!(
            parse("nbds://alice@h/?tls-psk-file=/k.psk").unwrap(),
            kv(&[
                ("tls-psk-file", "/k.psk"),
                ("tls-username", "alice"),
                ("x-url", "nbds://alice@h/?tls-psk-file=/k.psk"),
                ("server.type", "inet"),
                ("server.host", "h"),
                ("server.port", "10809")
            ])
        );
        assert_eq!(
            parse("nbds+unix://u@/e?socket=/s&tls-certificates=/d&tls-verify-peer=false").unwrap(),
            kv(&[
                ("export", "e"),
                ("tls-certificates", "/d"),
                ("tls-verify-peer", "false"),
                (
                    "x-url",
                    "nbds+unix://u@/e?socket=/s&tls-certificates=/d&tls-verify-peer=false"
                ),
                ("server.type", "unix"),
                ("server.path", "/s")
            ])
        );
        // Without TLS, libnbd ignores its TLS keys.
        assert_eq!(
            parse("nbd://h/?tls-certificates=/d").unwrap(),
            parse("nbd://h/").unwrap()
        );
        // (nbds:// naming no credentials looks in libnbd's directories: nbd_tls tests.)
        for bad in [
            "nbds://h/?tls-creds=t&tls-certificates=/d",
            "nbds://h/?tls-certificates=/d&tls-psk-file=/f",
            "nbds://h/?tls-psk-file=/f&tls-verify-peer=false",
            "nbds://h/?tls-creds=t&tls-verify-peer=false",
            "nbd://h/?tls-verify-peer=false",
            "nbds+unix:///x?tls-creds=t",
            "nbds://localhost/x?tls-creds=t&socket=/s",
            "nbds://localhost/x?tls-creds=t&tls-creds=u",
            "nbd://localhost/x?tls-creds=t",
            "nbd+unix:///x?socket=/s&tls-creds=t",
        ] {
            assert!(matches!(parse(bad), Err(SpecError::BadUrl(_))), "{bad}");
        }
    }

    #[test]
    fn legacy_forms() {
        assert_eq!(
            parse("nbd:unix:/tmp/s:exportname=e").unwrap(),
            kv(&[
                ("export", "e"),
                ("server.type", "unix"),
                ("server.path", "/tmp/s")
            ])
        );
        assert_eq!(
            parse("nbd:example.org:10810").unwrap(),
            kv(&[
                ("server.type", "inet"),
                ("server.host", "example.org"),
                ("server.port", "10810")
            ])
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=/s&b=1",
            "nbd://localhost/x?socket=/s",
            "nbd:///x",
            "nbd://localhost:99999/x",
            "nbd://localhost:abc/x",
            "nbd:localhost",
            "nbd:unix:",
            "nbd:h:1:exportname=",
        ] {
            assert!(
                matches!(parse(bad), Err(SpecError::BadUrl(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
    }
}
