//! A recording HTTP/1.1 proxy: sits between a client (a worker) and its peer (the Docker
//! socket, the Prefect API), forwards every byte unchanged, and records each request's method,
//! target and body. Keep-alive connections are followed request by request (Content-Length or
//! chunked bodies); after an `Upgrade` (websockets) the connection is piped without parsing.
//! Each request also gets the time it arrived and the time its answer began, so a test can
//! count requests in flight at once (HTTP/1.1 clients here never pipeline: one request per
//! connection is outstanding, and the next bytes from the peer are its answer).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names (lower-cased) and values, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the whole request had arrived.
    pub received: Instant,
    /// When the first bytes of its answer came back; `None` while none have.
    pub answered: Option<Instant>,
}

impl Recorded {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// One query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// Every query parameter, percent-decoded, by name (a repeated name keeps its last value).
    pub fn query_map(&self) -> std::collections::BTreeMap<String, String> {
        let query = self.target.split_once('?').map_or("", |(_, q)| q);
        url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// One header's value (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Requests the proxy holds back before forwarding, and for how long: a slow peer for them.
#[derive(Clone, Copy)]
pub struct Hold {
    pub which: fn(&Recorded) -> bool,
    pub delay: std::time::Duration,
}

/// Where the proxy listens and where it forwards.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

trait Conn: Read + Write + Send + 'static {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Conn>>;
    fn shutdown_write(&self);
}

impl Conn for UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Conn for TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

fn connect(to: &Endpoint) -> std::io::Result<Box<dyn Conn>> {
    Ok(match to {
        Endpoint::Unix(p) => Box::new(UnixStream::connect(p)?),
        Endpoint::Tcp(a) => Box::new(TcpStream::connect(a)?),
    })
}

/// A running recorder; stops accepting when dropped.
pub struct Recorder {
    /// What clients connect to: a socket path or `127.0.0.1:PORT`.
    pub listen: Endpoint,
    records: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    /// Listens on a new unix socket at `path`, forwarding to `upstream`.
    pub fn unix(path: &Path, upstream: Endpoint) -> Self {
        Self::unix_holding(path, upstream, None)
    }

    /// As [`Recorder::unix`], holding back the requests `hold` picks.
    pub fn unix_holding(path: &Path, upstream: Endpoint, hold: Option<Hold>) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind recorder socket");
        Self::serve_all(Endpoint::Unix(path.to_owned()), upstream, hold, move || {
            listener
                .accept()
                .ok()
                .map(|(c, _)| Box::new(c) as Box<dyn Conn>)
        })
    }

    /// Listens on 127.0.0.1 (a free port), forwarding to `upstream`.
    pub fn tcp(upstream: Endpoint) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind recorder port");
        let addr = listener.local_addr().unwrap().to_string();
        Self::serve_all(Endpoint::Tcp(addr), upstream, None, move || {
            listener
                .accept()
                .ok()
                .map(|(c, _)| Box::new(c) as Box<dyn Conn>)
        })
    }

    /// Accepts clients (`accept` yields the next one, `None` for a failed accept) on a thread
    /// until the recorder is dropped, serving each through `upstream`.
    fn serve_all(
        listen: Endpoint,
        upstream: Endpoint,
        hold: Option<Hold>,
        mut accept: impl FnMut() -> Option<Box<dyn Conn>> + Send + 'static,
    ) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (Arc::clone(&records), Arc::clone(&stop));
        std::thread::spawn(move || {
            loop {
                let client = accept();
                if s.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(client) = client {
                    serve(client, &upstream, hold, &r);
                }
            }
        });
        Self {
            listen,
            records,
            stop,
        }
    }

    /// Everything recorded so far, in arrival order (per connection; connections interleave).
    pub fn records(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    /// The most requests matching `which` that were ever outstanding at the same moment (a
    /// request is outstanding from its arrival until its answer began, or until now).
    pub fn max_in_flight(&self, which: impl Fn(&Recorded) -> bool) -> usize {
        let now = Instant::now();
        // +1 at arrival, -1 at answer; at equal times answers first (the slot was freed).
        let mut edges: Vec<(Instant, i32)> = Vec::new();
        for r in self.records().iter().filter(|r| which(r)) {
            edges.push((r.received, 1));
            edges.push((r.answered.unwrap_or(now), -1));
        }
        edges.sort();
        let (mut current, mut most) = (0i32, 0i32);
        for (_, step) in edges {
            current += step;
            most = most.max(current);
        }
        usize::try_from(most).unwrap_or(0)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = match &self.listen {
            Endpoint::Unix(p) => UnixStream::connect(p).map(drop),
            Endpoint::Tcp(a) => TcpStream::connect(a).map(drop),
        };
    }
}

fn serve(
    client: Box<dyn Conn>,
    upstream: &Endpoint,
    hold: Option<Hold>,
    records: &Arc<Mutex<Vec<Recorded>>>,
) {
    let Ok(server) = connect(upstream) else {
        return;
    };
    let (Ok(mut client_read), Ok(mut server_read)) =
        (client.try_clone_box(), server.try_clone_box())
    else {
        return;
    };
    let mut client_write = client;
    let mut server_write = server;
    // Indices (in `records`) of this connection's requests not answered yet.
    let outstanding = Arc::new(Mutex::new(VecDeque::<usize>::new()));
    let (answers, answered) = (Arc::clone(records), Arc::clone(&outstanding));
    std::thread::spawn(move || {
        let mut buf = [0u8; 32 * 1024];
        while let Ok(n) = server_read.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Taken in the client thread's order (records, then outstanding): no deadlock.
            let mut all = answers.lock().unwrap();
            let next = answered.lock().unwrap().pop_front();
            if let Some(i) = next {
                all[i].answered = Some(Instant::now());
            }
            drop(all);
            if client_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        client_write.shutdown_write();
    });
    let records = Arc::clone(records);
    std::thread::spawn(move || {
        let mut parser = Parser::default();
        let mut buf = [0u8; 32 * 1024];
        while let Ok(n) = client_read.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Recorded before it is forwarded: a request the client got an answer to is
            // already in `records`, so a test may read them as soon as the client is done.
            let mut held = false;
            for r in parser.feed(&buf[..n]) {
                held |= hold.is_some_and(|h| (h.which)(&r));
                let mut all = records.lock().unwrap();
                all.push(r);
                outstanding.lock().unwrap().push_back(all.len() - 1);
            }
            if let Some(h) = hold.filter(|_| held) {
                std::thread::sleep(h.delay);
            }
            if server_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        server_write.shutdown_write();
    });
}

/// Splits a client byte stream into requests.
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
    piping: bool,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Recorded> {
        if self.piping {
            return Vec::new();
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let Some(head_end) = find(&self.buf, b"\r\n\r\n") else {
                return out;
            };
            let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next().unwrap_or_default().split(' ');
            let method = first.next().unwrap_or_default().to_owned();
            let target = first.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let body_start = head_end + 4;
            let (body, consumed) =
                if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                    match dechunk(&self.buf[body_start..]) {
                        Some((body, used)) => (body, body_start + used),
                        None => return out,
                    }
                } else {
                    let len: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if self.buf.len() < body_start + len {
                        return out;
                    }
                    (
                        self.buf[body_start..body_start + len].to_vec(),
                        body_start + len,
                    )
                };
            let upgrade = header("upgrade").is_some();
            out.push(Recorded {
                method,
                target,
                headers,
                body,
                received: Instant::now(),
                answered: None,
            });
            self.buf.drain(..consumed);
            if upgrade {
                self.piping = true;
                self.buf.clear();
                return out;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A complete chunked body → (body, bytes used); `None` while incomplete.
fn dechunk(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&data[at..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[at..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailers end with an empty line.
            let end = at + find(&data[at..], b"\r\n")?;
            return Some((body, end + 2));
        }
        if data.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}
