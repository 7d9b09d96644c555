//! The provisioning client: `GET {provisioning.url}` → a UserSig.
//!
//! A small HTTP/1.1 client over tokio-rustls (ring), which rumqttc already brings: one GET
//! with `Connection: close`, a response size cap, one overall timeout. HTTPS only, except plain
//! HTTP to a loopback address (for tests). Failures are classified as brief §3.6 says:
//! 5xx/429/timeouts → busy (backoff, `Retry-After` honoured); 401/403/404 → fatal; a
//! malformed answer → busy, logged loudly. Neither the device token nor the UserSig ever
//! appears in an error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ProvisioningConfig;
use crate::identity::{Template, TemplateValues, UserId};
use crate::session::{ErrorClass, FetchFailure, codes};
use crate::usersig::{SigFormat, UserSig, inspect};

const MAX_HEAD: usize = 16 * 1024;

pub use crate::url::{Url, check_template as check_url, parse_url};

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A UserSig as fetched, with what is known about it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub sig: UserSig,
    pub user_id: UserId,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
    /// The server's `Date`, in Unix seconds.
    pub server_date: Option<i64>,
}

/// Fetches UserSigs for one device.
#[derive(Clone)]
pub struct Provisioner {
    url: Template,
    token_file: Option<PathBuf>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    max_body: usize,
    sdk_app_id: u64,
    platform: String,
    instance: String,
}

fn fail(class: ErrorClass, code: u32, message: impl Into<String>) -> FetchFailure {
    FetchFailure::new(class, code, message)
}

/// Failures that may be momentary but must not be retried forever (a device token file
/// mid-rotation, an odd 4xx): this many in a row, then stop.
pub const GIVE_UP_AFTER: u32 = 3;

fn limited(mut f: FetchFailure) -> FetchFailure {
    f.give_up_after = Some(GIVE_UP_AFTER);
    f
}

fn io_failure(e: &std::io::Error, what: &str) -> FetchFailure {
    use std::io::ErrorKind as K;
    if crate::tls::is_not_yet_valid(e) {
        return fail(
            ErrorClass::Clock,
            0,
            format!(
                "{what}: the server certificate is not valid yet: the device clock is probably behind"
            ),
        );
    }
    let code = match e.kind() {
        K::ConnectionRefused => codes::NET_CONN_REFUSE,
        K::TimedOut => codes::NET_CONN_TIMEOUT,
        _ if e.to_string().contains("lookup") || e.to_string().contains("resolve") => {
            codes::NET_DNS
        }
        _ => codes::NET_DISCONNECT,
    };
    fail(ErrorClass::Network, code, format!("{what}: {e}"))
}

impl Provisioner {
    pub fn new(
        cfg: &ProvisioningConfig,
        sdk_app_id: u64,
        platform: &str,
        instance: &str,
    ) -> Result<Provisioner, String> {
        let tls = crate::tls::client_config(&cfg.ca, cfg.client_auth.as_ref(), &[b"http/1.1"])?;
        Ok(Provisioner {
            url: cfg.url.clone(),
            token_file: cfg.token_file.clone(),
            tls,
            timeout: cfg.timeout,
            max_body: cfg.max_response_bytes,
            sdk_app_id,
            platform: platform.to_string(),
            instance: instance.to_string(),
        })
    }

    /// The URL for `user`, with its query values redacted: for logs and errors.
    pub fn shown_url_for(&self, user: &UserId) -> String {
        crate::url::redact(&self.url_for(user))
    }

    /// The URL for `user`.
    pub fn url_for(&self, user: &UserId) -> String {
        self.url.render(
            &TemplateValues {
                sdk_app_id: self.sdk_app_id,
                user_id: user,
                platform: &self.platform,
                instance: &self.instance,
            },
            percent_encode,
        )
    }

    /// Fetch a UserSig for `user`.
    pub async fn fetch(&self, user: &UserId) -> Result<Fetched, FetchFailure> {
        let url_text = self.url_for(user);
        let url = parse_url(&url_text)
            .map_err(|m| fail(ErrorClass::Fatal, codes::INVALID_PARAMETERS, m))?;
        let token = match &self.token_file {
            None => None,
            Some(path) => {
                // Missing or empty may be a rotation in progress (the new file not yet renamed
                // into place): retry with backoff, give up after a few tries.
                let t = tokio::fs::read_to_string(path).await.map_err(|e| {
                    limited(fail(
                        ErrorClass::Busy,
                        codes::INVALID_PARAMETERS,
                        format!("reading the device token {}: {e}", path.display()),
                    ))
                })?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(limited(fail(
                        ErrorClass::Busy,
                        codes::INVALID_PARAMETERS,
                        format!("the device token file {} is empty", path.display()),
                    )));
                }
                if t.bytes().any(|b| b <= b' ' || b == 0x7F) {
                    return Err(fail(
                        ErrorClass::Fatal,
                        codes::INVALID_PARAMETERS,
                        format!(
                            "the device token file {} has spaces or control characters",
                            path.display()
                        ),
                    ));
                }
                Some(t)
            }
        };
        let exchange = self.exchange(&url, token.as_deref());
        let (status, headers, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(fail(
                    ErrorClass::Network,
                    codes::NET_CONN_TIMEOUT,
                    format!(
                        "the provisioning server did not answer within {:?}",
                        self.timeout
                    ),
                ));
            }
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let server_date = header("date")
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        if status != 200 {
            let retry_after = header("retry-after").and_then(parse_retry_after);
            let mut f = classify_status(
                status,
                &crate::url::redact(&url_text),
                self.token_file.as_ref(),
            );
            f.retry_after = retry_after;
            return Err(f);
        }
        let now = server_date.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
        let mut fetched = self.parse_body(user, &body, now)?;
        fetched.server_date = server_date;
        Ok(fetched)
    }

    async fn exchange(
        &self,
        url: &Url,
        token: Option<&str>,
    ) -> Result<(u16, Vec<(String, String)>, Vec<u8>), FetchFailure> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| io_failure(&e, "connecting to the provisioning server"))?;
        let _ = tcp.set_nodelay(true);
        let host_header = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: imlinkd/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            url.path,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = token {
            req.push_str("Authorization: Bearer ");
            req.push_str(t);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        if url.tls {
            let name = rustls_pki_types::ServerName::try_from(url.host.clone()).map_err(|_| {
                fail(
                    ErrorClass::Fatal,
                    codes::INVALID_PARAMETERS,
                    format!("{:?} is not a valid TLS server name", url.host),
                )
            })?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| io_failure(&e, "TLS with the provisioning server"))?;
            self.request(stream, req.as_bytes()).await
        } else {
            self.request(tcp, req.as_bytes()).await
        }
    }

    fn parse_body(&self, user: &UserId, body: &[u8], now: i64) -> Result<Fetched, FetchFailure> {
        parse_answer(user, self.sdk_app_id, body, now)
    }

    async fn request<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        req: &[u8],
    ) -> Result<Response, FetchFailure> {
        s.write_all(req)
            .await
            .map_err(|e| io_failure(&e, "sending the provisioning request"))?;
        s.flush()
            .await
            .map_err(|e| io_failure(&e, "sending the provisioning request"))?;
        read_response(s, self.max_body).await
    }
}

/// Status, headers and body of an HTTP answer.
pub type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// Read one HTTP/1.1 response from `s`: the head (at most 16 KiB), then a body of at most
/// `max_body` bytes (Content-Length, chunked, or until close). Every malformed answer is a
/// `busy` failure that says what was wrong; nothing here panics, whatever the bytes and
/// however they are split into reads (the fuzzer drives it over an in-memory stream).
pub async fn read_response<S: AsyncRead + Unpin>(
    mut s: S,
    max_body: usize,
) -> Result<Response, FetchFailure> {
    let malformed = |m: String| fail(ErrorClass::Busy, codes::INVALID_PARAMETERS, m);
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let (status, headers, head_len) = loop {
        let n = read_some(&mut s, &mut chunk).await?;
        if n == 0 {
            return Err(malformed(
                "the provisioning server closed the connection before answering".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut hs);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (resp.code.unwrap_or(0), headers, len);
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(malformed(
                    "the provisioning response head is too large".into(),
                ));
            }
            Err(e) => {
                return Err(malformed(format!(
                    "the provisioning response is not HTTP ({e})"
                )));
            }
        }
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut body = buf.split_off(head_len);
    let too_large = || {
        malformed(format!(
            "the provisioning response is larger than {} bytes",
            max_body
        ))
    };
    if header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        let mut d = Dechunker::new(max_body);
        let mut more: &[u8] = &body;
        loop {
            match d.feed(more) {
                Dechunk::Done => return Ok((status, headers, d.out)),
                Dechunk::TooLarge => return Err(too_large()),
                Dechunk::Bad => {
                    return Err(malformed(
                        "the provisioning response's chunked body is malformed".into(),
                    ));
                }
                Dechunk::NeedMore => {}
            }
            let n = read_some(&mut s, &mut chunk).await?;
            if n == 0 {
                return Err(malformed("the provisioning response ended mid-body".into()));
            }
            more = &chunk[..n];
        }
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| malformed("Content-Length is not a number".into()))?;
            if len > max_body {
                return Err(too_large());
            }
            while body.len() < len {
                let n = read_some(&mut s, &mut chunk).await?;
                if n == 0 {
                    return Err(malformed(format!(
                        "the provisioning response ended after {} of {len} bytes",
                        body.len()
                    )));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => loop {
            if body.len() > max_body {
                return Err(too_large());
            }
            let n = read_some(&mut s, &mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        },
    }
    Ok((status, headers, body))
}

/// Parse a 200 answer's body for `user` of app `sdk_app_id`. `now`: the server's time (its
/// `Date`, else ours), against which the expiry must be plausible.
pub fn parse_answer(
    user: &UserId,
    sdk_app_id: u64,
    body: &[u8],
    now: i64,
) -> Result<Fetched, FetchFailure> {
    let malformed = |m: &str| {
        fail(
            ErrorClass::Busy,
            codes::INVALID_PARAMETERS,
            format!("malformed provisioning response: {m}"),
        )
    };
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| malformed("not JSON"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| malformed("not a JSON object"))?;
    let user_id = obj
        .get("user_id")
        .and_then(|u| u.as_str())
        .ok_or_else(|| malformed("no \"user_id\" string"))?;
    if user_id != user.as_str() {
        return Err(fail(
            ErrorClass::Fatal,
            codes::SVR_SIG_MISMATCH_ID,
            format!(
                "the provisioning server answered for user_id {user_id:?}, not {:?}",
                user.as_str()
            ),
        ));
    }
    let sig = obj
        .get("user_sig")
        .and_then(|s| s.as_str())
        .ok_or_else(|| malformed("no \"user_sig\" string"))?;
    if let Some(app) = obj.get("sdk_app_id")
        && app.as_u64() != Some(sdk_app_id)
    {
        return Err(fail(
            ErrorClass::Fatal,
            70014,
            format!(
                "the provisioning server answered for sdk_app_id {app}, not {}",
                sdk_app_id
            ),
        ));
    }
    let expire_at = obj.get("expire_at").and_then(|e| e.as_i64());
    let (issued_at, expires_at) = match inspect(sig) {
        Err(e) => {
            return Err(fail(
                ErrorClass::Busy,
                codes::SVR_SIG_CHECK_FAILED,
                format!("malformed provisioning response: {e}"),
            ));
        }
        Ok(SigFormat::TlsSigV2 {
            identifier,
            sdk_app_id: found_app,
            issued_at,
            expires_at,
        }) => {
            if identifier != user.as_str() {
                return Err(fail(
                    ErrorClass::Fatal,
                    codes::SVR_SIG_MISMATCH_ID,
                    format!(
                        "the provisioning server issued a UserSig for {identifier:?}, not {:?}",
                        user.as_str()
                    ),
                ));
            }
            if found_app != sdk_app_id {
                return Err(fail(
                    ErrorClass::Fatal,
                    70014,
                    format!(
                        "the provisioning server issued a UserSig for SDKAppID {found_app}, not {sdk_app_id}"
                    ),
                ));
            }
            (Some(issued_at), Some(expires_at))
        }
        Ok(SigFormat::Jwt {
            issued_at,
            expires_at,
        }) => (issued_at, expires_at.or(expire_at)),
        Ok(SigFormat::Opaque) => (None, expire_at),
    };
    if let Some(e) = expires_at
        && !plausible_expiry(e, issued_at, now)
    {
        return Err(malformed(&format!(
            "the UserSig's expiry ({e}) is not plausible: it must fall between a day \
             before and ten years after the server's time ({now})"
        )));
    }
    Ok(Fetched {
        sig: UserSig::new(sig),
        user_id: user.clone(),
        issued_at,
        expires_at,
        server_date: None,
    })
}

async fn read_some<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<usize, FetchFailure> {
    match s.read(buf).await {
        Ok(n) => Ok(n),
        // A peer that closes without TLS close_notify after the body is common; the framing
        // (Content-Length/chunked) decides whether the body is whole.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(io_failure(&e, "reading the provisioning response")),
    }
}

/// What [`Dechunker::feed`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dechunk {
    Done,
    NeedMore,
    TooLarge,
    Bad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line (hex digits, maybe `;extensions`).
    Size,
    /// This many data bytes left in the current chunk.
    Data(usize),
    /// The CRLF after a chunk's data: how many of its two bytes were seen.
    DataEnd(u8),
    Done,
    Failed(Dechunk),
}

/// An incremental decoder of a `Transfer-Encoding: chunked` body: every byte is looked at
/// once, whatever the read sizes, and the arithmetic is checked (the landed decoder accepted
/// sizes up to `usize::MAX` and overflowed on `out.len() + size`).
#[derive(Debug)]
pub struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
    max: usize,
    pub out: Vec<u8>,
}

/// A chunk-size line longer than this is not one (8 hex digits and some extension).
const MAX_SIZE_LINE: usize = 256;

impl Dechunker {
    pub fn new(max: usize) -> Dechunker {
        Dechunker {
            state: ChunkState::Size,
            line: Vec::new(),
            max,
            out: Vec::new(),
        }
    }

    /// Decode what `bytes` adds. After `Done`, `out` holds the body (trailers are ignored:
    /// the request says `Connection: close`).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Dechunk {
        loop {
            match self.state {
                ChunkState::Done => return Dechunk::Done,
                ChunkState::Failed(f) => return f,
                _ if bytes.is_empty() => return Dechunk::NeedMore,
                ChunkState::Size => {
                    let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(bytes);
                        if self.line.len() > MAX_SIZE_LINE {
                            return self.fail(Dechunk::Bad);
                        }
                        return Dechunk::NeedMore;
                    };
                    // The same limit whether the line came in one read or many.
                    if self.line.len() + nl > MAX_SIZE_LINE {
                        return self.fail(Dechunk::Bad);
                    }
                    self.line.extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    let size = match parse_chunk_size(&self.line) {
                        Some(s) => s,
                        None => return self.fail(Dechunk::Bad),
                    };
                    self.line.clear();
                    if size == 0 {
                        self.state = ChunkState::Done;
                    } else if self
                        .out
                        .len()
                        .checked_add(size)
                        .is_none_or(|n| n > self.max)
                    {
                        return self.fail(Dechunk::TooLarge);
                    } else {
                        self.out.reserve(size.min(self.max));
                        self.state = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let n = left.min(bytes.len());
                    self.out.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    self.state = if n == left {
                        ChunkState::DataEnd(0)
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::DataEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if bytes[0] != want {
                        return self.fail(Dechunk::Bad);
                    }
                    bytes = &bytes[1..];
                    self.state = if seen == 0 {
                        ChunkState::DataEnd(1)
                    } else {
                        ChunkState::Size
                    };
                }
            }
        }
    }

    fn fail(&mut self, why: Dechunk) -> Dechunk {
        self.state = ChunkState::Failed(why);
        why
    }
}

/// A chunk-size line: 1 to 8 hex digits (no sign, no `0x`), maybe `;extensions`, ending in
/// CR (the LF was already cut off).
fn parse_chunk_size(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r")?;
    let digits = match line.iter().position(|b| *b == b';') {
        Some(i) => &line[..i],
        None => line,
    };
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    usize::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// Decode a whole chunked body in one go (what [`Dechunker`] does with one `feed`).
pub fn dechunk(raw: &[u8], max: usize) -> (Dechunk, Vec<u8>) {
    let mut d = Dechunker::new(max);
    let r = d.feed(raw);
    (r, d.out)
}

/// Expiries from outside (`expire_at`, a JWT's `exp`/`iat`, TLS-sig's time + expire) are
/// believed only within a day before and ten years after the server's `now`, and with the
/// issue time not after the expiry: anything else is a malformed answer, never arithmetic
/// on a number like `i64::MAX`.
pub fn plausible_expiry(expires_at: i64, issued_at: Option<i64>, now: i64) -> bool {
    const DAY: i64 = 86_400;
    const TEN_YEARS: i64 = 10 * 366 * DAY;
    let window = now.saturating_sub(DAY)..=now.saturating_add(TEN_YEARS);
    window.contains(&expires_at) && issued_at.is_none_or(|i| i <= expires_at)
}

/// `Retry-After`: delay-seconds or an HTTP date. In milliseconds, capped at one hour.
pub fn parse_retry_after(v: &str) -> Option<u64> {
    let v = v.trim();
    let secs = match v.parse::<u64>() {
        Ok(s) => s,
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(SystemTime::now())
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }
    };
    Some(secs.min(3600) * 1000)
}

fn classify_status(status: u16, url: &str, token_file: Option<&PathBuf>) -> FetchFailure {
    let token = token_file
        .map(|p| format!("the device token in {}", p.display()))
        .unwrap_or_else(|| "the device's credentials".into());
    let code = u32::from(status);
    match status {
        401 | 403 => fail(
            ErrorClass::Fatal,
            code,
            format!("the provisioning server refused this device (HTTP {status}): check {token}"),
        ),
        404 | 410 => fail(
            ErrorClass::Fatal,
            code,
            format!(
                "the provisioning server has no such endpoint or user (HTTP {status} for {url}): check provisioning.url and user_id"
            ),
        ),
        // 421: a load balancer sent us to a node that is not the right one (for now).
        408 | 421 | 425 | 429 | 500..=599 => fail(
            ErrorClass::Busy,
            code,
            format!("the provisioning server is unavailable for now (HTTP {status}); retrying"),
        ),
        300..=399 => fail(
            ErrorClass::Busy,
            code,
            format!(
                "the provisioning server redirected (HTTP {status}); redirects are not followed: configure the final URL (a captive portal can cause this too)"
            ),
        ),
        // Any other 4xx: maybe a proxy's passing mood, maybe a wrong URL. A few tries, then
        // stop.
        400..=499 => limited(fail(
            ErrorClass::Busy,
            code,
            format!(
                "the provisioning server rejected the request (HTTP {status} for {url}): check provisioning.url"
            ),
        )),
        _ => fail(
            ErrorClass::Busy,
            code,
            format!("unexpected provisioning answer HTTP {status}; retrying"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_values_are_percent_encoded() {
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(percent_encode("kiosk-0042_x.y~"), "kiosk-0042_x.y~");
    }

    #[test]
    fn chunked_bodies_decode_and_are_capped() {
        let (r, out) = dechunk(b"3\r\nabc\r\n2;ext\r\nde\r\n0\r\n\r\n", 100);
        assert_eq!((r, out.as_slice()), (Dechunk::Done, &b"abcde"[..]));
        assert_eq!(dechunk(b"3\r\nab", 100).0, Dechunk::NeedMore);
        assert_eq!(dechunk(b"zz\r\n", 100).0, Dechunk::Bad);
        assert_eq!(dechunk(b"ff\r\n", 100).0, Dechunk::TooLarge);
        assert_eq!(dechunk(b"1\r\nab\r\n", 100).0, Dechunk::Bad);
        // No sign, no 0x, at most 8 digits, no bare LF.
        for bad in [
            &b"+1\r\na\r\n"[..],
            b"0x1\r\n",
            b"123456789\r\n",
            b"1\n",
            b" \r\n",
        ] {
            assert_eq!(dechunk(bad, 100).0, Dechunk::Bad, "{bad:?}");
        }
        // A size line that never ends.
        assert_eq!(dechunk(&[b'1'; 300], 100).0, Dechunk::Bad);
    }

    /// The landed decoder panicked (debug and release) on this answer: a size of
    /// `usize::MAX` overflowed `out.len() + size`.
    #[test]
    fn a_huge_chunk_size_is_refused_not_a_panic() {
        let raw = b"1\r\n{\r\nffffffffffffffff\r\nxxxx";
        assert_eq!(dechunk(raw, 65_536).0, Dechunk::Bad);
        let raw = b"1\r\n{\r\nffffffff\r\nxxxx";
        assert_eq!(dechunk(raw, 65_536).0, Dechunk::TooLarge);
    }

    #[test]
    fn any_split_of_a_chunked_body_decodes_the_same() {
        let raw = b"3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n1\r\nz\r\n0\r\n\r\n";
        let (whole, want) = dechunk(raw, 1000);
        assert_eq!(whole, Dechunk::Done);
        for step in 1..raw.len() {
            let mut d = Dechunker::new(1000);
            let mut last = Dechunk::NeedMore;
            for part in raw.chunks(step) {
                last = d.feed(part);
            }
            assert_eq!((last, &d.out), (Dechunk::Done, &want), "split every {step}");
        }
    }

    #[test]
    fn implausible_expiries_are_refused() {
        let now = 1_800_000_000;
        assert!(plausible_expiry(now + 3600, Some(now), now));
        assert!(
            plausible_expiry(now - 3600, None, now),
            "expired, but plausibly"
        );
        assert!(!plausible_expiry(i64::MAX, None, now));
        assert!(!plausible_expiry(i64::MIN, None, now));
        assert!(!plausible_expiry(now + 11 * 366 * 86_400, None, now));
        assert!(!plausible_expiry(now - 2 * 86_400, None, now));
        assert!(
            !plausible_expiry(now + 60, Some(now + 120), now),
            "issued after expiry"
        );
        assert!(
            plausible_expiry(i64::MAX - 1, None, i64::MAX),
            "no overflow at the edge"
        );
    }

    #[test]
    fn statuses_are_classified_as_the_brief_says() {
        for s in [401u16, 403, 404] {
            assert_eq!(classify_status(s, "u", None).class, ErrorClass::Fatal);
        }
        for s in [429u16, 500, 502, 503, 504, 408] {
            assert_eq!(classify_status(s, "u", None).class, ErrorClass::Busy);
        }
        assert_eq!(classify_status(302, "u", None).class, ErrorClass::Busy);
        let odd = classify_status(400, "u", None);
        assert_eq!(
            (odd.class, odd.give_up_after),
            (ErrorClass::Busy, Some(GIVE_UP_AFTER))
        );
        assert_eq!(classify_status(421, "u", None).class, ErrorClass::Busy);
        assert_eq!(classify_status(421, "u", None).give_up_after, None);
        assert_eq!(classify_status(403, "u", None).code, 403);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(7_000));
        assert_eq!(parse_retry_after("999999"), Some(3_600_000));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let ms = parse_retry_after(&later).unwrap();
        assert!((110_000..=120_000).contains(&ms), "{ms}");
        assert_eq!(parse_retry_after("soon"), None);
    }
}
