//! The `s3` protocol: an object in an S3 bucket (AWS, Garage, MinIO, Ceph RGW),
//! `s3://bucket/key` or `{"driver":"s3","bucket":…,"key":…}`, through the
//! `object_store` crate's S3 client (it signs the requests).
//!
//! - [`config`]: the bucket, key, endpoint, region and credentials, from the options,
//!   the environment and the shared credentials file;
//! - [`client`]: the object behind blocking calls (the async client on a runtime of
//!   its own), errors in words;
//! - [`storage`]: [`S3Storage`], read through the block cache, or written through a
//!   local spool file uploaded at flush;
//! - [`upload`]: whole-object upload (multipart, parallel parts) and download
//!   (parallel ranged GETs).

pub mod client;
pub mod config;
pub mod storage;
pub mod upload;

pub use storage::S3Storage;

use super::options::{Node, SpecError};
use super::registry::{Protocol, ProtocolOpen};
use super::{uri, Storage, StorageResult};
use std::sync::Arc;

/// The node's keys.
const OPTIONS: &[&str] = &[
    "bucket",
    "key",
    "endpoint",
    "region",
    "path-style",
    "access-key-id",
    "secret-access-key-secret",
    "session-token-secret",
];

/// S3 objects.
pub static PROTOCOL: Protocol = Protocol {
    name: "s3",
    schemes: &["s3"],
    options: OPTIONS,
    parse_filename,
    open: Some(open),
};

/// `s3://bucket/key/with/slashes` → `bucket`, `key`.
fn parse_filename(name: &str, node: &mut Node) -> Result<(), SpecError> {
    let u = uri::parse(name).map_err(|e| SpecError::BadUrl(format!("{e} in '{name}'")))?;
    let bucket = u
        .host
        .ok_or_else(|| SpecError::BadUrl(format!("no bucket in '{name}'")))?;
    if u.port.is_some() || u.user.is_some() || !u.query.is_empty() {
        return Err(SpecError::BadUrl(format!(
            "expected s3://bucket/key (no port, user or query) in '{name}'"
        )));
    }
    let key = u.path.trim_start_matches('/');
    if key.is_empty() {
        return Err(SpecError::BadUrl(format!("no object key in '{name}'")));
    }
    node.insert_str("bucket", bucket)?;
    node.insert_str("key", key)
}

fn client(mut node: Node) -> StorageResult<client::Client> {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = config::from_node(&mut node, &env)?;
    node.finish(|key| SpecError::ProtocolOption {
        protocol: PROTOCOL.name.into(),
        key,
    })?;
    client::Client::new(&cfg)
}

fn open(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    storage::open(client(node)?, ctx.read_only, false, ctx.cache)
}

/// Opens a node's object as a new, empty image (the target of `create`/`convert`);
/// it is uploaded when flushed (unless `cache=unsafe`) and when closed.
pub fn create(node: Node, ctx: &ProtocolOpen) -> StorageResult<Arc<dyn Storage>> {
    storage::open(client(node)?, false, true, ctx.cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_key() {
        let mut n = Node::new();
        parse_filename("s3://golden/img/a%20b.qcow2", &mut n).unwrap();
        assert_eq!(
            n.flatten(),
            vec![
                ("bucket".to_string(), "golden".to_string()),
                ("key".to_string(), "img/a b.qcow2".to_string())
            ]
        );
        assert!(parse_filename("s3:///k", &mut Node::new()).is_err());
        assert!(parse_filename("s3://b/", &mut Node::new()).is_err());
        assert!(parse_filename("s3://b:9000/k", &mut Node::new()).is_err());
    }
}
