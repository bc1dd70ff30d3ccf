//! What the daemon asks of a discovery source: one read at a time. A new source is one file
//! that implements [`Source`]; the daemon then applies the namespace filter and folds the
//! operator's pod list (`--config`) over whatever the source read.

use std::{collections::BTreeMap, net::IpAddr};

use super::Discovery;

/// A source's health after a read, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Broken: the last good state is kept, the error shown.
    Failed(String),
    /// Working but held back (an API server's 429): the last good state is kept.
    Degraded(String),
    /// Not ready yet (before its first complete list).
    Waiting(String),
}

/// What one read gave.
#[derive(Debug, Default)]
pub struct Reading {
    /// The pods and declined namespaces found. None: the source has nothing trustworthy yet (not
    /// synced, or it could not read at all), and the daemon leaves the maps as they are, so
    /// nothing is removed before the source knows.
    pub discovery: Option<Discovery>,
    /// Health by source name: a source may report on a helper it uses too (the Kubernetes
    /// source on its xDS cross-check).
    pub health: Vec<(&'static str, Health)>,
    /// Per pod name: its UID and IPs, where the source knows them (Kubernetes), for status.
    pub identities: BTreeMap<String, (String, Vec<IpAddr>)>,
}

/// A place pods come from.
pub trait Source: Send {
    /// The name status and metrics attribute its pods to.
    fn name(&self) -> &'static str;
    /// Reads what the source knows now. Never blocks for long and never panics on the
    /// source's input: errors go into [`Reading::health`].
    fn read(&mut self) -> Reading;
}
