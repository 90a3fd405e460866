//! Credentials of QEMU's curl driver keys: `username` + `password-secret` (HTTP Basic
//! authentication, sent with every request as libcurl does with its default
//! `CURLAUTH_BASIC`), `cookie` or `cookie-secret` (the `Cookie` header), and
//! `proxy-username` + `proxy-password-secret` (Basic `Proxy-Authorization` on the
//! CONNECT to the proxy). The proxy itself comes from the environment (`ALL_PROXY`,
//! `HTTPS_PROXY`, `HTTP_PROXY`, their lower-case forms, `NO_PROXY`), as libcurl reads
//! it: QEMU's driver has no proxy key.
//!
//! Secrets are looked up by id in the process's `--object secret` table (UTF-8, as
//! QEMU's `qcrypto_secret_lookup_as_utf8`); the values are kept in zeroized buffers
//! and never shown by `Debug`.

use crate::crypto::secret;
use crate::storage::options::{Node, SpecError};
use base64::Engine;
use zeroize::Zeroizing;

/// What the requests carry besides the range.
#[derive(Default)]
pub(super) struct Credentials {
    /// `Authorization: Basic …`, when a username or password is given.
    pub authorization: Option<Zeroizing<String>>,
    /// `Cookie: …`.
    pub cookie: Option<Zeroizing<String>>,
    /// The proxy from the environment, with the proxy credentials when given.
    pub proxy: Option<ureq::Proxy>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("cookie", &self.cookie.as_ref().map(|_| "<redacted>"))
            .field("proxy", &self.proxy.as_ref().map(|p| (p.host(), p.port())))
            .finish()
    }
}

impl Credentials {
    /// Whether a server's 401 answer may be about wrong credentials (else: missing).
    pub fn has_authorization(&self) -> bool {
        self.authorization.is_some()
    }
}

/// The text of secret `id` (QEMU: "No secret with id 'X'", or not UTF-8).
fn secret_text(id: &str) -> Result<Zeroizing<String>, SpecError> {
    let s = secret::lookup(id).map_err(|e| SpecError::Missing(e.to_string()))?;
    let p = s
        .passphrase()
        .map_err(|e| SpecError::Missing(e.to_string()))?;
    // `passphrase` checked UTF-8 already.
    Ok(Zeroizing::new(String::from_utf8_lossy(p).into_owned()))
}

/// `Basic base64(user:password)` (RFC 7617), either part possibly empty as libcurl
/// sends it when only one is set.
fn basic(user: Option<&str>, password: Option<&str>) -> Zeroizing<String> {
    let pair = Zeroizing::new(format!("{}:{}", user.unwrap_or(""), password.unwrap_or("")));
    Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
    ))
}

/// Takes the credential keys from a curl node.
pub(super) fn take(node: &mut Node) -> Result<Credentials, SpecError> {
    let cookie = node.take_str("cookie")?;
    let cookie_secret = node.take_str("cookie-secret")?;
    let cookie = match (cookie, cookie_secret) {
        (Some(_), Some(_)) => {
            return Err(SpecError::Missing(
                "curl driver cannot handle both cookie and cookie secret".into(),
            ))
        }
        (Some(c), None) => Some(Zeroizing::new(c)),
        (None, Some(id)) => Some(secret_text(&id)?),
        (None, None) => None,
    };
    let username = node.take_str("username")?;
    let password = node
        .take_str("password-secret")?
        .map(|id| secret_text(&id))
        .transpose()?;
    let authorization = (username.is_some() || password.is_some())
        .then(|| basic(username.as_deref(), password.as_deref().map(|p| p.as_str())));
    let proxy_user = node.take_str("proxy-username")?;
    let proxy_password = node
        .take_str("proxy-password-secret")?
        .map(|id| secret_text(&id))
        .transpose()?;
    let proxy =
        match ureq::Proxy::try_from_env() {
            Some(p) if proxy_user.is_some() || proxy_password.is_some() => {
                let mut b = ureq::Proxy::builder(p.protocol())
                    .host(p.host())
                    .port(p.port());
                if let Some(u) = &proxy_user {
                    b = b.username(u);
                }
                if let Some(pw) = &proxy_password {
                    b = b.password(pw);
                }
                if let Some(np) = ["NO_PROXY", "no_proxy"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok())
                {
                    b = b.no_proxy(&np);
                }
                Some(b.build().map_err(|e| {
                    SpecError::Missing(format!("the proxy from the environment: {e}"))
                })?)
            }
            p => p,
        };
    Ok(Credentials {
        authorization,
        cookie,
        proxy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_is_rfc7617() {
        // RFC 7617's example.
        assert_eq!(
            basic(Some("Aladdin"), Some("open sesame")).as_str(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic(Some("u"), None).as_str(), "Basic dTo=");
    }

    #[test]
    fn cookie_and_cookie_secret_conflict() {
        let mut n = Node::new();
        n.insert_str("cookie", "a=b").unwrap();
        n.insert_str("cookie-secret", "s").unwrap();
        let e = take(&mut n).unwrap_err();
        assert_eq!(
            e.to_string(),
            "curl driver cannot handle both cookie and cookie secret"
        );
    }

    #[test]
    fn unknown_secret_is_named() {
        let mut n = Node::new();
        n.insert_str("username", "u").unwrap();
        n.insert_str("password-secret", "nope-http-test").unwrap();
        let e = take(&mut n).unwrap_err();
        assert_eq!(e.to_string(), "No secret with id 'nope-http-test'");
    }

    #[test]
    fn debug_hides_values() {
        let mut n = Node::new();
        n.insert_str("cookie", "session=hunter2").unwrap();
        n.insert_str("username", "u").unwrap();
        let c = take(&mut n).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2") && !d.contains("dTo"), "{d}");
    }
}
