//! The URL syntax storage protocols share (`scheme://[user@]host[:port]/path?query`),
//! after RFC 3986 as QEMU's `util/uri.c` reads it: percent-escapes decoded in the
//! path and query, IPv6 literals in brackets, a port in 0..=65535.

/// A parsed URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    /// Scheme (`nbd`, `nbd+unix`, `https`), as written.
    pub scheme: String,
    /// User information before `@`, decoded.
    pub user: Option<String>,
    /// Host as written, brackets of an IPv6 literal removed; `None` when empty.
    pub host: Option<String>,
    /// Port, when one was written (an empty `host:` counts as none).
    pub port: Option<u16>,
    /// Path (starting with `/` unless empty), decoded.
    pub path: String,
    /// Query parameters in order (`name=value`, decoded; `None` without `=`).
    pub query: Vec<(String, Option<String>)>,
}

/// Parses `s` as `scheme://authority[path][?query][#fragment]`; the reason is given
/// on failure. The fragment is ignored, as QEMU does.
pub fn parse(s: &str) -> Result<Uri, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| "expected scheme://".to_string())?;
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(format!("bad scheme '{scheme}'"));
    }
    let rest = rest.split_once('#').map_or(rest, |(a, _)| a);
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..]),
        None => (before_query, ""),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(decode(u)?), h),
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport)?;
    let mut params = Vec::new();
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        // QEMU's query_params_parse splits on '&' and ';'.
        for item in q.split(['&', ';']).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((k, v)) => params.push((decode(k)?, Some(decode(v)?))),
                None => params.push((decode(item)?, None)),
            }
        }
    }
    Ok(Uri {
        scheme: scheme.to_string(),
        user,
        host,
        port,
        path: decode(path)?,
        query: params,
    })
}

/// Splits `host[:port]` / `[v6][:port]`.
fn split_host_port(s: &str) -> Result<(Option<String>, Option<u16>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unterminated IPv6 address in '{s}'"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("junk after IPv6 address in '{s}'"))?,
            ),
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (decode(h)?, Some(p)),
            None => (decode(s)?, None),
        }
    };
    let port = match port.filter(|p| !p.is_empty()) {
        None => None,
        Some(p) => Some(parse_port(p)?),
    };
    Ok(((!host.is_empty()).then_some(host), port))
}

/// A TCP port: decimal digits, at most 65535.
pub fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid port '{p}'"));
    }
    p.parse::<u16>()
        .map_err(|_| format!("port '{p}' out of range"))
}

/// Decodes `%XX` escapes; the result must be UTF-8.
pub fn decode(s: &str) -> Result<String, String> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_urls() {
        let u = parse("nbd://user@example.com:10810/my%20disk?a=1&b;c=%2F#frag").unwrap();
        assert_eq!(u.scheme, "nbd");
        assert_eq!(u.user.as_deref(), Some("user"));
        assert_eq!(u.host.as_deref(), Some("example.com"));
        assert_eq!(u.port, Some(10810));
        assert_eq!(u.path, "/my disk");
        assert_eq!(
            u.query,
            vec![
                ("a".into(), Some("1".into())),
                ("b".into(), None),
                ("c".into(), Some("/".into()))
            ]
        );
    }

    #[test]
    fn hosts_and_ports() {
        let u = parse("nbd://[::1]:99/x").unwrap();
        assert_eq!((u.host.as_deref(), u.port), (Some("::1"), Some(99)));
        let u = parse("nbd+unix:///exp?socket=/tmp/s").unwrap();
        assert_eq!((u.host, u.port, u.path.as_str()), (None, None, "/exp"));
        let u = parse("http://h:/p").unwrap();
        assert_eq!(u.port, None);
        let u = parse("https://h").unwrap();
        assert_eq!((u.host.as_deref(), u.path.as_str()), (Some("h"), ""));
    }

    #[test]
    fn rejects() {
        for bad in [
            "nbd:/x",
            "://h/x",
            "n bd://h/x",
            "nbd://h:99999/x",
            "nbd://h:abc/x",
            "nbd://[::1/x",
            "nbd://[::1]x/y",
            "nbd://h/%zz",
            "nbd://h/%ff",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
