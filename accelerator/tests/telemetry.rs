//! What the daemon tells the outside, checked against real traffic: `meshlane status` (the
//! meshlane.v1 API on a unix socket) and `/metrics`, linted by `promtool` and scraped by a real
//! Prometheus, must agree with the kernel's counters after byte-exact streams through both hops.

mod support;

use std::{
    io::Write,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

const APP_PORT: u16 = 8080;
const N: u64 = 4;
const SIZE: usize = 256 * 1024;

fn health_and_reflection_answer(socket: &Path) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = meshlane::telemetry::api::connect(socket).await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in ["", "meshlane.v1.MeshlaneService"] {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
                .into_inner();
            assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
        }
        let ask = |request: MessageRequest| {
            let mut client = ServerReflectionClient::new(channel.clone());
            async move {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                client
                    .server_reflection_info(tokio_stream::iter([request]))
                    .await
                    .expect("reflection stream")
                    .into_inner()
                    .message()
                    .await
                    .expect("reflection answer")
                    .and_then(|r| r.message_response)
                    .expect("a reflection response")
            }
        };
        let MessageResponse::ListServicesResponse(list) =
            ask(MessageRequest::ListServices(String::new())).await
        else {
            panic!("ListServices answered with something else");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "meshlane.v1.MeshlaneService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(names.contains(&want), "{want} not listed: {names:?}");
        }
        // What grpcurl does next: the file defining a method, then each file it imports.
        let files = |answer: MessageResponse| -> Vec<prost_types::FileDescriptorProto> {
            let MessageResponse::FileDescriptorResponse(files) = answer else {
                panic!("asked for a file, answered with something else");
            };
            files
                .file_descriptor_proto
                .iter()
                .map(|b| prost::Message::decode(b.as_slice()).expect("a FileDescriptorProto"))
                .collect()
        };
        let api = files(
            ask(MessageRequest::FileContainingSymbol(
                "meshlane.v1.MeshlaneService.GetStatus".into(),
            ))
            .await,
        );
        let api = api
            .iter()
            .find(|f| f.name() == "meshlane/v1/meshlane.proto")
            .unwrap_or_else(|| panic!("no meshlane.proto in {api:?}"));
        assert_eq!(api.dependency, ["google/protobuf/timestamp.proto"]);
        for dep in &api.dependency {
            let got = files(ask(MessageRequest::FileByFilename(dep.clone())).await);
            assert!(
                got.iter().any(|f| f.name() == dep),
                "{dep} does not resolve"
            );
        }
        // Clients before reflection v1 (grpcurl < 1.9) ask v1alpha.
        use tonic_reflection::pb::v1alpha as alpha;
        let request = alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let answer = alpha::server_reflection_client::ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("v1alpha reflection stream")
            .into_inner()
            .message()
            .await
            .expect("v1alpha reflection answer")
            .and_then(|r| r.message_response);
        let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer
        else {
            panic!("v1alpha ListServices answered {answer:?}");
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "meshlane.v1.MeshlaneService"),
            "{list:?}"
        );
    });
}

/// A tool the test needs: under CI its absence fails the test; elsewhere the test skips.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "{name} is missing (scripts/setup.sh installs Debian's prometheus package)"
        );
        eprintln!("skipping: {name} is not installed");
    }
    found
}

/// A real Prometheus scraping the daemon every second, in its own data directory; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(bin: &Path, target_port: u16) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("meshlane-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: meshlane\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, port, dir }
    }

    /// The value of an instant query that must return exactly one series.
    fn query_one(&self, promql: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let (code, body) = http_get(self.port, &path).ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn status_and_metrics_match_the_kernel_counters_and_prometheus_scrapes_them() {
    let Some(accel) = Accel::cgroup_only("telemetry") else {
        return;
    };
    let (Some(promtool), Some(prometheus)) = (tool("promtool"), tool("prometheus")) else {
        return;
    };
    let mesh = TwoPods::new(121, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let _app =
        EchoServer::spawn(&mesh.server.ns, SocketAddrV4::new(mesh.server.ip, APP_PORT)).unwrap();
    let dir = std::env::temp_dir().join(format!("meshlane-telemetry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pods.toml");
    std::fs::write(
        &config,
        format!(
            "[[pod]]\nname = \"demo/client\"\nnetns = \"{}\"\n\n[[pod]]\nname = \"demo/server\"\nnetns = \"{}\"\n\n[[pod]]\nname = \"demo/gone\"\nnetns = \"/run/netns/meshlane-no-such-ns\"\n",
            mesh.client.ns.path().display(),
            mesh.server.ns.path().display()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let mut daemon = Daemon(
        accel
            .run_command()
            .args(["--resync", "100ms", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    accel.wait_ready();
    assert!(matches!(accel.http_get("/healthz"), Ok((200, _))));
    wait_until("both pods accelerated", || {
        try_status_json(&accel).is_some_and(|st| {
            st["pods"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["state"] == "accelerated").count() == 2)
        })
    });

    let dst = SocketAddrV4::new(mesh.server.ip, APP_PORT);
    for i in 0..N {
        let s = connect(&mesh.client.ns, dst).expect("connect through the mesh");
        let data = pattern(i + 1, SIZE);
        let out = echo_exchange(s, &data, 16 * 1024).expect("exchange");
        assert_same(&format!("connection {i}"), &out.bytes, &data);
    }
    let all = N * SIZE as u64;
    let kernel = accel.counters();
    assert_accelerated("telemetry", &kernel);

    // Status: per-pod state, reasons and counters, node counters equal to the kernel's.
    let st = status_json(&accel);
    assert_eq!(st["state"], "accelerating", "{st:#}");
    assert_eq!(st["origin"], "loaded");
    assert_eq!(st["probe"]["ok"], true, "{st:#}");
    let pod = |name: &str| {
        st["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no pod {name} in {st:#}"))
            .clone()
    };
    let (client, server, gone) = (pod("demo/client"), pod("demo/server"), pod("demo/gone"));
    assert_eq!(client["counters"]["pairs_outbound"], N, "{client}");
    assert_eq!(
        client["counters"]["redirected_bytes"]["outbound_app_to_sidecar"],
        all
    );
    assert_eq!(server["counters"]["pairs_inbound"], N, "{server}");
    assert_eq!(
        server["counters"]["redirected_bytes"]["inbound_app_to_sidecar"],
        all
    );
    assert_eq!(gone["state"], "not_accelerated");
    assert!(
        gone["reason"].as_str().unwrap().contains("netns not found"),
        "{gone}"
    );
    assert_eq!(
        st["counters"]["pairs_outbound"],
        kernel.get("pairs_outbound")
    );
    assert_eq!(st["sources"][0]["name"], "config");
    assert_eq!(st["sources"][0]["healthy"], true);
    let socks = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ML_SOCKS")
        .expect("sockhash usage");
    assert_eq!(socks["capacity"], 65536);

    // --output json and yaml are the same document (stable names, parsed back).
    let doc = |format: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_meshlane"))
            .args(["status", "--output", format, "--api-socket"])
            .arg(&accel.api_socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "status --output {format}");
        match format {
            "json" => serde_json::from_slice(&out.stdout).expect("status --output json is JSON"),
            _ => serde_norway::from_slice(&out.stdout).expect("status --output yaml is YAML"),
        }
    };
    let (json, yaml) = (doc("json"), doc("yaml"));
    for d in [&json, &yaml] {
        let keys: Vec<_> = d.as_object().unwrap().keys().cloned().collect();
        let want: Vec<_> = st.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, want, "the documents carry the same fields as --json");
        assert_eq!(d["state"], "accelerating");
        assert_eq!(
            d["counters"]["pairs_outbound"],
            st["counters"]["pairs_outbound"]
        );
        let client = d["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "demo/client")
            .unwrap_or_else(|| panic!("no demo/client in {d:#}"));
        assert_eq!(client["counters"]["pairs_outbound"], N);
        assert_eq!(client["state"], "accelerated");
        assert!(d["last_reconcile_unix"].as_f64().unwrap() > 1.7e9, "{d:#}");
    }

    // Every reason has its code, the meshlane_pods label.
    assert_eq!(gone["reason_code"], "netns_not_found", "{gone}");
    assert_eq!(client["reason_code"], "", "{client}");

    // Beside meshlane.v1, the socket serves grpc.health.v1 and reflection, so `grpcurl` needs
    // no .proto file: asked here with tonic's own clients.
    health_and_reflection_answer(&accel.api_socket);

    // The human table says the same.
    let table = Command::new(env!("CARGO_BIN_EXE_meshlane"))
        .args(["status", "--api-socket"])
        .arg(&accel.api_socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("accelerating") && table.contains("demo/gone"),
        "{table}"
    );
    assert!(table.contains("2 accelerated, 1 not"), "{table}");

    // /metrics: lint-clean, and equal to the kernel.
    let (code, body) = accel.http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let mut lint = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    // Every series the chart's alerts query is one this daemon exports (the rules themselves
    // are unit-tested with promtool in scripts/lint-deploy.sh).
    let alerts = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../istio-integration/chart/files/alerts.yaml"
    ))
    .unwrap();
    let exported: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    // Each `expr:` with its folded continuation lines (indented deeper than the key).
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut queried = std::collections::BTreeSet::new();
    let mut expr_at: Option<usize> = None;
    for l in alerts.lines() {
        if l.trim_start().starts_with("expr:") {
            expr_at = Some(indent(l));
        } else if expr_at.is_some_and(|at| l.trim().is_empty() || indent(l) <= at) {
            expr_at = None;
        }
        if expr_at.is_some() {
            queried.extend(
                l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("meshlane_"))
                    .map(str::to_string),
            );
        }
    }
    assert!(
        queried.contains("meshlane_datapath_state") && queried.contains("meshlane_mode"),
        "{queried:?}"
    );
    for name in &queried {
        assert!(
            exported.contains(name.as_str()),
            "the alerts query {name}, which /metrics does not export"
        );
    }
    // The same for the chart's Grafana dashboard: every `expr` of every panel (rows nest
    // panels) and the `node` variable's query. Histogram quantiles query the `_bucket` series,
    // which are sample names in the body like any other.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../istio-integration/chart/files/dashboard.json"
        ))
        .unwrap(),
    )
    .expect("files/dashboard.json is JSON");
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut dashboard_exprs = Vec::new();
    exprs(&dashboard["panels"], &mut dashboard_exprs);
    let node_query = dashboard["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "node"))
        .map(|v| v["query"]["query"].as_str().unwrap_or_default().to_string())
        .expect("a node variable");
    dashboard_exprs.push(node_query);
    let dashboard_queried: std::collections::BTreeSet<&str> = dashboard_exprs
        .iter()
        .flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("meshlane_"))
        .collect();
    assert!(
        dashboard_queried.contains("meshlane_reconcile_duration_seconds_bucket")
            && dashboard_queried.contains("meshlane_pod_redirected_bytes_total")
            && dashboard_queried.contains("meshlane_datapath_state"),
        "{dashboard_queried:?}"
    );
    for name in &dashboard_queried {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
    for (series, want) in [
        ("meshlane_pairs_total{hop=\"outbound\"}", N),
        ("meshlane_pairs_total{hop=\"inbound\"}", N),
        ("meshlane_redirected_bytes_total{direction=\"inbound_app_to_sidecar\"}", all),
        ("meshlane_pod_redirected_bytes_total{pod=\"demo/client\",pod_namespace=\"demo\",pod_name=\"client\",direction=\"outbound_app_to_sidecar\"}", all),
        ("meshlane_pod_redirected_bytes_total{pod=\"demo/client\",pod_namespace=\"demo\",pod_name=\"client\",direction=\"outbound_sidecar_to_app\"}", 0),
        ("meshlane_mode{mode=\"reader\"}", 1),
        ("meshlane_pod_pairs_total{pod=\"demo/server\",pod_namespace=\"demo\",pod_name=\"server\",hop=\"inbound\"}", N),
        ("meshlane_pods{state=\"accelerated\",reason=\"\"}", 2),
        ("meshlane_pods{state=\"not_accelerated\",reason=\"netns_not_found\"}", 1),
        ("meshlane_datapath_state{state=\"accelerating\"}", 1),
        ("meshlane_source_up{source=\"config\"}", 1),
        ("meshlane_map_entries{map=\"ML_POLICY\"}", 2),
    ] {
        assert_eq!(sample(&body, series), Some(want as f64), "{series} in\n{body}");
    }
    assert_eq!(first_sample(&body, "meshlane_probe_ok"), Some(1.0));
    // A fresh load trusts its read hints, wherever a read tracer is attached.
    if body.contains("meshlane_read_tracer{") {
        assert_eq!(sample(&body, "meshlane_read_hints"), Some(1.0), "{body}");
    }
    // The build's git revision, as the binary's --version says it ("meshlane 0.1.0 (rev)").
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_meshlane"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    let revision = version
        .trim()
        .rsplit_once(" (")
        .and_then(|(_, r)| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no revision in --version: {version:?}"))
        .to_string();
    assert!(!revision.is_empty(), "{version}");
    assert_eq!(
        sample(
            &body,
            &format!(
                "meshlane_build_info{{version=\"{}\",revision=\"{revision}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{body}"
    );
    // Pass durations are histograms; every reconcile so far was observed.
    assert!(
        sample(&body, "meshlane_reconcile_duration_seconds_count").is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(
        body.contains("meshlane_reconcile_duration_seconds_bucket{le=\"+Inf\"}")
            && body.contains("# TYPE meshlane_discovery_pass_duration_seconds histogram"),
        "{body}"
    );

    // A real Prometheus scrapes it (OpenMetrics, negotiated) and sees the same numbers.
    let prom = Prometheus::start(&prometheus, accel.metrics_port);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = prom.query_one("up{job=\"meshlane\"}");
        let bytes = prom.query_one("sum(meshlane_redirected_bytes_total)");
        if up == Some(1.0) && bytes == Some(kernel.redirected_bytes() as f64) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped the expected values (up={up:?}, bytes={bytes:?}, want {}):\n{}",
            kernel.redirected_bytes(),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        // Per-pod series carry pod_namespace and pod_name, what a join with Istio's uses.
        prom.query_one(
            "meshlane_pod_pairs_total{pod_namespace=\"demo\",pod_name=\"client\",hop=\"outbound\"}"
        ),
        Some(N as f64)
    );
    assert_eq!(
        prom.query_one("meshlane_pods{state=\"not_accelerated\"}"),
        Some(1.0)
    );
    drop(prom);

    assert!(daemon.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
}
