//! The ADS client against a second, independent implementation of the protocol: a scripted
//! server on grpcio and the reference protobufs (PyPI xds-protos, tests/xds/ads_server.py).
//! Good updates must be ACKed, bad ones NACKed with the field named while the last good state
//! stays, and a restarted server must see the client come back and resubscribe. No privileges
//! needed; everything listens on 127.0.0.1.

mod support;

use std::time::{Duration, Instant};

use meshlane::discovery::xds::{Capture, Client, Config, Status};
use serde_json::json;
use support::{free_port, istio_listeners, AdsServer};

fn config(port: u16) -> Config {
    Config {
        server: format!("http://127.0.0.1:{port}"),
        node_id: "sidecar~10.1.2.3~productpage-v1-abc.default~default.svc.cluster.local".into(),
        cluster: "productpage.default".into(),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
    }
}

fn wait_for(client: &Client, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = client.status();
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The server's request log once it holds at least `n` requests (or after 20 s, as it is).
fn logged(server: &AdsServer, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reqs = server.requests();
        if reqs.len() >= n || Instant::now() > deadline {
            return reqs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn good_updates_are_acked_bad_ones_nacked_naming_the_field_and_the_last_good_kept() {
    let Some(py) = AdsServer::python() else {
        return;
    };
    let port = free_port();
    let server = AdsServer::start(
        &py,
        port,
        &json!([
            {"version": "1", "listeners": istio_listeners(15001, 15006, false)},
            {"version": "2", "garbage": true},
            {"version": "3", "listeners": [{"name": "virtualInbound"}]},
            // What Envoy itself NACKs: an address that is not an IP, one name twice.
            {"version": "4", "listeners": [{"name": "web", "port": 80, "address": "not-an-ip"}]},
            {"version": "5", "listeners": [{"name": "web", "port": 80}, {"name": "web", "port": 81}]},
            {"version": "6", "type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster"},
        ]),
        "nack",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let cfg = config(port);
    let client = Client::spawn(cfg.clone());
    let st = wait_for(&client, "one ACK and five NACKs", |s| {
        s.acks == 1 && s.nacks == 5
    });
    // The last good update is what the client holds.
    assert_eq!(
        st.capture,
        Some(Capture {
            outbound_port: Some(15001),
            inbound_port: Some(15006),
            tproxy: false,
            listeners: 3,
        })
    );
    assert_eq!(st.version, "1");
    assert!(st.connected);
    assert!(st.last_error.contains("type_url"), "{st:?}");

    // The client counts a reply before it is on the wire: wait for the server to log it.
    let reqs = logged(&server, 7);
    assert_eq!(reqs.len(), 7, "{reqs:#?}");
    // Subscribe: no version yet, as the sidecar's node, to Listeners.
    assert_eq!(reqs[0]["version_info"], "");
    assert_eq!(reqs[0]["node_id"], cfg.node_id);
    assert_eq!(reqs[0]["type_url"], meshlane::discovery::xds::LISTENER_TYPE);
    // ACK of version 1.
    assert_eq!(
        (&reqs[1]["version_info"], &reqs[1]["response_nonce"]),
        (&json!("1"), &json!("s1-n0"))
    );
    assert!(reqs[1]["error"].is_null());
    // NACKs: the version stays 1, the nonce is the rejected response's, the error names the field.
    for (i, nonce, field) in [
        (2, "s1-n1", "resources[0].value"),
        (3, "s1-n2", "resources[0] (virtualInbound).address"),
        (
            4,
            "s1-n3",
            "resources[0] (web).address.socket_address.address",
        ),
        (5, "s1-n4", "resources[1].name"),
        (6, "s1-n5", "type_url"),
    ] {
        assert_eq!(reqs[i]["version_info"], "1", "{:#}", reqs[i]);
        assert_eq!(reqs[i]["response_nonce"], nonce, "{:#}", reqs[i]);
        assert_eq!(reqs[i]["error"]["code"], 3, "{:#}", reqs[i]);
        let msg = reqs[i]["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "NACK {i} names {field}: {msg}");
    }
}

#[test]
fn a_restarted_server_sees_the_client_come_back_and_resubscribe() {
    let Some(py) = AdsServer::python() else {
        return;
    };
    let port = free_port();
    let first = AdsServer::start(
        &py,
        port,
        &json!([{"version": "7", "listeners": istio_listeners(15001, 15006, false)}]),
        "first",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let client = Client::spawn(config(port));
    wait_for(&client, "the first update", |s| s.acks == 1);
    first.stop();
    let down = wait_for(&client, "the stream to drop", |s| !s.connected);
    assert!(!down.last_error.is_empty());
    assert_eq!(
        down.capture.as_ref().and_then(|c| c.outbound_port),
        Some(15001),
        "the last good state is kept while the server is away"
    );
    // Let a few reconnect attempts fail (backoff), then bring the server back.
    std::thread::sleep(Duration::from_millis(700));
    let second = AdsServer::start(
        &py,
        port,
        &json!([{"version": "8", "listeners": istio_listeners(15011, 15016, false)}]),
        "second",
    );
    let st = wait_for(&client, "the update from the restarted server", |s| {
        s.acks == 2
    });
    assert!(st.connected);
    assert!(st.reconnects >= 1, "{st:?}");
    assert_eq!(st.version, "8");
    assert_eq!(
        st.capture.map(|c| (c.outbound_port, c.inbound_port)),
        Some((Some(15011), Some(15016)))
    );
    let reqs = logged(&second, 2);
    assert_eq!(
        reqs[0]["version_info"], "7",
        "the client resubscribes with the version it holds: {reqs:#?}"
    );
    assert_eq!(reqs[1]["version_info"], "8");
}
