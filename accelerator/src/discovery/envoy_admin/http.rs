//! The admin API's `GET`: the workspace's HTTP client ([`httpc`]) with the daemon's limits, since
//! the pod controls the server it talks to, and Envoy's way of saying it has none of a resource.

use std::{net::SocketAddrV4, time::Duration};

use super::Error;

/// The largest body read from the pod's admin port (a full config dump is a few MB).
pub const MAX_BODY: usize = 64 << 20;

/// The client for one pod's admin port: `timeout` for each whole exchange, connect included;
/// at most [`MAX_BODY`] bytes of body, at most [`httpc::MAX_HEADERS`] header lines.
pub fn client(timeout: Duration) -> httpc::Client {
    httpc::Client::new(timeout).max_body(MAX_BODY)
}

/// One `GET` with `Connection: close`; the body of a 200 answer. A 404 whose body says the
/// resource is "not found in config dump" means an empty answer (Envoy's way of saying it has
/// none of that resource).
pub fn get(addr: SocketAddrV4, path: &str, timeout: Duration) -> Result<String, Error> {
    let r = client(timeout).get(addr, path).map_err(|e| match e.kind {
        httpc::Kind::Connect(source) => Error::Unreachable { addr, source },
        // The error names the path already: the URL would say it twice.
        kind => Error::Http {
            path: path.into(),
            message: kind.to_string(),
        },
    })?;
    let body = String::from_utf8(r.body).map_err(|_| Error::Http {
        path: path.into(),
        message: "body is not UTF-8".into(),
    })?;
    match r.status {
        200 => Ok(body),
        404 if body.contains("not found in config dump") => Ok("{}".into()),
        status => Err(Error::Status {
            path: path.into(),
            status,
            body: body.trim().chars().take(200).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, TcpListener},
    };

    /// Serves each of `answers` to one connection, after reading its request head.
    fn serve(answers: &'static [&'static [u8]]) -> SocketAddrV4 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let (mut req, mut buf) = (Vec::new(), [0; 1024]);
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "request cut short: {req:?}");
                    req.extend_from_slice(&buf[..n]);
                }
                s.write_all(answer).unwrap();
            }
        });
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
    }

    #[test]
    fn statuses_and_errors_name_the_path() {
        let addr = serve(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 33\r\n\r\nresource not found in config dump",
            b"HTTP/1.1 503 Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n\xff\xfe",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n",
        ]);
        let t = Duration::from_secs(5);
        assert_eq!(get(addr, "/a", t).unwrap(), "{}");
        assert_eq!(get(addr, "/b", t).unwrap(), "{}");
        let e = get(addr, "/c", t).unwrap_err().to_string();
        assert_eq!(e, "admin API /c: HTTP 503: busy");
        let e = get(addr, "/d", t).unwrap_err().to_string();
        assert_eq!(e, "admin API /d: body is not UTF-8");
        let e = get(addr, "/e", t).unwrap_err().to_string();
        assert_eq!(e, format!("admin API /e: body over {MAX_BODY} bytes"));
    }
}
