//! Just enough HTTP/1.1 to be scraped: GET /metrics answers with the body `render`
//! gives for the request's Accept header (shared, not copied, between concurrent
//! scrapes), anything else gets a short 404. One request per connection.
//!
//! Nothing a client does can make the endpoint take what the tracer needs: at most
//! `Limits::max_connections` exchanges at once, derived from the fd limit so that
//! most fds stay the tracer's; a connection beyond them is closed as soon as it is
//! accepted (waiting in the accept queue would leave a scraper behind a thousand
//! idle peers); each exchange gets its request head within `head_timeout` and is
//! over within `exchange_timeout`, however slowly the peer sends or reads; a request
//! head holds at most `MAX_HEAD` bytes and the answer a reference to a body it does
//! not own. A failed accept (EMFILE, ENFILE, ENOBUFS) never ends the server: it backs
//! off, counts it and says so on stderr, and the session goes on counting.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Request heads larger than this are refused: a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// After a failed accept, the pause before the next: fds or memory are short, and
/// retrying at once would spin on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A repeated refusal or failure is reported at most this often (with its count).
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What one client may hold, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Exchanges in flight at once; the next connection is closed at once.
    pub max_connections: usize,
    /// A client that has not sent its whole request head by then is dropped.
    pub head_timeout: Duration,
    /// A whole exchange (request and answer) ends by then, however slowly the
    /// client reads.
    pub exchange_timeout: Duration,
}

impl Limits {
    /// For a process allowed `nofile` open fds: a sixteenth of them, between 4 and
    /// 64 (a few scrapers and a person with curl need far fewer), so the tracer keeps
    /// at least fifteen sixteenths for its maps, recordings and /proc scans.
    pub fn for_nofile(nofile: u64) -> Limits {
        let max_connections = usize::try_from(nofile / 16).unwrap_or(usize::MAX).clamp(4, 64);
        Limits { max_connections, head_timeout: Duration::from_secs(2), exchange_timeout: Duration::from_secs(5) }
    }
}

/// What the endpoint refused or failed at, for /metrics and the tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Exchanges in flight now.
    pub active: AtomicUsize,
    /// Connections closed at once because `max_connections` were in flight.
    pub refused: AtomicU64,
    /// Exchanges cut off at a deadline.
    pub timed_out: AtomicU64,
    /// accept() failures (EMFILE and the like), each followed by a back-off.
    pub accept_errors: AtomicU64,
}

/// One stderr line at the first occurrence of something, then at most one per
/// `REPORT_EVERY` with the count since the last line.
struct Notice {
    last: Option<Instant>,
    unreported: u64,
}

impl Notice {
    fn new() -> Notice {
        Notice { last: None, unreported: 0 }
    }

    fn happened(&mut self, line: impl FnOnce(u64) -> String) {
        self.unreported += 1;
        if self.last.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return;
        }
        eprintln!("backlog-trace: {}", line(self.unreported));
        self.last = Some(Instant::now());
        self.unreported = 0;
    }
}

/// (content type, body) of /metrics for the request's Accept header, if it sent one.
pub type Render = Arc<dyn Fn(Option<&str>) -> (&'static str, Bytes) + Send + Sync>;

/// Serves forever on `listener`; `render` gives (content type, body) of /metrics.
pub async fn serve(listener: TcpListener, render: Render, limits: Limits, stats: Arc<Stats>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusing = Notice::new();
    let mut failing = Notice::new();
    let cap = limits.max_connections;
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) if peer_gone(&e) => continue,
            Err(e) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                failing.happened(|n| {
                    format!("metrics endpoint: accept failed ({e}; {n} time(s)): backing off, tracing goes on")
                });
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(conn);
            stats.refused.fetch_add(1, Ordering::Relaxed);
            refusing.happened(|n| {
                format!(
                    "metrics endpoint: {cap} connections in flight, closing new ones at once \
                     ({n} refused): tracing goes on"
                )
            });
            continue;
        };
        let (render, stats) = (render.clone(), stats.clone());
        stats.active.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let exchange = answer(conn, render, limits.head_timeout);
            if matches!(tokio::time::timeout(limits.exchange_timeout, exchange).await, Err(_) | Ok(Err(Late))) {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}

/// Accept errors about the one connection being accepted (the peer reset it before
/// we got to it): nothing to back off from.
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM))
}

/// An exchange that missed its head deadline.
struct Late;

async fn answer(conn: TcpStream, render: Render, head_timeout: Duration) -> Result<(), Late> {
    let mut conn = conn;
    let head = match tokio::time::timeout(head_timeout, read_head(&mut conn)).await {
        Err(_) => return Err(Late),
        Ok(Ok(Some(head))) => head,
        Ok(_) => return Ok(()),
    };
    let _ = respond(&mut conn, &head, render).await;
    Ok(())
}

/// The request head, or None if the peer closed or sent too much.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(head))
}

/// The values of every `name` header field in a request head (case-insensitive name),
/// joined by ", " as RFC 9110 5.3 allows for list-valued fields; None if there is none.
fn header(head: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let values: Vec<&str> = text
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

async fn respond(conn: &mut TcpStream, head: &[u8], render: Render) -> std::io::Result<()> {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let (ctype, body) = render(header(head, "accept").as_deref());
            ("200 OK", ctype, body)
        }
        (b"GET", _) => ("404 Not Found", "text/plain", Bytes::from_static(b"backlog-trace: metrics are at /metrics\n")),
        _ => ("405 Method Not Allowed", "text/plain", Bytes::from_static(b"backlog-trace: only GET is served\n")),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nVary: Accept\r\nConnection: \
         close\r\n\r\n",
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
        let render: Render = Arc::new(|accept| {
            let body = format!("up 1\naccept {}\n", accept.unwrap_or("-"));
            ("text/plain", Bytes::from(body))
        });
        tokio::spawn(serve(listener, render, Limits::for_nofile(1024), Arc::default()));
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nup 1\naccept -\n"), "{ok}");
        assert!(ok.contains("Content-Length: 14\r\n") && ok.contains("Vary: Accept\r\n"), "{ok}");
        // Every Accept field reaches `render`, whatever the name's case.
        let asked = get(addr, "GET /metrics HTTP/1.1\r\nACCEPT: a/b\r\nX: y\r\naccept:  c/d;q=0.5 \r\n\r\n").await;
        assert!(asked.ends_with("\r\n\r\nup 1\naccept a/b, c/d;q=0.5\n"), "{asked}");
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        // An oversized head is dropped without an answer, and the server lives on.
        let big = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(get(addr, &big).await, "");
        assert!(get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").await.contains("up 1"));
    }

    fn up() -> Render {
        Arc::new(|_| ("text/plain", Bytes::from_static(b"up 1\n")))
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads until EOF or reset; what came, and how long it took.
    async fn read_all(c: &mut TcpStream) -> (String, Duration) {
        let t = Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await.expect("closed");
        (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
    }

    #[test]
    fn the_cap_is_a_sixteenth_of_the_fds_between_4_and_64() {
        assert_eq!(Limits::for_nofile(1024).max_connections, 64);
        assert_eq!(Limits::for_nofile(1 << 20).max_connections, 64);
        assert_eq!(Limits::for_nofile(256).max_connections, 16);
        assert_eq!(Limits::for_nofile(20).max_connections, 4);
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let limits = Limits { max_connections: 2, ..Limits::for_nofile(1024) };
        tokio::spawn(serve(listener, up(), limits, stats.clone()));
        let idle = [TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
        until("two exchanges in flight", || stats.active.load(Ordering::Relaxed) == 2).await;
        // Third and fourth: closed unanswered, long before any deadline.
        for n in 1..=2 {
            let mut extra = TcpStream::connect(addr).await.unwrap();
            let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
            let (got, took) = read_all(&mut extra).await;
            assert_eq!(got, "");
            assert!(took < Duration::from_secs(1), "closed after {took:?}");
            assert_eq!(stats.refused.load(Ordering::Relaxed), n);
        }
        // A slot freed is a slot served.
        drop(idle);
        until("the idle exchanges to end", || stats.active.load(Ordering::Relaxed) == 0).await;
        let ok = get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.ends_with("up 1\n"), "{ok}");
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_client_that_never_asks_is_cut_off_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let limits = Limits {
            max_connections: 1,
            head_timeout: Duration::from_millis(300),
            exchange_timeout: Duration::from_secs(5),
        };
        tokio::spawn(serve(listener, up(), limits, stats.clone()));
        // Sends nothing at all.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let (got, took) = read_all(&mut silent).await;
        assert_eq!(got, "");
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "cut off after {took:?}");
        // Sends a byte at a time, never finishing its head.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        let dribble = async {
            while slow.write_all(b"G").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), dribble).await;
        assert!(t.elapsed() < Duration::from_secs(2), "dribbling client held {:?}", t.elapsed());
        until("the slot to be free", || stats.active.load(Ordering::Relaxed) == 0).await;
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 2);
        // The one slot serves the next scrape.
        assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await.ends_with("up 1\n"));
    }
}
