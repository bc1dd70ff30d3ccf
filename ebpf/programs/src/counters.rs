//! Per-CPU counter updates; no atomics needed because each CPU owns its slot.

use crate::maps::ML_COUNTERS;

#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(slot) = ML_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a live per-CPU array element.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub fn inc(index: u32) {
    add(index, 1)
}
