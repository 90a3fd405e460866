//! The `http` and `https` protocols' names: a URL with a host, kept whole as the
//! `url` option (QEMU's curl driver keys).
//!
//! - `auth`: the credential keys (Basic authentication, cookies, proxy credentials).
//! - the bounded block cache and its read path are `storage::cache`, shared with S3.
//! - [`storage`]: the remote file as a read-only [`Storage`].

mod auth;
pub mod storage;

pub use storage::HttpStorage;

use super::options::{Node, SpecError};
use super::registry::{Protocol, ProtocolOpen};
use super::{uri, Storage, StorageResult};
use std::sync::Arc;

/// Option keys of QEMU's curl driver.
const OPTIONS: &[&str] = &[
    "url",
    "readahead",
    "timeout",
    "sslverify",
    "cookie",
    "cookie-secret",
    "username",
    "password-secret",
    "proxy-username",
    "proxy-password-secret",
];

/// Plain HTTP, read-only.
pub static HTTP: Protocol = Protocol {
    name: "http",
    schemes: &["http"],
    options: OPTIONS,
    parse_filename,
    open: Some(open_http),
};

/// HTTP over TLS, read-only.
pub static HTTPS: Protocol = Protocol {
    name: "https",
    schemes: &["https"],
    options: OPTIONS,
    parse_filename,
    open: Some(open_https),
};

fn open_http(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    storage::open(node, ctx, HTTP.name)
}

fn open_https(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    storage::open(node, ctx, HTTPS.name)
}

fn parse_filename(name: &str, node: &mut Node) -> Result<(), SpecError> {
    let u = uri::parse(name).map_err(|e| SpecError::BadUrl(format!("{e} in '{name}'")))?;
    if u.host.is_none() {
        return Err(SpecError::BadUrl(format!("no host in '{name}'")));
    }
    node.insert_str("url", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_kept_whole_and_need_a_host() {
        let mut n = Node::new();
        parse_filename("https://example.org:8443/img/a.qcow2?x=1", &mut n).unwrap();
        assert_eq!(
            n.flatten(),
            vec![(
                "url".to_string(),
                "https://example.org:8443/img/a.qcow2?x=1".to_string()
            )]
        );
        assert!(parse_filename("http:///a", &mut Node::new()).is_err());
        assert!(parse_filename("http://h:70000/a", &mut Node::new()).is_err());
    }
}
