//! The read tracer's hints: which sockets it may skip without a hash lookup (docs/DESIGN.md,
//! "The read tracer").
//!
//! sock_ops counts each entry it makes in `ML_UNREAD` in the slot `read_hint_slot(sk)` of
//! `ML_READ_HINTS`, and the tracer skips a socket whose slot is empty. That is exact only for
//! entries this build's sock_ops made. A datapath adopted from another build may hold entries
//! its programs never counted, so adoption turns the hints off (`CONTROL_READ_HINTS`), lets
//! the upgrade put this build's sock_ops in place, marks the slot of every entry it then finds in
//! `ML_READ_SEEDS`, and turns them on again. An entry made meanwhile is made by this build's
//! sock_ops, which counts it. If any step fails the hints stay off: every read is looked up, as
//! before hints existed, which costs time and never a wrong count.

use std::path::Path;

use aya::maps::{Array, HashMap, MapData};
use meshlane_common::{maps, read_hint_slot, CONTROL_FLAGS, CONTROL_READ_HINTS, READ_HINT_SLOTS};

use super::{typed, Error};

/// How the hints stand against the entries they must cover.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadHints {
    /// The tracer trusts the hints (`CONTROL_READ_HINTS`).
    pub enabled: bool,
    /// Entries of `ML_UNREAD`: sockets that may receive redirected bytes.
    pub entries: u64,
    /// The sum of the counts in `ML_READ_HINTS`: equal to `entries` on a datapath this build
    /// loaded, once no socket is joining or closing.
    pub counted: i64,
    /// Slots marked in `ML_READ_SEEDS` (entries another build made).
    pub seeded: u32,
    /// Entries whose slot is empty in both maps: reads the tracer would wrongly skip if the
    /// hints were on. Always 0 while `enabled`.
    pub uncovered: u64,
}

fn control(dir: &Path) -> Result<Array<MapData, u32>, Error> {
    typed(dir, maps::CONTROL)
}

fn set(dir: &Path, on: bool) -> Result<(), Error> {
    let mut control = control(dir)?;
    let map_err = |e: aya::maps::MapError| Error::Map(maps::CONTROL, e.to_string());
    let flags = control.get(&CONTROL_FLAGS, 0).map_err(map_err)?;
    let flags = if on {
        flags | CONTROL_READ_HINTS
    } else {
        flags & !CONTROL_READ_HINTS
    };
    control.set(CONTROL_FLAGS, flags, 0).map_err(map_err)
}

/// Whether the tracer trusts the hints of the datapath pinned under `dir`.
pub(super) fn enabled(dir: &Path) -> Result<bool, Error> {
    let flags = control(dir)?
        .get(&CONTROL_FLAGS, 0)
        .map_err(|e| Error::Map(maps::CONTROL, e.to_string()))?;
    Ok(flags & CONTROL_READ_HINTS != 0)
}

/// A datapath this build just loaded: its maps are empty and only its sock_ops writes them.
pub(super) fn enable_fresh(dir: &Path) -> Result<(), Error> {
    set(dir, true)
}

/// Before the upgrade of an adopted datapath: the tracer stops trusting the hints.
pub(super) fn disable(dir: &Path) -> Result<(), Error> {
    set(dir, false)
}

/// After this build's sock_ops runs on an adopted datapath: marks the slot of every entry
/// another build may have made without counting it, then turns the hints on. Returns how many
/// slots it marked.
pub(super) fn seed_and_enable(dir: &Path) -> Result<u32, Error> {
    let unread: HashMap<MapData, u64, i64> = typed(dir, maps::UNREAD)?;
    let mut seeds: Array<MapData, u8> = typed(dir, maps::READ_SEEDS)?;
    let mut marked = 0;
    for sk in unread.keys() {
        // An entry removed while we walk only costs a key; one added now is counted.
        let Ok(sk) = sk else { continue };
        let slot = u32::from(read_hint_slot(sk));
        if seeds.get(&slot, 0).ok() == Some(1) {
            continue;
        }
        seeds
            .set(slot, 1, 0)
            .map_err(|e| Error::Map(maps::READ_SEEDS, e.to_string()))?;
        marked += 1;
    }
    set(dir, true)?;
    Ok(marked)
}

/// The hints of the datapath pinned under `dir`, against the entries they cover.
pub(super) fn read(dir: &Path) -> Result<ReadHints, Error> {
    let unread: HashMap<MapData, u64, i64> = typed(dir, maps::UNREAD)?;
    let hints: Array<MapData, i32> = typed(dir, maps::READ_HINTS)?;
    let seeds: Array<MapData, u8> = typed(dir, maps::READ_SEEDS)?;
    let hint = |i: u32| {
        hints
            .get(&i, 0)
            .map(i64::from)
            .map_err(|e| Error::Map(maps::READ_HINTS, e.to_string()))
    };
    let seed = |i: u32| {
        seeds
            .get(&i, 0)
            .map_err(|e| Error::Map(maps::READ_SEEDS, e.to_string()))
    };
    let mut out = ReadHints {
        enabled: enabled(dir)?,
        ..ReadHints::default()
    };
    for i in 0..READ_HINT_SLOTS {
        out.counted += hint(i)?;
        out.seeded += u32::from(seed(i)? != 0);
    }
    for sk in unread.keys() {
        let Ok(sk) = sk else { continue };
        out.entries += 1;
        let slot = u32::from(read_hint_slot(sk));
        if hint(slot)? == 0 && seed(slot)? == 0 {
            out.uncovered += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use meshlane_common::{read_hint_slot, READ_HINT_SLOTS};

    /// Socket addresses come from slabs: objects a fixed size apart, sharing all high bits. The
    /// hash must still spread them, or unpaired sockets would share slots with paired ones far
    /// more often than N/16384.
    #[test]
    fn slab_addresses_spread_over_the_slots() {
        const TCP_SOCK: u64 = 2368;
        let addrs: Vec<u64> = (0..2048u64)
            .map(|i| 0xffff_8881_0000_0000 + (i / 13) * 0x8000 + (i % 13) * TCP_SOCK)
            .collect();
        let mut slots: Vec<u16> = addrs.iter().map(|a| read_hint_slot(*a)).collect();
        assert!(slots.iter().all(|s| u32::from(*s) < READ_HINT_SLOTS));
        slots.sort_unstable();
        slots.dedup();
        // Uniform hashing of 2048 keys into 16384 slots leaves about 1925 distinct; a plain
        // multiplicative hash left 1505.
        assert!(slots.len() > 1850, "{} distinct slots", slots.len());
    }
}
