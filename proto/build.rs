//! Generates the meshlane.v1 client and server from `meshlane/v1/meshlane.proto`, and the
//! encoded descriptor set that the daemon's gRPC reflection service answers from.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "meshlane/v1/meshlane.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["."])?;
    // With its imports (google/protobuf/timestamp.proto): reflection clients resolve the whole
    // closure from the server.
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("meshlane_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The client dials a unix socket by hand; the `connect(uri)` helpers are not needed.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
