//! The HTTP workload's own HTTP/1.1 keep-alive client: one `GET` written in one syscall, then a
//! blocking read of the answer on the same connection, timed by the caller per request.
//!
//! Everything else in the workspace speaks HTTP through `httpc` (hyper). This loop stays hand
//! written because it is the measured load, not a control-plane call: its per-request cost is
//! part of every latency sample, so it must stay as small and as fixed as the TCP ping-pong's
//! write/read pair (no runtime, no task wake-ups, no buffering policy of a library that may
//! change between versions), and results must stay comparable with earlier runs.

use anyhow::{ensure, Context, Result};
use std::io::{BufRead, Write};
use std::net::TcpStream;

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).context("reading a response line")?;
    ensure!(n > 0, "connection closed before the response was complete");
    ensure!(
        line.ends_with('\n'),
        "connection closed inside a line: {line:?}"
    );
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Reads one response to a request that was not `HEAD`: body by `Content-Length`, chunked
/// transfer coding, or until the peer closes. Leaves `r` at the next response, so one
/// `BufReader` serves a whole keep-alive connection.
pub fn read_response(r: &mut impl BufRead) -> Result<Response> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    ensure!(
        version.starts_with("HTTP/1."),
        "not an HTTP/1.x status line: {status_line:?}"
    );
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let size_line = read_line(r)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size line {size_line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(r)?.is_empty() {}
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            r.read_exact(&mut resp.body[start..])
                .context("reading a chunk")?;
            ensure!(read_line(r)?.is_empty(), "chunk not followed by CRLF");
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad content-length {len:?}"))?;
        resp.body.resize(len, 0);
        r.read_exact(&mut resp.body)
            .with_context(|| format!("reading a {len}-byte body"))?;
    } else {
        r.read_to_end(&mut resp.body)
            .context("reading a body delimited by close")?;
    }
    Ok(resp)
}

/// Sends `GET path` for a keep-alive connection and reads the response. `conn` wraps the
/// stream so bytes read ahead stay buffered for the next response.
pub fn get(conn: &mut std::io::BufReader<TcpStream>, host: &str, path: &str) -> Result<Response> {
    // One write: a request split over several segments meets Nagle and the peer's delayed ACK.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    conn.get_mut()
        .write_all(request.as_bytes())
        .with_context(|| format!("sending GET {path}"))?;
    read_response(conn).with_context(|| format!("GET {path}"))
}
