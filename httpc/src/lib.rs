//! The workspace's one HTTP/1.1 client: `GET` or `POST` one path on one address, with one
//! deadline for the whole exchange and a cap on the body; the answer is status and body.
//!
//! hyper's client connection (`hyper::client::conn::http1`) does the protocol: request
//! framing, the status line and headers (at most [`MAX_HEADERS`] of them, [`MAX_HEAD`] bytes in
//! all), bodies sized, chunked or delimited by close. What this crate adds is what every caller
//! in the workspace needs around it:
//!
//! - a blocking call: the daemon reads a sidecar's admin API from a short-lived thread inside
//!   the pod's network namespace (the socket must be made on that thread), and the tests and
//!   the benchmark harness are plain threads. Each call runs on its own current-thread tokio
//!   runtime, so it shares nothing with, and never blocks, a runtime elsewhere in the process;
//! - a deadline for the whole exchange, not per read, so a peer that trickles bytes cannot hold
//!   a caller past it;
//! - a body limit checked as the body arrives, so a peer cannot make the caller buffer without
//!   bound (the daemon's peer is a pod's sidecar: outside input);
//! - errors that name the URL.
//!
//! Not for measured load: the benchmark's request loops keep their own hand-rolled client
//! (meshlane-bench's `workload/http1.rs`), since their per-request latency is the measurement.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Body, Bytes, Incoming},
    client::conn::http1,
    header, Method, Request,
};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// The default body limit, for callers that do not set one: a full Envoy config dump is a few
/// MB, and the tests' largest download is nginx's 16 MiB body.
pub const DEFAULT_MAX_BODY: usize = 64 << 20;
/// Header lines accepted in one response (hyper's default, stated here as the limit it is).
pub const MAX_HEADERS: usize = 100;
/// Bytes of status line and headers accepted in one response.
pub const MAX_HEAD: usize = 64 << 10;

/// A response: status code and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced), for logs, assertions and text formats.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What failed, for which URL.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {kind}")]
pub struct Error {
    /// `http://<addr><path>`.
    pub url: String,
    pub kind: Kind,
}

/// What went wrong, without the URL (for a caller whose own error already names the endpoint).
#[derive(Debug, thiserror::Error)]
pub enum Kind {
    /// No connection (refused, unreachable, or not within the deadline).
    #[error("connect: {0}")]
    Connect(io::Error),
    /// Connected, but the whole answer did not arrive within the deadline.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The body grew past the caller's limit (stated by `Content-Length` or as it arrived).
    #[error("body over {0} bytes")]
    TooLarge(usize),
    /// A malformed request or answer, or the connection failing mid-exchange.
    #[error("{0}")]
    Http(String),
    /// The local I/O runtime could not be set up.
    #[error("{0}")]
    Io(io::Error),
}

/// How requests are made: deadline and body limit. Cheap to copy; each call is independent.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    timeout: Duration,
    max_body: usize,
}

impl Client {
    /// A client whose calls each finish within `timeout` (connect included), with the
    /// [`DEFAULT_MAX_BODY`] limit.
    pub fn new(timeout: Duration) -> Client {
        Client {
            timeout,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    /// The largest body accepted; a longer one is [`Kind::TooLarge`].
    pub fn max_body(self, max_body: usize) -> Client {
        Client { max_body, ..self }
    }

    /// `GET path` on a fresh connection to `addr` (`Connection: close`).
    pub fn get(&self, addr: impl Into<SocketAddr>, path: &str) -> Result<Response, Error> {
        self.send(addr.into(), Method::GET, path, Bytes::new())
    }

    /// `POST path` with `body` on a fresh connection to `addr` (`Connection: close`).
    pub fn post(
        &self,
        addr: impl Into<SocketAddr>,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response, Error> {
        self.send(addr.into(), Method::POST, path, body.into())
    }

    fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response, Error> {
        let url = format!("http://{addr}{path}");
        let err = |kind| Error {
            url: url.clone(),
            kind,
        };
        let (timeout, this) = (self.timeout, *self);
        block_on(|| {
            async {
                let deadline = Instant::now() + timeout;
                // A connect that never completes (a SYN dropped) is a failure to connect, as
                // it was with connect_timeout: callers tell "not there" from "answered badly".
                let tcp =
                    match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(tcp)) => tcp,
                        Ok(Err(e)) => return Err(err(Kind::Connect(e))),
                        Err(_) => {
                            let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                            return Err(err(Kind::Connect(e)));
                        }
                    };
                // One request, written at once: no Nagle wait for the peer's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let request = request(&addr.to_string(), method, path, body, true)
                    .map_err(|e| err(Kind::Http(e)))?;
                tokio::time::timeout_at(deadline, this.exchange(TokioIo::new(tcp), request))
                    .await
                    .unwrap_or(Err(Kind::Timeout(timeout)))
                    .map_err(err)
            }
        })
        .map_err(|e| err(Kind::Io(e)))?
    }

    /// Keep-alive requests on a connection the caller made (the tests connect from inside a
    /// pod's network namespace); `host` is the `Host` header. Each request has this client's
    /// deadline and body limit. Not for use on a thread that is inside a tokio runtime.
    pub fn keep_alive(&self, stream: std::net::TcpStream, host: &str) -> Result<Conn, Error> {
        let url = match stream.peer_addr() {
            Ok(peer) => format!("http://{peer}"),
            Err(_) => format!("http://{host}"),
        };
        let err = |kind| Error {
            url: url.clone(),
            kind,
        };
        let runtime = runtime().map_err(|e| err(Kind::Io(e)))?;
        stream.set_nonblocking(true).map_err(|e| err(Kind::Io(e)))?;
        let send = runtime.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(stream).map_err(Kind::Io)?;
            let (send, conn) = builder()
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| Kind::Http(describe(&e)))?;
            // Driven whenever a request is: a current-thread runtime runs its tasks only
            // inside block_on.
            tokio::spawn(conn);
            Ok::<_, Kind>(send)
        });
        Ok(Conn {
            runtime,
            send: send.map_err(err)?,
            client: *self,
            host: host.into(),
            url,
        })
    }

    /// What this client makes of `response` as a server's whole answer to a `GET` (the
    /// stream ends after it), read in small pieces as from a slow peer: for the tests and the
    /// fuzz target of what a peer may answer. No socket is involved.
    pub fn replay(&self, response: &[u8]) -> Result<Response, Error> {
        let url = "http://replay/".to_string();
        let err = |kind| Error {
            url: url.clone(),
            kind,
        };
        let canned = Canned {
            data: response.to_vec(),
            at: 0,
            asked: false,
            reader: None,
        };
        let (timeout, this) = (self.timeout, *self);
        let request = request("replay", Method::GET, "/", Bytes::new(), true)
            .map_err(|e| err(Kind::Http(e)))?;
        block_on(|| async {
            tokio::time::timeout(timeout, this.exchange(canned, request))
                .await
                .unwrap_or(Err(Kind::Timeout(timeout)))
        })
        .map_err(|e| err(Kind::Io(e)))?
        .map_err(err)
    }

    /// One request on a fresh connection over `io`, the connection driven beside it.
    async fn exchange<T>(self, io: T, request: Request<Full<Bytes>>) -> Result<Response, Kind>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut send, conn) = builder()
            .handshake(io)
            .await
            .map_err(|e| Kind::Http(describe(&e)))?;
        // The task ends with the connection (after this answer: `Connection: close`), or with
        // the runtime when the caller gives up.
        tokio::spawn(conn);
        let answer = send
            .send_request(request)
            .await
            .map_err(|e| Kind::Http(describe(&e)))?;
        read_body(answer, self.max_body).await
    }
}

/// A keep-alive connection ([`Client::keep_alive`]): requests one after another.
pub struct Conn {
    runtime: tokio::runtime::Runtime,
    send: http1::SendRequest<Full<Bytes>>,
    client: Client,
    host: String,
    url: String,
}

impl Conn {
    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> Result<Response, Error> {
        let url = format!("{}{path}", self.url);
        let err = |kind| Error {
            url: url.clone(),
            kind,
        };
        let request = request(&self.host, Method::GET, path, Bytes::new(), false)
            .map_err(|e| err(Kind::Http(e)))?;
        let (send, client) = (&mut self.send, self.client);
        let exchange = async {
            send.ready().await.map_err(|e| Kind::Http(describe(&e)))?;
            let answer = send
                .send_request(request)
                .await
                .map_err(|e| Kind::Http(describe(&e)))?;
            read_body(answer, client.max_body).await
        };
        self.runtime
            .block_on(async {
                tokio::time::timeout(client.timeout, exchange)
                    .await
                    .unwrap_or(Err(Kind::Timeout(client.timeout)))
            })
            .map_err(err)
    }
}

fn builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.max_headers(MAX_HEADERS).max_header_size(MAX_HEAD);
    b
}

fn request(
    host: &str,
    method: Method,
    path: &str,
    body: Bytes,
    close: bool,
) -> Result<Request<Full<Bytes>>, String> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    if close {
        r = r.header(header::CONNECTION, "close");
    }
    r.body(Full::new(body))
        .map_err(|e| format!("bad request for {path:?}: {e}"))
}

/// The body of `answer`, refused as soon as it is known to pass `max` bytes.
async fn read_body(answer: hyper::Response<Incoming>, max: usize) -> Result<Response, Kind> {
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    // A stated length over the limit fails before anything is read.
    if body.size_hint().lower() > max as u64 {
        return Err(Kind::TooLarge(max));
    }
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Kind::Http(describe(&e)))?;
        if let Ok(data) = frame.into_data() {
            if data.len() > max - out.len() {
                return Err(Kind::TooLarge(max));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Response { status, body: out })
}

/// hyper's message and its causes ("error reading a body from connection: Connection reset").
fn describe(e: &hyper::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// Runs the future `make` builds on a current-thread runtime of its own, on this thread (so a
/// socket it opens is in this thread's network namespace), or, when this thread is already
/// inside a tokio runtime (which may not block on another), on a helper thread, which
/// inherits this thread's namespaces.
fn block_on<F, T>(make: impl FnOnce() -> F + Send) -> io::Result<T>
where
    F: Future<Output = T>,
    T: Send,
{
    let run = || runtime().map(|rt| rt.block_on(make()));
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A peer that answers with fixed bytes, seven at a time, once the request is written (hyper
/// refuses an answer that comes before its request), then ends the stream; what is written to
/// it is dropped.
struct Canned {
    data: Vec<u8>,
    at: usize,
    asked: bool,
    reader: Option<std::task::Waker>,
}

impl hyper::rt::Read for Canned {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.asked {
            self.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.remaining().min(7).min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Canned {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.asked = true;
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::new(Duration::from_secs(5))
    }

    #[test]
    fn bodies_sized_chunked_and_delimited_by_close() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = client().replay(chunked).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
        let sized = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope";
        let r = client().replay(sized).unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "nope"));
        let close = b"HTTP/1.0 503 Service Unavailable\r\nserver: envoy\r\n\r\nno healthy upstream";
        let r = client().replay(close).unwrap();
        assert_eq!((r.status, r.text().as_str()), (503, "no healthy upstream"));
    }

    #[test]
    fn malformed_answers_are_errors() {
        for bad in [
            &b"HTTP/1.1 abc\r\n\r\n"[..],
            b"SSH-2.0\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nx-\xff\xfe: \xc3\r\n\r\n",
            b"",
        ] {
            let e = client().replay(bad).unwrap_err();
            assert!(matches!(e.kind, Kind::Http(_)), "{bad:?}: {e}");
        }
    }

    /// What a hostile peer can answer: each is an error, never a panic or an unbounded read.
    #[test]
    fn hostile_answers_are_bounded() {
        let small = client().max_body(1 << 20);
        let chunk = |size: &str| {
            format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n{size}\r\nbc\r\n0\r\n\r\n")
        };
        for size in [
            "ffffffffffffffff",
            "fffffffffffffffe",
            "100001",
            "10000000000000000",
        ] {
            let text = chunk(size);
            assert!(small.replay(text.as_bytes()).is_err(), "{size}");
        }
        let sized = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", u64::MAX);
        assert!(small.replay(sized.as_bytes()).is_err());
        let stated = "HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n";
        let e = small.replay(stated.as_bytes()).unwrap_err();
        assert!(matches!(e.kind, Kind::TooLarge(_)), "{e}");
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x-a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(small.replay(many.as_bytes()).is_err());
        let long = format!("HTTP/1.1 200 OK\r\nx-a: {}\r\n\r\n", "b".repeat(MAX_HEAD));
        assert!(small.replay(long.as_bytes()).is_err());
        // A body without an end stops at the limit.
        let mut endless = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        endless.resize(endless.len() + (1 << 20) + 10, b'x');
        let e = small.replay(&endless).unwrap_err();
        assert!(matches!(e.kind, Kind::TooLarge(_)), "{e}");
    }

    /// A real exchange over loopback, and a port nobody listens on.
    #[test]
    fn get_and_post_over_tcp() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0; 4096];
                // The request ends with its head (GET) or the 5-byte body (POST): read it all, or
                // closing with unread bytes would reset the connection under the answer.
                let done = |r: &[u8]| {
                    (r.starts_with(b"GET") && r.ends_with(b"\r\n\r\n")) || r.ends_with(b"hello")
                };
                while !done(&req) {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
                seen.push(String::from_utf8(req).unwrap());
            }
            seen
        });
        let r = client().get(addr, "/a?b=c").unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        let r = client().post(addr, "/p", "hello").unwrap();
        assert_eq!(r.status, 200);
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("GET /a?b=c HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(
            seen[0].contains(&format!("host: {addr}\r\n")),
            "{}",
            seen[0]
        );
        assert!(seen[1].starts_with("POST /p HTTP/1.1\r\n"), "{}", seen[1]);
        assert!(seen[1].contains("content-length: 5\r\n"), "{}", seen[1]);

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = client().get(([127, 0, 0, 1], port), "/").unwrap_err();
        assert!(matches!(e.kind, Kind::Connect(_)), "{e}");
        assert!(e
            .to_string()
            .starts_with(&format!("http://127.0.0.1:{port}/: connect")));
    }

    /// A peer that accepts and never answers is a timeout, not a hang.
    #[test]
    fn silent_peer_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let e = Client::new(Duration::from_millis(200))
            .get(addr, "/")
            .unwrap_err();
        assert!(matches!(e.kind, Kind::Timeout(_)), "{e}");
        drop(listener);
    }

    #[test]
    fn keep_alive_requests_share_one_connection() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for i in 0..3 {
                // Request head, up to its empty line.
                let mut line = String::new();
                while line != "\r\n" {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                }
                write!(w, "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{i}").unwrap();
            }
        });
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let mut conn = client().keep_alive(stream, "web").unwrap();
        for i in 0..3 {
            assert_eq!(conn.get("/1k").unwrap().text(), i.to_string());
        }
        server.join().unwrap();
    }

    /// Called from inside a runtime (a `#[tokio::main]` caller), the blocking call still works.
    #[test]
    fn usable_inside_a_runtime() {
        let rt = runtime().unwrap();
        let r = rt.block_on(async { client().replay(b"HTTP/1.1 204 No Content\r\n\r\n") });
        assert_eq!(r.unwrap().status, 204);
    }
}
