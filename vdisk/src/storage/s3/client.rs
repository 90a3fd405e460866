//! [`Client`]: one object through `object_store`'s S3 client, behind blocking calls.
//!
//! `object_store` is async; the client owns a small tokio runtime (two worker threads)
//! and every call blocks on it, so nothing async leaves this module. It may be called
//! from many threads at once (convert's workers): each `block_on` runs its own future
//! on the shared runtime. Transient failures (connection errors, timeouts, 5xx) are
//! retried by `object_store` with exponential backoff, bounded in count and time;
//! what is left is turned into an `io::Error` that says what went wrong in words
//! (no such bucket, no such key, access denied, endpoint unreachable).

use super::config::S3Config;
use crate::storage::{StorageError, StorageOp, StorageResult};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use std::io;
use std::time::Duration;

/// Retries after the first try of a request.
const RETRIES: usize = 4;
/// No retry starts after this much time since the first try.
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// One request's time limit (a stalled server is an error, never a hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one object.
#[derive(Debug)]
pub struct Client {
    rt: tokio::runtime::Runtime,
    store: AmazonS3,
    path: Path,
    url: String,
}

impl Client {
    /// A client for `cfg`'s object (no request is made yet).
    pub fn new(cfg: &S3Config) -> StorageResult<Client> {
        let url = cfg.url();
        let open_err = |m: String| StorageError::from(io::Error::other(m));
        let mut opts = ClientOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT);
        if cfg
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
        {
            opts = opts.with_allow_http(true);
        }
        if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
            let pem = std::fs::read(&path).map_err(|e| {
                StorageError::op(
                    StorageOp::Open,
                    std::path::Path::new(&path).display().to_string(),
                    None,
                    e,
                )
            })?;
            let certs = object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| open_err(format!("SSL_CERT_FILE: {e}")))?;
            for c in certs {
                opts = opts.with_root_certificate(c);
            }
        }
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(opts)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(4),
                    base: 2.0,
                },
                max_retries: RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            });
        // Over TLS the payload is protected already: skip hashing it for the signature
        // (as the AWS CLI does over https); over plain http the signature covers it.
        let tls = cfg
            .endpoint
            .as_deref()
            .is_none_or(|e| e.starts_with("https://"));
        b = b.with_unsigned_payload(tls);
        if let Some(e) = &cfg.endpoint {
            let e = e.trim_end_matches('/');
            // Virtual-hosted style with an endpoint puts the bucket in the host name.
            let e = if cfg.path_style {
                e.to_string()
            } else {
                match e.split_once("://") {
                    Some((scheme, host)) => format!("{scheme}://{}.{host}", cfg.bucket),
                    None => e.to_string(),
                }
            };
            b = b.with_endpoint(e);
        }
        b = match &cfg.credentials {
            Some(c) => {
                let b = b
                    .with_access_key_id(&c.key_id)
                    .with_secret_access_key(&c.secret);
                match &c.token {
                    Some(t) => b.with_token(t),
                    None => b,
                }
            }
            // Unsigned: a public bucket. (Without this the builder would ask the
            // instance-metadata service.)
            None => b.with_skip_signature(true),
        };
        let store = b.build().map_err(|e| open_err(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vdisk-s3")
            .enable_all()
            .build()
            .map_err(StorageError::from)?;
        Ok(Client {
            rt,
            store,
            path: Path::from(cfg.key.as_str()),
            url,
        })
    }

    /// The object's name (`s3://bucket/key`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs a future to completion on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The store and the object's path (for the upload).
    pub fn store(&self) -> (&AmazonS3, &Path) {
        (&self.store, &self.path)
    }

    /// The object's size, `None` when it does not exist (the bucket does).
    pub fn size(&self) -> io::Result<Option<u64>> {
        match self.block_on(self.store.head(&self.path)) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => {
                // HEAD has no body to say which is missing: a listing does.
                let listed = self.block_on(async {
                    self.store
                        .list(Some(&self.path))
                        .take(1)
                        .try_collect::<Vec<_>>()
                        .await
                });
                match listed {
                    Ok(_) => Ok(None),
                    Err(e) => Err(describe(e)),
                }
            }
            Err(e) => Err(describe(e)),
        }
    }

    /// Reads `dst.len()` bytes at `offset`.
    pub fn get(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let end = offset + dst.len() as u64;
        let b = self
            .block_on(self.store.get_range(&self.path, offset..end))
            .map_err(describe)?;
        if b.len() != dst.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("asked for {} bytes at {offset}, got {}", dst.len(), b.len()),
            ));
        }
        dst.copy_from_slice(&b);
        Ok(())
    }

    /// Stores `data` as the whole object (one PUT).
    pub fn put(&self, data: Bytes) -> io::Result<()> {
        self.block_on(self.store.put(&self.path, data.into()))
            .map(|_| ())
            .map_err(describe)
    }
}

/// An `object_store` error in words (the URL is added by the caller's context).
pub fn describe(e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let chain = error_chain(&e);
    // The innermost cause: "Connection refused", "operation timed out".
    let cause = chain
        .rsplit(": ")
        .next()
        .unwrap_or(&chain)
        .trim()
        .to_string();
    let denied = || {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "Access denied (check the credentials and the bucket's permissions)",
        )
    };
    let no_bucket = || io::Error::new(io::ErrorKind::NotFound, "No such bucket");
    match e {
        _ if chain.contains("<Code>NoSuchBucket</Code>") => no_bucket(),
        E::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, "No such key in the bucket"),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => denied(),
        _ if [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403 Forbidden",
        ]
        .iter()
        .any(|m| chain.contains(m)) =>
        {
            denied()
        }
        // The server answered before the body was sent (a refused upload: access
        // denied, quota) and closed the socket under the writer; its answer is lost.
        _ if ["Broken pipe", "Connection reset"]
            .iter()
            .any(|m| cause.contains(m)) =>
        {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "the S3 server closed the connection during the request ({cause}); \
                     a refused upload (permissions, quota) ends this way"
                ),
            )
        }
        _ if chain.contains("error sending request") => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("S3 endpoint unreachable ({cause})"),
        ),
        _ => io::Error::other(chain),
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut n = 0;
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
        n += 1;
        if n > 16 {
            break;
        }
    }
    s
}
