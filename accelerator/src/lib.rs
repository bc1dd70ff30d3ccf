//! meshlane: a node daemon that short-circuits the localhost hops between each app and its Istio
//! sidecar through a sockhash, without changing where any connection goes.
//!
//! Data flows one way: `config` (the local pod list) -> `model` -> `policy` -> `datapath` (the only
//! module touching the kernel) ; `node` reads facts from the node; `daemon` wires them.
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
