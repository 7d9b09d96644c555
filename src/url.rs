//! URLs from the config: the broker's `mqtts://host:port` and the provisioning URL template.
//! A leaf module (no imports from the rest of the daemon), so `config` and `provision` both
//! use it without depending on each other.

use std::net::IpAddr;

/// A parsed `scheme://host[:port]/path?query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Plain HTTP is allowed only to a *literal* loopback address: a name like `localhost` is
/// resolved, and a resolver can say anything.
pub fn is_literal_loopback(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `host[:port]` or `[v6]:port` → (host, port), `default` when no port is given.
pub fn host_port(authority: &str, default: u16, url: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{:?}: unclosed [ in an IPv6 address", redact(url)))?;
        if !after.is_empty() && !after.starts_with(':') {
            return Err(format!("{:?}: text after the IPv6 address", redact(url)));
        }
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None => default,
        // Digits only: Rust's integer parser would also take a leading `+`.
        Some(p) => Some(p)
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{:?}: {p:?} is not a port number", redact(url)))?,
    };
    if host
        .bytes()
        .any(|b| b <= b' ' || b == 0x7F || b"{}/\\?#".contains(&b))
    {
        return Err(format!(
            "{:?}: the host has characters a host name cannot have",
            redact(url)
        ));
    }
    Ok((host, port))
}

/// `mqtts://host[:port]` → (host, port). Port 8883 by default. Plain `mqtt://` is refused:
/// the UserSig is a password.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let Some(rest) = url.strip_prefix("mqtts://") else {
        return Err(if url.starts_with("mqtt://") {
            format!("{url:?}: plaintext MQTT would send the UserSig in the clear; use mqtts://")
        } else {
            format!("{url:?}: use mqtts://host:port")
        });
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') || rest.is_empty() {
        return Err(format!(
            "{url:?}: use mqtts://host:port (no path or user info)"
        ));
    }
    let (host, port) = host_port(rest, 8883, url)?;
    if host.is_empty() {
        return Err(format!("{url:?}: the host is missing"));
    }
    Ok((host, port))
}

/// Parse a provisioning URL (with its placeholders already filled in).
pub fn parse_url(url: &str) -> Result<Url, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{:?}: use an https:// URL", redact(url)));
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return Err(format!(
            "{:?}: put credentials in token_file, not in the URL",
            redact(url)
        ));
    }
    let (host, port) = host_port(authority, if tls { 443 } else { 80 }, url)?;
    if host.is_empty() {
        return Err(format!("{:?}: the host is missing", redact(url)));
    }
    if !tls && !is_literal_loopback(&host) {
        return Err(format!(
            "{:?}: plain http:// would send the device token in the clear; use https:// \
             (http:// is accepted only for a literal loopback address such as 127.0.0.1, \
             for tests)",
            redact(url)
        ));
    }
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7F) {
        return Err(format!(
            "{:?}: the path has spaces or control characters",
            redact(url)
        ));
    }
    Ok(Url {
        tls,
        host,
        port,
        path,
    })
}

/// Check a URL template at config time: placeholders only in the path and the query (in the
/// host, a local app's `login {user_id}` would decide where the device token is sent), and
/// the URL valid once they are filled.
pub fn check_template(template: &str) -> Result<(), String> {
    let after_scheme = template
        .split_once("://")
        .map_or(template, |(_, rest)| rest);
    let authority_end = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
    if after_scheme[..authority_end].contains('{') {
        return Err(format!(
            "{:?}: placeholders such as {{user_id}} are allowed only in the path and the \
             query, not in the host or port",
            redact(template)
        ));
    }
    let filled = template
        .replace("{sdk_app_id}", "1")
        .replace("{user_id}", "u")
        .replace("{platform}", "p")
        .replace("{instance}", "i");
    parse_url(&filled).map(|_| ())
}

/// A URL fit for a log line or an error every API reader can see: query values replaced by
/// `…` (a provisioning URL may carry a key in its query), control characters dropped.
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out: String = base.chars().filter(|c| !c.is_control()).collect();
    if let Some(q) = query {
        out.push('?');
        let parts: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) => format!(
                    "{}=…",
                    k.chars().filter(|c| !c.is_control()).collect::<String>()
                ),
                None => kv.chars().filter(|c| !c.is_control()).collect(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_or_literal_loopback_http() {
        let u = parse_url("https://prov.example.com/v1/usersig?user_id=a").unwrap();
        assert_eq!(
            u,
            Url {
                tls: true,
                host: "prov.example.com".into(),
                port: 443,
                path: "/v1/usersig?user_id=a".into()
            }
        );
        let u = parse_url("http://127.0.0.1:8080?x=1").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (false, 8080, "/?x=1"));
        assert!(parse_url("http://[::1]:80/").is_ok());
        // A name is resolved, and a resolver can say anything: not for plain http.
        let e = parse_url("http://localhost/").unwrap_err();
        assert!(e.contains("literal loopback"), "{e}");
        assert!(parse_url("http://localhost.evil.example/").is_err());
        assert!(
            parse_url("http://prov.example.com/")
                .unwrap_err()
                .contains("https")
        );
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("https://user:pw@x/").is_err());
        assert!(parse_url("https://:443/").is_err());
        assert!(parse_url("https://x:99999/").is_err());
        assert!(parse_url("https://x:+443/").is_err());
        assert!(parse_url("https://[::1/").is_err());
        assert!(parse_url("https://[::1]x/").is_err());
    }

    #[test]
    fn placeholders_are_allowed_only_in_the_path_and_query() {
        assert!(check_template("https://x/{user_id}?app={sdk_app_id}").is_ok());
        for bad in [
            "https://{user_id}.prov.example.com/",
            "https://prov.example.com:{instance}/",
            "https://{user_id}/",
            "http://127.0.0.1{user_id}/",
        ] {
            let e = check_template(bad).unwrap_err();
            assert!(e.contains("only in the path"), "{bad}: {e}");
        }
    }

    #[test]
    fn query_values_are_redacted() {
        assert_eq!(
            redact("https://p.example/v1?user_id=kiosk&key=s3cr3t"),
            "https://p.example/v1?user_id=…&key=…"
        );
        assert_eq!(redact("https://p.example/v1"), "https://p.example/v1");
        assert_eq!(redact("https://p.example/?flag"), "https://p.example/?flag");
        assert_eq!(
            redact("https://p.exa\nmple/?a=\nb"),
            "https://p.example/?a=…"
        );
    }

    #[test]
    fn broker_urls_are_mqtts_only() {
        assert_eq!(
            parse_broker_url("mqtts://im.example.com").unwrap(),
            ("im.example.com".into(), 8883)
        );
        assert_eq!(
            parse_broker_url("mqtts://[::1]:1234/").unwrap(),
            ("::1".into(), 1234)
        );
        assert!(
            parse_broker_url("mqtt://x")
                .unwrap_err()
                .contains("in the clear")
        );
        assert!(parse_broker_url("mqtts://x/path").is_err());
        assert!(parse_broker_url("mqtts://u@x").is_err());
    }
}
