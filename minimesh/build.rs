//! Generates the tonic client and server for `proto/echo.proto`.
//!
//! The .proto is parsed by `protox`, a protobuf compiler written in Rust, so
//! building needs no `protoc` binary on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/echo.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The client and server are wired to sockets by hand (see grpc.rs),
        // so the `connect(uri)` helpers that need tonic's transport are not generated.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
