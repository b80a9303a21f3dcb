//! The small parts of URL syntax the NBD and HTTP clients share.

/// Split `url` into scheme (lower-cased), authority, path and query.
pub(crate) fn split(url: &str) -> Result<(String, &str, &str, Option<&str>), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("'{url}' is not a URL"))?;
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    Ok((scheme.to_ascii_lowercase(), authority, path, query))
}

/// Split an authority into host and optional port; `[v6]` brackets are
/// removed from the host. User information is refused.
pub(crate) fn host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    if authority.contains('@') {
        return Err("user names and passwords in URLs are not supported".to_string());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unterminated '[' in '{authority}'"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("bad port in '{authority}'"))?,
            ),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("bad port '{p}'"))?,
        ),
    };
    Ok((host.to_string(), port))
}

/// Decode `%XX` escapes; the result must be UTF-8.
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' does not decode to UTF-8"))
}

/// The `key=value` pairs of a query string, decoded.
pub(crate) fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        let (s, a, p, q) = split("NBD+unix:///exp?socket=/tmp/s").unwrap();
        assert_eq!(
            (s.as_str(), a, p, q),
            ("nbd+unix", "", "/exp", Some("socket=/tmp/s"))
        );
        let (s, a, p, q) = split("http://h:8080").unwrap();
        assert_eq!((s.as_str(), a, p, q), ("http", "h:8080", "", None));
        assert!(split("plain/path").is_err());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_port("h:1").unwrap(), ("h".into(), Some(1)));
        assert_eq!(host_port("h").unwrap(), ("h".into(), None));
        assert_eq!(host_port("[::1]:99").unwrap(), ("::1".into(), Some(99)));
        assert_eq!(host_port("[::1]").unwrap(), ("::1".into(), None));
        assert!(host_port("h:0").is_err());
        assert!(host_port("h:x").is_err());
        assert!(host_port("u:p@h").is_err());
        assert!(host_port("[::1").is_err());
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").unwrap(), "a/b c");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
        assert_eq!(
            query_pairs(Some("socket=%2Ftmp%2Fs&x")).unwrap(),
            vec![
                ("socket".into(), "/tmp/s".into()),
                ("x".into(), String::new())
            ]
        );
    }
}
