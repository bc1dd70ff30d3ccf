//! Nothing of a connection stays in the pairing maps after it closes, even when its pod was
//! removed from the policy map while the connection was open (a pod deleted or opted out, a
//! discovery source that failed for a moment). The pins keep maps across daemon restarts, so a
//! leak would grow until a full map stopped pairing on the whole node.

mod support;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddrV4},
    time::{Duration, Instant},
};

use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

/// Entries of each map that holds per-socket state, by name.
fn per_socket_entries(accel: &mut Accel) -> Vec<(&'static str, u32)> {
    use meshlane_common::maps;
    accel
        .dp()
        .map_usage()
        .expect("map usage")
        .into_iter()
        .filter(|m| [maps::SOCKS, maps::TARGETS, maps::RENDEZVOUS, maps::UNREAD].contains(&m.name))
        .map(|m| (m.name, m.entries))
        .collect()
}

#[test]
fn closing_after_the_pod_was_removed_leaves_every_map_empty() {
    let Some(mut accel) = Accel::new("leaks_pod_removed") else {
        return;
    };
    let mesh = TwoPods::new(95, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);

    // Connections that pair and carry bytes, then stay open.
    const N: usize = 20;
    let mut open = Vec::new();
    for i in 0..N {
        let mut s = connect(&mesh.client.ns, dst).unwrap();
        let data = pattern(i as u64, 1000);
        s.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        assert_same(&format!("connection {i}"), &back, &data);
        open.push(s);
    }
    let c = accel.counters();
    assert_eq!(c.get("pairs_outbound"), N as u64, "{c:?}");
    assert_eq!(c.get("pairs_inbound"), N as u64, "{c:?}");
    let busy = per_socket_entries(&mut accel);
    assert!(
        busy.iter()
            .any(|(n, e)| *n == meshlane_common::maps::RENDEZVOUS && *e > 0),
        "the open connections are in the maps: {busy:?}"
    );

    // The pods go away while their connections live; then the connections close.
    accel.remove_pod(&mesh.client.ns);
    accel.remove_pod(&mesh.server.ns);
    for s in &open {
        s.shutdown(Shutdown::Write).unwrap();
    }
    for mut s in open {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }

    // Each socket's state callback at close runs when its TCP state machine reaches CLOSE
    // (after the FIN exchange, in softirq), so wait for it rather than sleep a fixed time.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = per_socket_entries(&mut accel);
        if left.iter().all(|(_, e)| *e == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries left after every connection closed: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
