//! Just enough HTTP/1.1 to be scraped: GET /metrics answers with the body `render`
//! gives (shared, not copied, between concurrent scrapes), anything else gets a
//! short 404. One request per connection.
//!
//! What a client can make the tracer hold is bounded: at most `MAX_CONNECTIONS`
//! exchanges at once (more wait in the kernel's accept queue), each dropped after
//! `EXCHANGE_TIMEOUT` however slowly it reads, each holding a request head of at most
//! `MAX_HEAD` and a reference to a body it does not own.
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Request heads larger than this are refused: a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// A client that sends nothing, or reads the answer too slowly, is dropped after this.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Exchanges in flight at once; a few scrapers and a person with curl need far fewer.
const MAX_CONNECTIONS: usize = 16;

pub type Render = Arc<dyn Fn() -> (&'static str, Bytes) + Send + Sync>;

/// Serves forever on `listener`; `render` gives (content type, body) of /metrics.
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        // Accept errors (EMFILE and the like) are transient: back off, keep serving.
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, answer(conn, render)).await;
            drop(slot);
        });
    }
}

async fn answer(mut conn: TcpStream, render: Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let (ctype, body) = render();
            ("200 OK", ctype, body)
        }
        (b"GET", _) => ("404 Not Found", "text/plain", Bytes::from_static(b"backlog-trace: metrics are at /metrics\n")),
        _ => ("405 Method Not Allowed", "text/plain", Bytes::from_static(b"backlog-trace: only GET is served\n")),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&body).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // The server may close before reading everything (oversized heads): a
        // reset then just means no answer.
        let _ = c.write_all(request.as_bytes()).await;
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| ("text/plain", Bytes::from_static(b"up 1\n")));
        tokio::spawn(serve(listener, render));
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nup 1\n"), "{ok}");
        assert!(ok.contains("Content-Length: 5\r\n"));
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        // An oversized head is dropped without an answer, and the server lives on.
        let big = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(get(addr, &big).await, "");
        assert!(get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").await.contains("up 1"));
    }
}
