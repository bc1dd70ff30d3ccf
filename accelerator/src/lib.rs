//! meshlane: a node daemon that short-circuits the local hops between each app and its Istio
//! sidecar, and between two sidecars on one node, through a sockhash, without changing where any
//! connection goes. The design (invariants, modes, kernel facts) is docs/DESIGN.md.
//!
//! Data flows one way: `discovery` and `config` (the pod list) -> `model` -> `policy` ->
//! `datapath` (the only module touching the kernel) -> `telemetry` (metrics, status API); `node`
//! reads facts from the node (namespace cookies and addresses); `probe` and `mode` decide, on the
//! running kernel, what may be redirected; `daemon` wires them.
#![deny(unsafe_code)]

pub mod config;
pub mod daemon;
pub mod datapath;
pub mod discovery;
pub mod mode;
pub mod model;
pub mod node;
pub mod policy;
pub mod probe;
pub mod telemetry;
