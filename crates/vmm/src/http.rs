//! A minimal HTTP/1.1 client for talking to guests: the readiness probe and tests. One request
//! per connection (`Connection: close`), bodies read to EOF — exactly what the reference guest
//! speaks, with no dependency on a full HTTP stack in the driver.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, sending or receiving failed.
    #[error("HTTP {method} http://{addr}{path}: {source}")]
    Io {
        method: String,
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The request did not finish in time.
    #[error("HTTP {method} http://{addr}{path}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        addr: SocketAddr,
        path: String,
        timeout: Duration,
    },
    /// The answer was not HTTP.
    #[error("HTTP {method} http://{addr}{path}: malformed response {head:?}")]
    Malformed {
        method: String,
        addr: SocketAddr,
        path: String,
        head: String,
    },
}

/// Sends one request and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let io = |source| HttpError::Io {
        method: method.to_owned(),
        addr,
        path: path.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(body).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout {
            method: method.to_owned(),
            addr,
            path: path.to_owned(),
            timeout,
        })??;
    parse(&raw).ok_or_else(|| HttpError::Malformed {
        method: method.to_owned(),
        addr,
        path: path.to_owned(),
        head: String::from_utf8_lossy(&raw[..raw.len().min(80)]).into_owned(),
    })
}

fn parse(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let mut body = raw[split + 4..].to_vec();
    let length = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    if let Some(len) = length {
        if body.len() < len {
            return None;
        }
        body.truncate(len);
    }
    Some(HttpResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let r = parse(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"no");
    }

    #[test]
    fn refuses_truncated_and_non_http() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").is_none());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_none());
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_none());
    }
}
