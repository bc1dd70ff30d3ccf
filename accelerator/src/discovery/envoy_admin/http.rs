//! The admin API's HTTP/1.1 client: one `GET` with `Connection: close`, and a response reader
//! bounded everywhere, since the pod controls the server it talks to.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use super::Error;
use crate::discovery::excerpt;

/// The largest body read from the pod's admin port (a full config dump is a few MB).
const MAX_BODY: usize = 64 << 20;
/// Header lines read before a response is refused.
const MAX_HEADERS: usize = 100;

/// One `GET` over HTTP/1.1 with `Connection: close`; the body of a 200 answer. A 404 whose body
/// says the resource is "not found in config dump" means an empty answer (Envoy's way of saying
/// it has none of that resource).
pub fn get(addr: SocketAddrV4, path: &str, timeout: Duration) -> Result<String, Error> {
    let unreachable = |source: io::Error| Error::Unreachable { addr, source };
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(unreachable)?;
    let http = |message: String| Error::Http {
        path: path.into(),
        message,
    };
    let (status, body) = read_response(&mut BufReader::new(s)).map_err(|e| http(e.to_string()))?;
    let body = String::from_utf8(body).map_err(|_| http("body is not UTF-8".into()))?;
    match status {
        200 => Ok(body),
        404 if body.contains("not found in config dump") => Ok("{}".into()),
        _ => Err(Error::Status {
            path: path.into(),
            status,
            body: body.trim().chars().take(200).collect(),
        }),
    }
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    let n = r.by_ref().take(8192).read_line(&mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Status and body of an HTTP/1.1 response (`Content-Length`, chunked, or to end of stream).
pub fn read_response(r: &mut impl BufRead) -> io::Result<(u16, Vec<u8>)> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| bad(format!("bad status line {}", excerpt(&status_line))))?;
    let (mut length, mut chunked) = (None, false);
    // The pod controls this server: a response may not keep the daemon reading headers forever.
    let mut headers = 0;
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(bad(format!("more than {MAX_HEADERS} header lines")));
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {}", excerpt(&line))))?;
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| bad(format!("bad content-length {}", excerpt(v))))?,
            );
        } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let size_line = read_line(r)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size {}", excerpt(&size_line))))?;
            if size == 0 {
                while !read_line(r)?.is_empty() {}
                break;
            }
            // `size` is the pod's number: compare without adding, which could wrap.
            if size > MAX_BODY - body.len() {
                return Err(bad(format!("body over {MAX_BODY} bytes")));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r)?;
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(bad(format!("body over {MAX_BODY} bytes")));
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_bodies() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let (status, body) = read_response(&mut &chunked[..]).unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"abcde"[..]));
        let sized = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope";
        assert_eq!(
            read_response(&mut &sized[..]).unwrap(),
            (404, b"nope".to_vec())
        );
        for bad in [
            &b"HTTP/1.1 abc\r\n\r\n"[..],
            b"SSH-2.0\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"",
        ] {
            assert!(read_response(&mut &bad[..]).is_err());
        }
    }

    /// What a hostile pod's admin port can answer: each is an error for that pod, never a
    /// panic or an unbounded read.
    #[test]
    fn hostile_responses_are_errors() {
        let chunk = |size: &str| {
            format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n{size}\r\nbc\r\n0\r\n\r\n")
        };
        for size in [
            "ffffffffffffffff",
            "fffffffffffffffe",
            "4000001",
            "10000000000000000",
        ] {
            let text = chunk(size);
            let err = read_response(&mut text.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{size}: {err}");
        }
        let sized = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", usize::MAX);
        assert!(read_response(&mut sized.as_bytes()).is_err());
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x-a: b\r\n".repeat(10_000));
        assert!(read_response(&mut many.as_bytes()).is_err());
        let bytes = b"HTTP/1.1 200 OK\r\nx-\xff\xfe: \xc3\r\n\r\n";
        assert!(read_response(&mut &bytes[..]).is_err());
        // A body without an end stops at the limit.
        let endless = std::io::Read::chain(
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            std::io::repeat(b'x').take(MAX_BODY as u64 + 10),
        );
        let (_, body) = read_response(&mut std::io::BufReader::new(endless)).unwrap();
        assert_eq!(body.len(), MAX_BODY);
    }
}
