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
    close_all_then(
        open,
        &mut accel,
        "entries left after every connection closed",
        |a| {
            let left = per_socket_entries(a);
            (left.iter().all(|(_, e)| *e == 0), format!("{left:?}"))
        },
    );
}

/// Half-closes every connection, reads each to its end, then waits until `done` says the maps
/// are clean: each socket's state callback at close runs when its TCP state machine reaches
/// CLOSE (after the FIN exchange, in softirq), so wait for it rather than sleep a fixed time.
fn close_all_then(
    open: Vec<std::net::TcpStream>,
    accel: &mut Accel,
    what: &str,
    mut done: impl FnMut(&mut Accel) -> (bool, String),
) {
    for s in &open {
        s.shutdown(Shutdown::Write).unwrap();
    }
    for mut s in open {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, state) = done(accel);
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {state}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stamp no sidecar reads (meshlane predicted a capture iptables did not make, here because
/// the pod's rules exclude a port its policy does not) leaves the app's socket waiting for a
/// partner that never comes. The sweep removes it at its second look: out of the rendezvous map
/// and the sockhash, so its reads are plain TCP again, while the connection carries on whole.
#[test]
fn a_stamp_no_sidecar_reads_is_swept_out_of_the_sockhash() {
    use std::collections::BTreeSet;
    let Some(mut accel) = Accel::new("leaks_swept") else {
        return;
    };
    let rules = CaptureConfig {
        exclude_outbound_ports: vec![9000],
        ..CaptureConfig::default()
    };
    let mesh = TwoPods::new(96, rules, CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 9000);
    let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    // The policy says port 9000 is captured; iptables lets it through to the server directly.
    accel.add_pod(&mesh.client.ns, &CaptureConfig::default());

    let mut s = connect(&mesh.client.ns, dst).unwrap();
    let first = pattern(1, 4096);
    s.write_all(&first).unwrap();
    let mut back = vec![0u8; first.len()];
    s.read_exact(&mut back).unwrap();
    assert_same("before the sweep", &back, &first);
    let c = accel.counters();
    assert_eq!(c.get("stamps_written"), 1, "{c:?}");
    assert_eq!(c.pairs(), 0, "{c:?}");
    let socks = |accel: &mut Accel| usage(accel, meshlane_common::maps::SOCKS).entries;
    assert_eq!(
        socks(&mut accel),
        1,
        "the app's socket waits in the sockhash"
    );

    let (waiting, removed) = accel.dp().sweep_unpaired(&BTreeSet::new()).unwrap();
    assert_eq!((waiting.len(), removed), (1, 0), "first look: noted, kept");
    let (waiting, removed) = accel.dp().sweep_unpaired(&waiting).unwrap();
    assert_eq!((waiting.len(), removed), (0, 1), "second look: removed");
    assert_eq!(socks(&mut accel), 0, "out of the sockhash");
    let left = per_socket_entries(&mut accel);
    assert!(left.iter().all(|(_, e)| *e == 0), "{left:?}");

    // The connection is untouched: more bytes both ways, then a clean end of stream.
    let second = pattern(2, 64 * 1024);
    let out = echo_exchange(s, &second, 8192).unwrap();
    assert_same("after the sweep", &out.bytes, &second);
}

/// The daemon runs that sweep by itself (`--sweep`) and counts what it removed.
#[test]
fn the_daemon_sweeps_stamps_no_sidecar_reads() {
    let Some(accel) = Accel::cgroup_only("leaks_daemon_sweep") else {
        return;
    };
    let rules = CaptureConfig {
        exclude_outbound_ports: vec![9000],
        ..CaptureConfig::default()
    };
    let mesh = TwoPods::new(98, rules, CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 9000);
    let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    let dir = std::env::temp_dir().join(format!("meshlane-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The pod list says nothing about port 9000, so meshlane predicts it captured.
    let config = dir.join("pods.toml");
    std::fs::write(
        &config,
        format!(
            "[[pod]]\nname = \"demo/client\"\nnetns = \"{}\"\n",
            mesh.client.ns.path().display()
        ),
    )
    .unwrap();
    let _daemon = Daemon(
        accel
            .run_command()
            .args(["--resync", "100ms", "--sweep", "200ms", "--config"])
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the pod accelerated", || {
        try_status_json(&accel).is_some_and(|st| {
            st["pods"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["state"] == "accelerated"))
        })
    });
    let mut s = connect(&mesh.client.ns, dst).unwrap();
    let data = pattern(3, 4096);
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_same("echo", &back, &data);
    assert_eq!(accel.counters().get("stamps_written"), 1);
    wait_until("meshlane_unpaired_swept_total 1", || {
        accel
            .http_get("/metrics")
            .ok()
            .and_then(|(_, body)| first_sample(&body, "meshlane_unpaired_swept_total"))
            == Some(1.0)
    });
    let more = pattern(4, 32 * 1024);
    let out = echo_exchange(s, &more, 8192).unwrap();
    assert_same("after the sweep", &out.bytes, &more);
    let _ = std::fs::remove_dir_all(&dir);
}

/// For the capacity tests: both pods accelerated, an echo server behind the server pod's 8080.
fn capacity_scene(test: &str, subnet: u8) -> Option<(Accel, TwoPods, SocketAddrV4, EchoServer)> {
    scene_with(Accel::new(test)?, subnet)
}

fn scene_with(mut accel: Accel, subnet: u8) -> Option<(Accel, TwoPods, SocketAddrV4, EchoServer)> {
    let mesh = TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    Some((accel, mesh, dst, echo))
}

/// One connection echoing 64 KiB, checked byte for byte.
fn checked_exchange(mesh: &TwoPods, dst: SocketAddrV4, seed: u64) {
    let data = pattern(seed, 64 * 1024);
    let got = echo_exchange(connect(&mesh.client.ns, dst).unwrap(), &data, 4096).unwrap();
    assert_same(&format!("connection {seed}"), &got.bytes, &data);
}

/// Connections made while a map is full, in a capacity test.
const FULL_N: u64 = 5;

/// [`FULL_N`] connections while a map is full: exact, none paired, nothing redirected, and
/// `full_counter` up by at least one per hop. Returns the counters before and after.
fn stay_on_tcp(
    accel: &Accel,
    mesh: &TwoPods,
    dst: SocketAddrV4,
    full_counter: &str,
) -> (meshlane::datapath::Counters, meshlane::datapath::Counters) {
    let before = accel.counters();
    for i in 0..FULL_N {
        checked_exchange(mesh, dst, i);
    }
    let c = accel.counters();
    assert_eq!(
        c.get("pairs_outbound"),
        before.get("pairs_outbound"),
        "{c:?}"
    );
    assert_eq!(c.get("pairs_inbound"), before.get("pairs_inbound"), "{c:?}");
    assert_eq!(c.redirected_bytes(), before.redirected_bytes(), "{c:?}");
    assert!(
        c.get(full_counter) >= before.get(full_counter) + 2 * FULL_N,
        "{full_counter}: {c:?}"
    );
    (before, c)
}

/// Once space freed: [`FULL_N`] more connections, each paired on both hops, bytes redirected.
fn pair_again(accel: &Accel, mesh: &TwoPods, dst: SocketAddrV4, c: &meshlane::datapath::Counters) {
    for i in 0..FULL_N {
        checked_exchange(mesh, dst, 100 + i);
    }
    let after = accel.counters();
    let n = FULL_N;
    assert_eq!(
        after.get("pairs_outbound"),
        c.get("pairs_outbound") + n,
        "{after:?}"
    );
    assert_eq!(
        after.get("pairs_inbound"),
        c.get("pairs_inbound") + n,
        "{after:?}"
    );
    assert!(after.redirected_bytes() > c.redirected_bytes(), "{after:?}");
}

/// The fill level of one map.
fn usage(accel: &mut Accel, name: &str) -> meshlane::datapath::MapUsage {
    accel
        .dp()
        .map_usage()
        .unwrap()
        .into_iter()
        .find(|m| m.name == name)
        .unwrap()
}

/// A full pairing map (the rendezvous map at capacity, filled here with keys no socket can ever
/// make) leaves every new hop on plain TCP with every byte exact, the counter and the map's fill
/// level saying why, and no socket in a sockhash waiting for a partner that cannot find it; and
/// pairing resumes as soon as space frees.
#[test]
fn a_full_pairing_map_keeps_new_hops_on_tcp_until_space_frees() {
    use aya::maps::{HashMap, Map, MapData};
    use meshlane_common::{maps, PairKey, Waiter};
    let Some((mut accel, mesh, dst, _echo)) = capacity_scene("capacity_rendezvous", 94) else {
        return;
    };

    let pin = MapData::from_pin(accel.pin_dir.join(maps::RENDEZVOUS)).unwrap();
    let mut rendezvous: HashMap<MapData, PairKey, Waiter> =
        HashMap::try_from(Map::HashMap(pin)).unwrap();
    // Namespace cookie 0 is never a pod's, so no socket ever makes one of these keys.
    let filler = |i: u32| PairKey {
        netns: 0,
        kind: u32::MAX,
        ports: i,
        addr: [0; 4],
    };
    let mut filled = 0;
    while rendezvous
        .insert(filler(filled), Waiter::default(), 0)
        .is_ok()
    {
        filled += 1;
    }
    assert_eq!(filled, maps::RENDEZVOUS_MAX, "the map took its capacity");
    let full = usage(&mut accel, maps::RENDEZVOUS);
    assert_eq!(full.entries, full.capacity, "{full:?}");

    // Each connection's two hops, each end: the first end of each finds no room and says so.
    let (before, c) = stay_on_tcp(&accel, &mesh, dst, "rendezvous_full");
    assert_eq!(
        c.get("stamps_written"),
        before.get("stamps_written"),
        "no end was stamped"
    );
    // While a connection is open, none of its sockets is in a sockhash or the unread map.
    let mut held = connect(&mesh.client.ns, dst).unwrap();
    held.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
    let left: Vec<_> = per_socket_entries(&mut accel)
        .into_iter()
        .filter(|(n, e)| *n != maps::RENDEZVOUS && *e > 0)
        .collect();
    assert!(
        left.is_empty(),
        "sockets sit in the maps unpaired: {left:?}"
    );
    drop(held);

    // Space frees: the next connections pair again.
    for i in 0..1000 {
        rendezvous.remove(&filler(i)).unwrap();
    }
    pair_again(&accel, &mesh, dst, &c);
}

/// The unread map (one entry per socket that may receive redirected bytes) filled to capacity:
/// an end that needs an entry and finds no room does not join, so its hop stays on TCP, exact;
/// the map's fill level and `unread_full` say so; pairing resumes once entries free.
#[test]
fn a_full_unread_map_keeps_new_hops_on_tcp_until_space_frees() {
    use aya::maps::{HashMap, Map, MapData};
    use meshlane_common::maps;
    let Some((mut accel, mesh, dst, _echo)) = capacity_scene("capacity_unread", 133) else {
        return;
    };

    let pin = MapData::from_pin(accel.pin_dir.join(maps::UNREAD)).unwrap();
    let mut unread: HashMap<MapData, u64, i64> = HashMap::try_from(Map::HashMap(pin)).unwrap();
    // The keys are kernel socket addresses; small numbers are never one.
    let mut filled = 0u64;
    while unread.insert(filled + 1, 0, 0).is_ok() {
        filled += 1;
    }
    assert_eq!(
        filled,
        u64::from(maps::PEERS_MAX),
        "the map took its capacity"
    );
    let full = usage(&mut accel, maps::UNREAD);
    assert_eq!(full.entries, full.capacity, "{full:?}");

    // Both hops' sidecar ends receive redirected bytes and need an entry: each says so.
    let (_, c) = stay_on_tcp(&accel, &mesh, dst, "unread_full");

    // Space frees: the next connections pair again, and every byte they carry is redirected.
    for k in 1..=1000 {
        unread.remove(&k).unwrap();
    }
    pair_again(&accel, &mesh, dst, &c);
    for k in 1001..=filled {
        let _ = unread.remove(&k);
    }
}

/// The sockhashes at capacity. They hold live sockets, so the datapath is made small
/// (`max_sockets`) and filled with open connections. Then every new hop stays on plain TCP with
/// every byte exact, `sockhash_full` and the fill levels say why, and once the held connections
/// close their room frees and pairing resumes. The maps sized from `max_sockets` report it.
#[test]
fn full_sockhashes_keep_new_hops_on_tcp_until_sockets_close() {
    use meshlane_common::maps;
    const SMALL: u32 = 16;
    let Some(accel) = Accel::with_max_sockets("capacity_sockhash", SMALL) else {
        return;
    };
    let Some((mut accel, mesh, dst, _echo)) = scene_with(accel, 137) else {
        return;
    };
    for (name, capacity) in [
        (maps::SOCKS, SMALL),
        (maps::TARGETS, SMALL),
        (maps::RENDEZVOUS, SMALL),
        (maps::UNREAD, 2 * SMALL),
    ] {
        assert_eq!(usage(&mut accel, name).capacity, capacity, "{name}");
    }

    // Each held connection is paired on both hops (its ends sit in a sockhash until it closes).
    let full = |accel: &mut Accel| {
        usage(accel, maps::SOCKS).entries == SMALL && usage(accel, maps::TARGETS).entries == SMALL
    };
    let mut held = Vec::new();
    while !full(&mut accel) {
        assert!(
            held.len() < 4 * SMALL as usize,
            "the sockhashes never filled"
        );
        let mut s = connect(&mesh.client.ns, dst).unwrap();
        s.write_all(b"hold").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hold");
        held.push(s);
    }
    assert!(accel.counters().pairs() > 0, "the held connections paired");

    stay_on_tcp(&accel, &mesh, dst, "sockhash_full");
    // The held connections still carry their bytes, redirected, while the maps are full.
    for s in &mut held {
        s.write_all(b"more").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"more");
    }

    drop(held);
    wait_until("the held connections' sockets leave the sockhashes", || {
        per_socket_entries(&mut accel).iter().all(|(_, e)| *e == 0)
    });
    let before = accel.counters();
    pair_again(&accel, &mesh, dst, &before);
}

/// `--max-sockets` sizes the maps a daemon makes. A daemon adopting pins keeps the size they were
/// made with (a map cannot be resized under its live connections), says so in its log, and
/// reports the size the maps have; after `meshlane detach` the next daemon makes them anew.
#[test]
fn max_sockets_sizes_new_maps_and_adopted_pins_keep_theirs() {
    let Some(mut accel) = Accel::cgroup_only("max_sockets_daemon") else {
        return;
    };
    let log = std::env::temp_dir().join(format!("meshlane-max-sockets-{}.log", std::process::id()));
    let capacity = |accel: &Accel, map: &str| {
        let (_, body) = accel.http_get("/metrics").expect("/metrics");
        sample(&body, &format!("meshlane_map_capacity{{map=\"{map}\"}}"))
    };
    let start = |accel: &Accel, n: &str| {
        let d = Daemon(
            accel
                .run_command()
                .args(["--max-sockets", n])
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        accel.wait_ready();
        d
    };

    let mut d = start(&accel, "32");
    assert_eq!(capacity(&accel, "ML_SOCKS"), Some(32.0));
    assert_eq!(capacity(&accel, "ML_TARGETS"), Some(32.0));
    assert_eq!(capacity(&accel, "ML_RENDEZVOUS"), Some(32.0));
    assert_eq!(capacity(&accel, "ML_UNREAD"), Some(64.0));
    assert!(d.terminate().success());

    let mut d = start(&accel, "64");
    assert_eq!(
        capacity(&accel, "ML_SOCKS"),
        Some(32.0),
        "adopted at their size"
    );
    assert_eq!(
        capacity(&accel, "ML_UNREAD"),
        Some(64.0),
        "adopted at their size"
    );
    assert!(d.terminate().success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("the adopted maps keep the size they were made with")
            && said.contains("asked=64"),
        "the log says why --max-sockets did not apply:\n{said}"
    );

    accel.detach();
    let mut d = start(&accel, "64");
    assert_eq!(
        capacity(&accel, "ML_SOCKS"),
        Some(64.0),
        "made anew after detach"
    );
    assert!(d.terminate().success());
    let _ = std::fs::remove_file(&log);
}

/// The pinned unread counts (socket address -> redirected bytes not read yet).
fn unread_counts(accel: &Accel) -> Vec<(u64, i64)> {
    use aya::maps::{HashMap, Map, MapData};
    let pin = MapData::from_pin(accel.pin_dir.join(meshlane_common::maps::UNREAD)).unwrap();
    let unread: HashMap<MapData, u64, i64> = HashMap::try_from(Map::HashMap(pin)).unwrap();
    unread.iter().filter_map(Result::ok).collect()
}

/// The read tracer skips a socket whose read-hint slot is empty (docs/DESIGN.md, "The read
/// tracer"). So every socket that may receive redirected bytes must be counted in its slot while
/// it is open, its reads must still be counted, and nothing may stay counted once it closed: a
/// count left behind costs lookups on the whole node for good; a missing one makes the tracer
/// skip real reads, and a reader that keeps up looks stopped and is moved to TCP.
#[test]
fn read_hints_count_every_receiving_socket_while_it_lives() {
    let Some(mut accel) = Accel::new("leaks_read_hints") else {
        return;
    };
    let mesh = TwoPods::new(151, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    let fresh = accel.dp().read_hints().unwrap();
    assert!(fresh.enabled, "a fresh load trusts its hints: {fresh:?}");
    assert_eq!((fresh.entries, fresh.counted), (0, 0), "{fresh:?}");

    // Ping-pong past FOLD_EVERY messages, so each sidecar end is charged what it was sent.
    const N: usize = 10;
    const ROUNDS: u64 = 2 * meshlane_common::FOLD_EVERY as u64;
    let mut open = Vec::new();
    for i in 0..N {
        let mut s = connect(&mesh.client.ns, dst).unwrap();
        for r in 0..ROUNDS {
            let data = pattern(i as u64 * ROUNDS + r, 300);
            s.write_all(&data).unwrap();
            let mut back = vec![0u8; data.len()];
            s.read_exact(&mut back).unwrap();
            assert_same(&format!("connection {i} round {r}"), &back, &data);
        }
        open.push(s);
    }
    let c = accel.counters();
    assert_accelerated("read_hints", &c);
    assert_eq!(c.get("pairs_outbound"), N as u64, "{c:?}");

    // Each hop's sidecar end receives redirected bytes: two entries per connection, each
    // counted exactly once in its slot.
    let hints = accel.dp().read_hints().unwrap();
    assert!(hints.enabled, "{hints:?}");
    assert_eq!(hints.entries, 2 * N as u64, "{hints:?}");
    assert_eq!(hints.counted, hints.entries as i64, "{hints:?}");
    assert_eq!(hints.uncovered, 0, "{hints:?}");
    assert_eq!(
        hints.seeded, 0,
        "nothing to seed on a fresh load: {hints:?}"
    );
    // Everything sent was read back, so what the tracer counted as read covers what sk_msg
    // charged: a skipped read would leave a charge standing.
    let counts = unread_counts(&accel);
    assert!(
        counts.iter().all(|(_, unread)| *unread <= 0),
        "reads of paired sockets went uncounted: {counts:?}"
    );

    close_all_then(
        open,
        &mut accel,
        "counts left after every connection closed",
        |a| {
            let h = a.dp().read_hints().unwrap();
            (h.entries == 0 && h.counted == 0, format!("{h:?}"))
        },
    );
}

/// Pins adopted from another build may hold unread entries its sock_ops never counted in the
/// read hints (an earlier build had no hints at all). The adopting daemon must not let the
/// tracer trust the hints until every such entry is covered: it marks their slots, then turns
/// the hints on. A daemon restarting on its own build's pins keeps them as they are.
#[test]
fn adopted_pins_get_hints_for_entries_another_build_made() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use meshlane_common::{maps, CONTROL_FLAGS, CONTROL_READ_HINTS};
    let Some(mut accel) = Accel::new("read_hints_adopted") else {
        return;
    };
    // Stand in for another build: entries made without a count, and the hints bit off.
    let pin = MapData::from_pin(accel.pin_dir.join(maps::UNREAD)).unwrap();
    let mut unread: HashMap<MapData, u64, i64> = HashMap::try_from(Map::HashMap(pin)).unwrap();
    // Kernel-like addresses, a socket's size apart, as a slab hands them out.
    let keys: Vec<u64> = (0..200).map(|i| 0xffff_8880_1000_0000 + i * 2368).collect();
    for k in &keys {
        unread.insert(k, 0, 0).unwrap();
    }
    let pin = MapData::from_pin(accel.pin_dir.join(maps::CONTROL)).unwrap();
    let mut control: Array<MapData, u32> = Array::try_from(Map::Array(pin)).unwrap();
    let flags = control.get(&CONTROL_FLAGS, 0).unwrap();
    control
        .set(CONTROL_FLAGS, flags & !CONTROL_READ_HINTS, 0)
        .unwrap();
    let before = accel.dp().read_hints().unwrap();
    assert!(!before.enabled, "{before:?}");
    assert_eq!(
        before.uncovered,
        keys.len() as u64,
        "the stand-in's entries are uncounted: {before:?}"
    );

    // A daemon adopts the pins.
    accel.dp = None;
    accel.dp = Some(meshlane::datapath::Datapath::open(&accel.options()).expect("adopt"));
    let after = accel.dp().read_hints().unwrap();
    assert!(after.enabled, "{after:?}");
    assert_eq!(after.uncovered, 0, "every entry covered: {after:?}");
    assert!(
        after.seeded > 0 && after.seeded as usize <= keys.len(),
        "{after:?}"
    );
    assert_eq!(after.counted, 0, "seeds are not counts: {after:?}");

    // Its own build's pins, hints on: adopted as they are, nothing seeded again.
    accel.dp = None;
    accel.dp = Some(meshlane::datapath::Datapath::open(&accel.options()).expect("adopt"));
    let again = accel.dp().read_hints().unwrap();
    assert_eq!(again, after);
    for k in &keys {
        unread.remove(k).unwrap();
    }
}
