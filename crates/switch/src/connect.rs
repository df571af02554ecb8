//! How the switch opens a connection to an instance: its own SYN retransmission.
//!
//! The kernel resends an unanswered SYN only after a second. Right after a live migration the
//! first SYN to a moved instance can be lost (sent toward the old host in the instant before
//! the new one announces the instance), and a client would wait that second. So each connect
//! attempt has a short deadline and is made again — a fresh SYN, which by then finds the
//! instance where it is — with longer deadlines after it (150 ms, 1 s, 3 s). A refused
//! connection is an answer and is not tried again here (the proxy picks another instance).
//!
//! Connections also use linear retransmission timeouts while they carry little data
//! (`TCP_THIN_LINEAR_TIMEOUTS`), so a segment lost in a move's short gap is resent soon
//! instead of after exponentially growing waits.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Deadlines of the successive connect attempts to one address.
pub const ATTEMPTS: [Duration; 3] = [
    Duration::from_millis(150),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// Connects to `addr` with [`ATTEMPTS`].
pub async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    for limit in ATTEMPTS {
        if let Ok(r) = tokio::time::timeout(limit, TcpStream::connect(addr)).await {
            let stream = r?;
            let _ = stream.set_nodelay(true);
            thin_linear_timeouts(&stream);
            return Ok(stream);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{addr} did not answer a connection attempt within 4.15 s"),
    ))
}

/// Sets `TCP_THIN_LINEAR_TIMEOUTS` (best effort: an older kernel may not have it).
fn thin_linear_timeouts(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_tcp_thin_linear_timeouts(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_and_reports_a_refusal_at_once() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert!(connect(addr).await.is_ok());
        drop(l);
        let t = std::time::Instant::now();
        let err = connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(t.elapsed() < Duration::from_millis(150));
    }
}
