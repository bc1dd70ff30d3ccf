//! The suites' results as data: each runner (`relay.rs`, `suite.rs`) fills these in, and the
//! reports (`report.rs`; `summary.rs`, `hdrlog.rs`) read them, so data flows one way and no
//! report imports a runner.

pub mod relay;
pub mod suite;
