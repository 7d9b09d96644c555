//! A deliberately small HTTP/1.1 server: one request per connection, `Connection: close`.
//!
//! Small enough to read in one sitting, and in full control of the bytes it writes, which is
//! what the provisioning fault switches need (truncated bodies, chunked bodies, slowness).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::state::Shared;

pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_BODY: usize = 64 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

/// How the body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    ContentLength,
    Chunked,
    /// Promise the whole body in Content-Length, send half of it, close.
    Truncated,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub framing: Framing,
    /// Seconds to add to the `Date` header (the provisioning server's skewed clock).
    pub date_offset: i64,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
            framing: Framing::ContentLength,
            date_offset: 0,
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn with_header(mut self, k: &str, v: impl Into<String>) -> Response {
        self.headers.push((k.into(), v.into()));
        self
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[derive(Debug)]
pub enum ReadError {
    Closed,
    TooLarge(u16),
    Bad(&'static str),
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let pairs = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_string(), pairs)
}

pub async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await.map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let (path, query) = split_target(req.path.unwrap_or("/"));
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.trim().parse::<usize>())
                    .transpose()
                    .map_err(|_| ReadError::Bad("Content-Length is not a number"))?
                    .unwrap_or(0);
                if len > MAX_BODY {
                    return Err(ReadError::TooLarge(413));
                }
                let mut body = buf[head_len..].to_vec();
                while body.len() < len {
                    let n = s.read(&mut chunk).await.map_err(|_| ReadError::Closed)?;
                    if n == 0 {
                        return Err(ReadError::Closed);
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(len);
                return Ok(Request {
                    method,
                    path,
                    query,
                    headers,
                    body,
                });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(ReadError::TooLarge(431));
                }
            }
            Err(_) => return Err(ReadError::Bad("not an HTTP/1.x request")),
        }
    }
}

pub async fn write_response<S: AsyncWrite + Unpin>(s: &mut S, r: &Response) -> std::io::Result<()> {
    let date = if r.date_offset >= 0 {
        SystemTime::now() + Duration::from_secs(r.date_offset as u64)
    } else {
        SystemTime::now() - Duration::from_secs(r.date_offset.unsigned_abs())
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nDate: {}\r\nConnection: close\r\nServer: imlink-sandbox\r\n",
        r.status,
        reason_phrase(r.status),
        httpdate::fmt_http_date(date)
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match r.framing {
        Framing::ContentLength | Framing::Truncated => {
            head.push_str(&format!("Content-Length: {}\r\n\r\n", r.body.len()));
            s.write_all(head.as_bytes()).await?;
            let body = if r.framing == Framing::Truncated {
                &r.body[..r.body.len() / 2]
            } else {
                &r.body[..]
            };
            s.write_all(body).await?;
        }
        Framing::Chunked => {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            s.write_all(head.as_bytes()).await?;
            for piece in r.body.chunks(7) {
                s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                s.write_all(piece).await?;
                s.write_all(b"\r\n").await?;
            }
            s.write_all(b"0\r\n\r\n").await?;
        }
    }
    s.flush().await?;
    s.shutdown().await
}

pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Serve one HTTP listener (TLS when an acceptor is given) with `handler`.
pub fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Handler,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            let tls = tls.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => match timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => one_exchange(&shared, stream, peer, &handler).await,
                        _ => shared.update(|st| st.counters.tls_handshake_failures += 1),
                    },
                    None => one_exchange(&shared, tcp, peer, &handler).await,
                }
            });
        }
    })
}

async fn one_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
    peer: SocketAddr,
    handler: &Handler,
) {
    let response = match timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(req)) => handler(req).await,
        Ok(Err(ReadError::Closed)) | Err(_) => return,
        Ok(Err(ReadError::TooLarge(status))) => {
            shared.update(|st| st.counters.http_bad_requests += 1);
            Response::error(status, "request too large")
        }
        Ok(Err(ReadError::Bad(what))) => {
            tracing::debug!(%peer, what, "bad HTTP request");
            shared.update(|st| st.counters.http_bad_requests += 1);
            Response::error(400, what)
        }
    };
    let _ = timeout(READ_TIMEOUT, write_response(&mut stream, &response)).await;
}
