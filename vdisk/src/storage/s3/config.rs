//! Where an S3 object is and who asks for it: the node's keys, then the usual AWS
//! environment variables, then the shared credentials file.
//!
//! Precedence, per setting: the image options (`endpoint`, `region`, `access-key-id`
//! with `secret-access-key-secret=ID`, `path-style`), then `AWS_ENDPOINT_URL`,
//! `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
//! `AWS_SESSION_TOKEN`, then the profile `AWS_PROFILE` (or `default`) of the file
//! `AWS_SHARED_CREDENTIALS_FILE` (or `~/.aws/credentials`). Without any credentials the
//! requests go unsigned (a public bucket); the instance-metadata service is never
//! asked.

use crate::crypto::secret;
use crate::storage::options::{Node, SpecError};
use crate::storage::StorageResult;
use std::collections::HashMap;

/// The region when none is configured (AWS's default).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Access keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id.
    pub key_id: String,
    /// The secret access key.
    pub secret: String,
    /// A session token (temporary credentials).
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.key_id)
    }
}

/// Everything needed to reach one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The object key.
    pub key: String,
    /// The endpoint URL (`http://127.0.0.1:3900`); `None` for AWS.
    pub endpoint: Option<String>,
    /// The region requests are signed for.
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`) rather than virtual-hosted
    /// (`bucket.endpoint/key`). The default when an endpoint is given.
    pub path_style: bool,
    /// `None`: unsigned requests.
    pub credentials: Option<Credentials>,
}

impl S3Config {
    /// The object's name as messages show it.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// Reads a node's keys (taking them) and completes them from `env` and the shared
/// credentials file. `env` is the process environment in production, a map in tests.
pub fn from_node(node: &mut Node, env: &dyn Fn(&str) -> Option<String>) -> StorageResult<S3Config> {
    let bucket = node
        .take_str("bucket")?
        .filter(|b| !b.is_empty())
        .ok_or_else(|| SpecError::Missing("Parameter 'bucket' is missing".into()))?;
    let key = node
        .take_str("key")?
        .map(|k| k.trim_start_matches('/').to_string())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| SpecError::Missing("Parameter 'key' is missing".into()))?;
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    let endpoint = node
        .take_str("endpoint")?
        .or_else(|| var("AWS_ENDPOINT_URL_S3"))
        .or_else(|| var("AWS_ENDPOINT_URL"));
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(SpecError::Value {
                key: node.key_path("endpoint"),
                expected: "an http:// or https:// URL".into(),
            }
            .into());
        }
    }
    let region = node
        .take_str("region")?
        .or_else(|| var("AWS_REGION"))
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    let path_style = node.take_bool("path-style")?.unwrap_or(endpoint.is_some());
    let key_id = node.take_str("access-key-id")?;
    let secret_id = node.take_str("secret-access-key-secret")?;
    let token_id = node.take_str("session-token-secret")?;
    let credentials = match (key_id, secret_id) {
        (Some(key_id), Some(sid)) => Some(Credentials {
            key_id,
            secret: secret_text(&sid)?,
            token: token_id.as_deref().map(secret_text).transpose()?,
        }),
        (None, None) => from_env(&var)?,
        (Some(_), None) => {
            return Err(SpecError::Missing(
                "Parameter 'secret-access-key-secret' is missing (access-key-id needs it)".into(),
            )
            .into())
        }
        (None, Some(_)) => {
            return Err(SpecError::Missing(
                "Parameter 'access-key-id' is missing (secret-access-key-secret needs it)".into(),
            )
            .into())
        }
    };
    Ok(S3Config {
        bucket,
        key,
        endpoint,
        region,
        path_style,
        credentials,
    })
}

/// A `--object secret` as text.
fn secret_text(id: &str) -> StorageResult<String> {
    let bad = |m: String| SpecError::Value {
        key: "secret-access-key-secret".into(),
        expected: m,
    };
    let s = secret::lookup(id).map_err(|e| bad(format!("a defined secret ({e})")))?;
    let text = std::str::from_utf8(s.bytes())
        .map_err(|_| bad(format!("a UTF-8 secret (secret '{id}' is not)")))?;
    Ok(text.trim_end_matches(['\n', '\0']).to_string())
}

/// Credentials from the environment, else from the shared credentials file.
fn from_env(var: &dyn Fn(&str) -> Option<String>) -> StorageResult<Option<Credentials>> {
    if let (Some(key_id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Some(Credentials {
            key_id,
            secret,
            token: var("AWS_SESSION_TOKEN"),
        }));
    }
    let path = match var("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match var("HOME") {
            Some(h) => std::path::Path::new(&h).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(crate::storage::StorageError::op(
                crate::storage::StorageOp::Open,
                path.display().to_string(),
                None,
                e,
            ))
        }
    };
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let Some(p) = ini_sections(&text).remove(&profile) else {
        return Ok(None);
    };
    match (p.get("aws_access_key_id"), p.get("aws_secret_access_key")) {
        (Some(k), Some(s)) => Ok(Some(Credentials {
            key_id: k.clone(),
            secret: s.clone(),
            token: p.get("aws_session_token").cloned(),
        })),
        _ => Err(SpecError::Value {
            key: format!("{}: [{profile}]", path.display()),
            expected: "aws_access_key_id and aws_secret_access_key".into(),
        }
        .into()),
    }
}

/// The sections of an INI file (`[name]` then `key = value` lines; `#`/`;` comments).
fn ini_sections(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines().take(100_000) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            // The config file's spelling of a named profile.
            let name = name.strip_prefix("profile ").unwrap_or(name).trim();
            cur = Some(name.to_string());
            out.entry(name.to_string()).or_default();
        } else if let (Some(c), Some((k, v))) = (&cur, line.split_once('=')) {
            out.entry(c.clone())
                .or_default()
                .insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pairs: &[(&str, &str)]) -> Node {
        let mut n = Node::new();
        for (k, v) in pairs {
            n.insert_str(k, *v).unwrap();
        }
        n
    }

    #[test]
    fn options_beat_the_environment_and_path_style_follows_the_endpoint() {
        let env = |k: &str| match k {
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:3900".to_string()),
            "AWS_DEFAULT_REGION" => Some("garage".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("GK1".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("s1".to_string()),
            _ => None,
        };
        let c = from_node(&mut node(&[("bucket", "b"), ("key", "/d/x.qcow2")]), &env).unwrap();
        assert_eq!(c.url(), "s3://b/d/x.qcow2");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(c.region, "garage");
        assert!(c.path_style);
        assert_eq!(c.credentials.as_ref().unwrap().key_id, "GK1");
        let c = from_node(
            &mut node(&[
                ("bucket", "b"),
                ("key", "k"),
                ("region", "eu-west-3"),
                ("path-style", "off"),
            ]),
            &env,
        )
        .unwrap();
        assert_eq!(c.region, "eu-west-3");
        assert!(!c.path_style);
        let none = |_: &str| None;
        let c = from_node(&mut node(&[("bucket", "b"), ("key", "k")]), &none).unwrap();
        assert_eq!(
            (c.region.as_str(), c.path_style, c.credentials),
            (DEFAULT_REGION, false, None)
        );
        assert!(from_node(&mut node(&[("bucket", "b")]), &none).is_err());
        assert!(from_node(
            &mut node(&[("bucket", "b"), ("key", "k"), ("access-key-id", "a")]),
            &none
        )
        .is_err());
        assert!(from_node(
            &mut node(&[("bucket", "b"), ("key", "k"), ("endpoint", "ftp://x")]),
            &none
        )
        .is_err());
    }

    #[test]
    fn the_shared_credentials_file_is_read_by_profile() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "# c\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[other]\naws_access_key_id=OK\naws_secret_access_key = OS\naws_session_token = T\n",
        )
        .unwrap();
        let path = f.display().to_string();
        let env = |k: &str| (k == "AWS_SHARED_CREDENTIALS_FILE").then(|| path.clone());
        let c = from_node(&mut node(&[("bucket", "b"), ("key", "k")]), &env).unwrap();
        let cr = c.credentials.unwrap();
        assert_eq!(
            (cr.key_id.as_str(), cr.secret.as_str(), cr.token),
            ("AK", "SK", None)
        );
        let env = |k: &str| match k {
            "AWS_SHARED_CREDENTIALS_FILE" => Some(path.clone()),
            "AWS_PROFILE" => Some("other".into()),
            _ => None,
        };
        let cr = from_node(&mut node(&[("bucket", "b"), ("key", "k")]), &env)
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!((cr.key_id.as_str(), cr.token.as_deref()), ("OK", Some("T")));
        assert!(!format!("{cr:?}").contains("OS"));
    }

    #[test]
    fn secrets_come_from_the_object_table() {
        secret::define(secret::Secret::new("s3cfg-test", b"topsecret\n".to_vec())).unwrap();
        let none = |_: &str| None;
        let c = from_node(
            &mut node(&[
                ("bucket", "b"),
                ("key", "k"),
                ("access-key-id", "GK"),
                ("secret-access-key-secret", "s3cfg-test"),
            ]),
            &none,
        )
        .unwrap();
        assert_eq!(c.credentials.unwrap().secret, "topsecret");
        let e = from_node(
            &mut node(&[
                ("bucket", "b"),
                ("key", "k"),
                ("access-key-id", "GK"),
                ("secret-access-key-secret", "nope"),
            ]),
            &none,
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
