//! The proof that a C row measured what its mode claims, direction by direction.
//!
//! A C workload counts only if, over that workload (read from the daemon's `/metrics` before
//! and after it):
//!
//! - every direction the mode redirects (`meshlane_redirected_bytes_total{direction=...}`)
//!   carried at least the bytes every hop of that direction must carry for the workload
//!   ([`min_bytes`]): a direction where only the handshake, or one connection of sixteen, was
//!   redirected and the rest took TCP does not pass;
//! - no message was left on TCP because its socket found no peer (`passthrough{reason="no_peer"}`)
//!   or had been pinned to TCP (`passthrough{reason="tcp_pinned"}`);
//! - the pair counters show the mode's hops: every client connection paired with its sidecar
//!   where the mode pairs app hops (`reader`, `two-way`), none where it does not (`sidecar`), and
//!   with the sidecar hop on, sidecar pairs made in this workload (the suite restarts the client
//!   Envoy after each HTTP and gRPC workload, so none rides on an earlier workload's pool).
//!
//! Pure functions of the counters and the workload, so the rule is unit-tested here.

use meshlane_common::DIRECTIONS;

use crate::{
    daemon::{Counters, PASS_OTHER},
    workload::{self, Kind, Workload},
};

/// Which way a direction's bytes go relative to the client's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Client towards server: the requests.
    Request,
    /// Server towards client: the replies.
    Reply,
}

/// The flow of one of [`DIRECTIONS`] (named by the sending socket's role).
pub fn flow(direction: &str) -> Flow {
    match direction {
        "outbound_app_to_sidecar" | "inbound_sidecar_to_app" | "sidecar_client_to_server" => {
            Flow::Request
        }
        _ => Flow::Reply,
    }
}

/// The directions of [`DIRECTIONS`] that `mode` (as the daemon decided it) redirects, with the
/// sidecar hop on or off (docs/DESIGN.md, the mode table): `reader` the two app -> sidecar
/// directions, `two-way` also sidecar -> app, `sidecar` none of the app hops; the sidecar hop
/// both ways unless it is off. Any other mode (`off`) redirects nothing.
pub fn redirected_directions(mode: &str, sidecar_hop: bool) -> Vec<&'static str> {
    let app: &[&str] = match mode {
        "reader" => &["outbound_app_to_sidecar", "inbound_app_to_sidecar"],
        "two-way" => &[
            "outbound_app_to_sidecar",
            "outbound_sidecar_to_app",
            "inbound_sidecar_to_app",
            "inbound_app_to_sidecar",
        ],
        "sidecar" => &[],
        _ => return Vec::new(),
    };
    let sidecar: &[&str] = if sidecar_hop {
        &["sidecar_client_to_server", "sidecar_server_to_client"]
    } else {
        &[]
    };
    // In DIRECTIONS' order, so reports list them the same way everywhere.
    DIRECTIONS
        .iter()
        .copied()
        .filter(|d| app.contains(d) || sidecar.contains(d))
        .collect()
}

/// The bytes (requests, replies) that every hop of the chain carries at least, for `requests`
/// requests of `w` (warm-up included): what a redirected direction must have moved.
///
/// TCP ping-pong, connect cycles and bulk: the apps' own bytes, which `tcp_proxy` forwards
/// unchanged (mTLS only adds record overhead). HTTP/1.1 and gRPC: Envoy rewrites headers (and
/// may shrink them with HPACK), so only what it must forward as is counts: the request line of
/// each GET and the 1 KiB body of each reply; the payload of each gRPC message both ways.
pub fn min_bytes(w: &Workload, requests: u64) -> (u64, u64) {
    let size = w.size as u64;
    match w.kind {
        Kind::TcpPingPong | Kind::Bulk => (requests * size, requests * size),
        Kind::Connect => {
            let echo = workload::CONNECT_ECHO_BYTES as u64;
            (requests * echo, requests * echo)
        }
        Kind::Http => (
            requests * workload::http_request_line().len() as u64,
            requests * size,
        ),
        Kind::Grpc => (requests * size, requests * size),
    }
}

/// What a C workload must show to count.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The mode the daemon decided.
    pub mode: &'a str,
    pub sidecar_hop: bool,
    /// Connections the client opened (connect cycles for the connect workload).
    pub conns: u64,
    /// (requests, replies) from [`min_bytes`].
    pub min_bytes: (u64, u64),
}

/// Why a C workload does not count; empty when it does.
pub fn failures(e: &Expect, c: &Counters) -> Vec<String> {
    let mut why = Vec::new();
    let pairs_app_hops = matches!(e.mode, "reader" | "two-way");
    if pairs_app_hops && c.pairs_outbound < e.conns {
        why.push(format!(
            "outbound pairs {} < {} connections",
            c.pairs_outbound, e.conns
        ));
    }
    if !pairs_app_hops && (c.pairs_outbound > 0 || c.pairs_inbound > 0) {
        why.push(format!(
            "app hops paired in mode {} (outbound {}, inbound {})",
            e.mode, c.pairs_outbound, c.pairs_inbound
        ));
    }
    if e.sidecar_hop && c.pairs_sidecar == 0 {
        why.push("no sidecar pair".to_string());
    }
    if !e.sidecar_hop && c.pairs_sidecar > 0 {
        why.push(format!(
            "{} sidecar pairs with the sidecar hop off",
            c.pairs_sidecar
        ));
    }
    let directions = redirected_directions(e.mode, e.sidecar_hop);
    if directions.is_empty() && c.redirected_bytes > 0 {
        // The server pod "on another node" in the sidecar mode: a measurement of what meshlane
        // costs the traffic it leaves alone, so nothing may have been redirected.
        why.push(format!(
            "{} bytes redirected where the mode redirects nothing",
            c.redirected_bytes
        ));
    }
    for d in directions {
        let need = match flow(d) {
            Flow::Request => e.min_bytes.0,
            Flow::Reply => e.min_bytes.1,
        };
        let got = c.bytes(d);
        if got < need {
            why.push(format!("{d}: {got} bytes redirected < {need}"));
        }
    }
    if c.pass_no_peer > 0 {
        why.push(format!("{} messages without a peer", c.pass_no_peer));
    }
    if c.pass_tcp_pinned > 0 || c.pass_no_peer > 0 {
        // Which other passthrough reasons moved tells why sockets were pinned.
        let other: Vec<String> = PASS_OTHER
            .iter()
            .zip(c.pass_other)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if c.pass_tcp_pinned > 0 {
            why.push(format!("{} messages pinned to TCP", c.pass_tcp_pinned));
        }
        if !other.is_empty() {
            why.push(format!("other passthrough: {}", other.join(", ")));
        }
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Family;

    fn w(kind: Kind, size: usize) -> Workload {
        Workload {
            name: "t".into(),
            kind,
            size,
            conns: 1,
            count: 100,
            family: Family::Ipv4,
            open_loop: None,
        }
    }

    fn counters(bytes: &[(&str, u64)]) -> Counters {
        let mut c = Counters::default();
        for (d, b) in bytes {
            let i = DIRECTIONS.iter().position(|x| x == d).unwrap();
            c.bytes_by_direction[i] = *b;
        }
        c
    }

    #[test]
    fn modes_redirect_their_directions() {
        assert_eq!(
            redirected_directions("sidecar", true),
            ["sidecar_client_to_server", "sidecar_server_to_client"]
        );
        assert!(redirected_directions("sidecar", false).is_empty());
        assert_eq!(
            redirected_directions("reader", false),
            ["outbound_app_to_sidecar", "inbound_app_to_sidecar"]
        );
        assert_eq!(redirected_directions("two-way", true).len(), 6);
        assert!(redirected_directions("off", true).is_empty());
        // Each hop has one direction of each flow.
        let two_way = redirected_directions("two-way", true);
        let requests = two_way.iter().filter(|d| flow(d) == Flow::Request).count();
        assert_eq!(requests, 3);
    }

    #[test]
    fn min_bytes_per_kind() {
        assert_eq!(min_bytes(&w(Kind::TcpPingPong, 64), 10), (640, 640));
        let line = "GET /1k HTTP/1.1\r\n".len() as u64;
        assert_eq!(min_bytes(&w(Kind::Http, 1024), 3), (3 * line, 3 * 1024));
        assert_eq!(min_bytes(&w(Kind::Connect, 1), 2), (128, 128));
        assert_eq!(min_bytes(&w(Kind::Grpc, 1024), 2), (2048, 2048));
    }

    fn sidecar_expect(need: (u64, u64)) -> Expect<'static> {
        Expect {
            mode: "sidecar",
            sidecar_hop: true,
            conns: 1,
            min_bytes: need,
        }
    }

    #[test]
    fn nothing_may_pair_or_move_with_the_server_pod_off_the_node() {
        let e = Expect {
            sidecar_hop: false,
            ..sidecar_expect((10, 10))
        };
        assert!(redirected_directions(e.mode, e.sidecar_hop).is_empty());
        let quiet = Counters::default();
        assert!(failures(&e, &quiet).is_empty());
        let paired = Counters {
            pairs_sidecar: 1,
            ..Counters::default()
        };
        assert_eq!(
            failures(&e, &paired),
            ["1 sidecar pairs with the sidecar hop off"]
        );
        let moved = Counters {
            redirected_bytes: 64,
            ..Counters::default()
        };
        assert_eq!(
            failures(&e, &moved),
            ["64 bytes redirected where the mode redirects nothing"]
        );
    }

    #[test]
    fn sidecar_mode_needs_both_sidecar_directions() {
        let e = sidecar_expect((1000, 1000));
        let mut c = counters(&[
            ("sidecar_client_to_server", 1100),
            ("sidecar_server_to_client", 1000),
        ]);
        c.pairs_sidecar = 1;
        assert!(failures(&e, &c).is_empty());

        // One direction short: the replies took TCP after the first few.
        let mut short = c;
        short.bytes_by_direction[5] = 999;
        let why = failures(&e, &short);
        assert_eq!(why.len(), 1);
        assert!(why[0].starts_with("sidecar_server_to_client"), "{why:?}");

        // Enough bytes, but messages pinned to TCP or without a peer: not a clean C row.
        let mut pinned = c;
        pinned.pass_tcp_pinned = 2;
        pinned.pass_no_peer = 1;
        assert_eq!(failures(&e, &pinned).len(), 2);
        // The reason they were pinned is named, when the counters show one.
        pinned.pass_other[6] = 3;
        let why = failures(&e, &pinned);
        assert_eq!(why.last().unwrap(), "other passthrough: over_budget 3");

        // An app hop paired: not the sidecar mode.
        let mut app = c;
        app.pairs_outbound = 1;
        assert_eq!(failures(&e, &app).len(), 1);
    }

    #[test]
    fn bytes_without_a_sidecar_pair_do_not_count() {
        let e = sidecar_expect((10, 10));
        let c = counters(&[
            ("sidecar_client_to_server", 10),
            ("sidecar_server_to_client", 10),
        ]);
        assert_eq!(failures(&e, &c), ["no sidecar pair"]);
    }

    #[test]
    fn reader_needs_every_connection_paired_and_app_directions() {
        let e = Expect {
            mode: "reader",
            sidecar_hop: false,
            conns: 16,
            min_bytes: (64, 64),
        };
        let mut c = counters(&[
            ("outbound_app_to_sidecar", 64),
            ("inbound_app_to_sidecar", 64),
        ]);
        c.pairs_outbound = 15;
        let why = failures(&e, &c);
        assert_eq!(why, ["outbound pairs 15 < 16 connections"]);
        c.pairs_outbound = 16;
        assert!(failures(&e, &c).is_empty());
        // The sidecar hop off: its directions are not required, and bytes there do not help
        // an app direction that is missing.
        c.bytes_by_direction[0] = 0;
        c.bytes_by_direction[4] = 1 << 20;
        assert_eq!(failures(&e, &c).len(), 1);
    }
}
