//! The `meshlane.v1` API: what the daemon serves on its unix socket and `meshlane status` reads.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("meshlane.v1");
}
