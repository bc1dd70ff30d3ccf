//! The datapath on the real kernel: exact pairing of both local hops of a pod, the first-byte
//! rule, pod isolation, stream semantics, and survival across daemon restarts and detach.
//! Each test builds its own pods (network namespaces with istio-init's rules and a uid-1337
//! relay), its own cgroup and its own pins, and removes them all even when it fails.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4},
};

use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

const APP_PORT: u16 = 8080;

fn mesh(subnet: u8) -> TwoPods {
    TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).expect("two pods")
}

/// `n` echo exchanges of `size` bytes from the client pod's app to the server pod's app.
fn exchanges(mesh: &TwoPods, n: u64, size: usize) {
    let dst = SocketAddrV4::new(mesh.server.ip, APP_PORT);
    for i in 0..n {
        let s = connect(&mesh.client.ns, dst).expect("connect through the mesh");
        let data = pattern(i + 1, size);
        let out = echo_exchange(s, &data, 16 * 1024).expect("exchange");
        assert_same(&format!("connection {i}"), &out.bytes, &data);
    }
}

#[test]
fn streams_are_byte_exact_through_both_hops_and_counters_prove_the_redirect() {
    let Some(mut accel) = Accel::new("streams_are_byte_exact") else {
        return;
    };
    let mesh = mesh(71);
    let _app =
        EchoServer::spawn(&mesh.server.ns, SocketAddrV4::new(mesh.server.ip, APP_PORT)).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);

    const N: u64 = 6;
    const SIZE: usize = 1 << 20;
    exchanges(&mesh, N, SIZE);
    let c = accel.counters();
    eprintln!("counters after the accelerated run: {c:?}");
    assert_eq!(
        c.get("pairs_outbound"),
        N,
        "one app->sidecar pair per connection"
    );
    assert_eq!(
        c.get("pairs_inbound"),
        N,
        "one sidecar->app pair per connection"
    );
    assert_eq!(c.get("stamps_written"), N);
    assert_eq!(c.get("stamps_found"), N);
    for dir in [
        "outbound_app_to_sidecar",
        "outbound_sidecar_to_app",
        "inbound_sidecar_to_app",
        "inbound_app_to_sidecar",
    ] {
        // Every byte of every stream went through the sockhash on both hops, in both directions.
        assert_eq!(
            c.get(&format!("bytes_redirected_{dir}")),
            N * SIZE as u64,
            "{dir}"
        );
    }
    assert_eq!(c.get("pass_no_peer"), 0, "no direction fell back to TCP");
    let relay = mesh.client.relay_stats();
    assert_eq!(
        relay.outbound_accepted, N,
        "the sidecar still saw every connection"
    );

    // Programs attached but the pods not listed: nothing is touched, everything still works.
    accel.remove_pod(&mesh.client.ns);
    accel.remove_pod(&mesh.server.ns);
    exchanges(&mesh, N, SIZE);
    assert_eq!(
        accel.counters(),
        c,
        "unlisted pods must leave every counter still"
    );

    // Programs detached: the same traffic still flows.
    accel.detach();
    assert!(!accel.pin_dir.exists(), "detach removed the pins");
    exchanges(&mesh, N, SIZE);
    assert_eq!(mesh.client.relay_stats().outbound_accepted, 3 * N);
}
