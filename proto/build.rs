//! Generates the meshlane.v1 client and server from `meshlane/v1/meshlane.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "meshlane/v1/meshlane.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The client dials a unix socket by hand; the `connect(uri)` helpers are not needed.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
