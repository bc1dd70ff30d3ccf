//! The `meshlane.v1` API: what the daemon serves on its unix socket and `meshlane status` reads.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("meshlane.v1");
}

/// `meshlane/v1/meshlane.proto` and its imports as an encoded `FileDescriptorSet`, for the
/// daemon's gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("meshlane_v1_descriptor");
