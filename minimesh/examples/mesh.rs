//! Brings up the mini-mesh by hand and keeps it until Enter (or end of input):
//! two pods with istio-init's capture rules and real Envoy sidecars, an echo server on 7000 and
//! nginx on 80 in the server pod. Prints how to reach them; everything is removed on exit.
//!
//!     sudo cargo run -p minimesh --example mesh
//!
//! Then, in another shell, e.g. `meshlane run --config <printed file>` to accelerate it.

use std::{io::BufRead, net::SocketAddrV4};

use minimesh::{envoy::Protocol, nginx::Nginx, EchoServer, EnvoyPods};

fn main() -> anyhow::Result<()> {
    minimesh::require_root()?;
    let services = [
        ("echo".to_string(), 7000, Protocol::Tcp),
        ("web".to_string(), 80, Protocol::Http),
    ];
    let pods = EnvoyPods::new(150, &services)?;
    let _echo = EchoServer::spawn(&pods.server.ns, SocketAddrV4::new(pods.server.ip, 7000))?;
    let _nginx = Nginx::spawn(&pods.server.ns, SocketAddrV4::new(pods.server.ip, 80))?;
    let config = std::env::temp_dir().join(format!("minimesh-pods-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[[pod]]\nname = \"demo/client\"\nnetns = \"{}\"\n\n[[pod]]\nname = \"demo/server\"\nnetns = \"{}\"\n",
            pods.client.ns.path().display(),
            pods.server.ns.path().display()
        ),
    )?;
    println!(
        "client pod: netns {} ip {} (Envoy admin 127.0.0.1:15000 inside)",
        pods.client.ns.name(),
        pods.client.ip
    );
    println!(
        "server pod: netns {} ip {} (echo :7000, nginx :80)",
        pods.server.ns.name(),
        pods.server.ip
    );
    println!("try:   nsenter --net={} python3 -c \"import urllib.request as u; print(len(u.urlopen('http://{}/1k').read()))\"", pods.client.ns.path().display(), pods.server.ip);
    println!("pods:  {} (for meshlane run --config)", config.display());
    println!("press Enter to tear everything down");
    let _ = std::io::stdin().lock().lines().next();
    let _ = std::fs::remove_file(&config);
    Ok(())
}
