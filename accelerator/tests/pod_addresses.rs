//! The daemon's map of this node's pod addresses, which decides where the sidecar hop may
//! stamp: two meshes on one node whose pods have identical addresses (separate networks, as
//! two clusters' pods or two VRFs can), run by the real daemon from a pod list. An address two
//! accelerated pods share tells nothing about which pod a connection reaches, so the sidecar
//! hop leaves it alone (the app hops, paired inside each pod, are unaffected); once the
//! address is unique again the same traffic takes the sidecar hop.

mod support;

use std::{net::SocketAddrV4, path::PathBuf};

use meshlane::datapath;
use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

const APP_PORT: u16 = 8080;
/// Connections per mesh and phase.
const N: u64 = 20;

fn pod_list(meshes: &[&TwoPods]) -> String {
    let mut out = String::new();
    for (i, m) in meshes.iter().enumerate() {
        for (role, pod) in [("client", &m.client), ("server", &m.server)] {
            out.push_str(&format!(
                "[[pod]]\nname = \"mesh{i}/{role}\"\nnetns = \"{}\"\n\n",
                pod.ns.path().display()
            ));
        }
    }
    out
}

/// `N` checked echo exchanges in each mesh at the same time (each mesh's own data, so a byte
/// crossing meshes fails the check).
fn traffic(meshes: &[&TwoPods], phase: u64) {
    std::thread::scope(|s| {
        for (which, m) in meshes.iter().enumerate() {
            s.spawn(move || {
                let dst = SocketAddrV4::new(m.server.ip, APP_PORT);
                for i in 0..N {
                    let seed = phase * 100_000 + (which as u64 + 1) * 1_000 + i;
                    checked_echo(connect(&m.client.ns, dst).unwrap(), dst, seed, 32 * 1024);
                }
            });
        }
    });
}

#[test]
fn identical_pod_addresses_keep_the_sidecar_hop_off_until_unique() {
    let Some(accel) = Accel::cgroup_only("pod_addresses") else {
        return;
    };
    let subnet = 119;
    let a = TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let b = TwoPods::new(subnet, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    assert_eq!((a.client.ip, a.server.ip), (b.client.ip, b.server.ip));
    let _echo: Vec<EchoServer> = [&a, &b]
        .iter()
        .map(|m| {
            EchoServer::spawn_checked(&m.server.ns, SocketAddrV4::new(m.server.ip, APP_PORT))
                .unwrap()
        })
        .collect();
    let dir: PathBuf =
        std::env::temp_dir().join(format!("meshlane-pod-addresses-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, log) = (dir.join("pods.toml"), dir.join("daemon.log"));
    std::fs::write(&config, pod_list(&[&a, &b])).unwrap();
    // About the address map, not the start-up probe's verdict on this kernel: --force.
    let mut daemon = start_forced_daemon(&accel, &config, &log);
    wait_until("the daemon to list all four pods", || {
        datapath::pinned_pods(&accel.pin_dir).is_ok_and(|p| p.len() == 4)
    });

    // Both meshes' addresses are each held by two pods: none is in the map.
    traffic(&[&a, &b], 1);
    let c = accel.counters();
    assert_eq!(c.get("pairs_outbound"), 2 * N, "{c:?}");
    assert_eq!(c.get("pairs_inbound"), 2 * N, "{c:?}");
    assert_eq!(
        c.get("pairs_sidecar"),
        0,
        "stamped toward an address two pods share: {c:?}"
    );
    assert_eq!(c.get("pair_rejected"), 0, "{c:?}");
    let logged = std::fs::read_to_string(&log).unwrap();
    for ip in [a.client.ip, a.server.ip] {
        assert!(
            logged.contains(&format!("ip={ip}"))
                && logged.contains("several accelerated pods have this address"),
            "the log names the shared address {ip}:\n{logged}"
        );
    }
    assert!(
        datapath::pinned_pod_ips(&accel.pin_dir).unwrap().is_empty(),
        "no shared address in the map"
    );

    // Mesh b leaves the list: mesh a's addresses are unique, and its sidecar hop pairs.
    std::fs::write(&config, pod_list(&[&a])).unwrap();
    wait_until("the daemon to list mesh a alone", || {
        datapath::pinned_pod_ips(&accel.pin_dir).is_ok_and(|ips| ips.len() == 2)
    });
    let before = accel.counters();
    traffic(&[&a], 2);
    let c = accel.counters();
    assert_eq!(
        c.get("pairs_sidecar") - before.get("pairs_sidecar"),
        N,
        "with unique addresses every sidecar hop pairs: {c:?}"
    );
    assert!(daemon.terminate().success());
    std::fs::remove_dir_all(&dir).ok();
}
