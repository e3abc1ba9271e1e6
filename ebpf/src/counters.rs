//! Every packet a program sees ends in exactly one counter: the verdict
//! helpers below count and return the TC action together, so no path can
//! return without counting.

use aya_ebpf::bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};
use weft_common::Counter;

use crate::maps;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = maps::counter_slot(counter.index()) {
        // SAFETY: the slot belongs to this CPU and the program is not
        // preempted on it while it runs.
        unsafe { *slot += 1 }
    }
}

/// Hands the packet to the kernel stack unchanged. TC_ACT_UNSPEC rather than TC_ACT_OK:
/// later TC filters on the hook (a chained `bandwidth` plugin's, say) still run.
#[inline(always)]
pub fn pass() -> i32 {
    count(Counter::Passed);
    TC_ACT_UNSPEC
}

/// Hands the packet to the kernel stack unchanged, counted under `reason` (a pass with a
/// reason of its own).
#[inline(always)]
pub fn pass_as(reason: Counter) -> i32 {
    count(reason);
    TC_ACT_UNSPEC
}

/// Hands a packet of a connection the node's stack carries to the kernel path.
#[inline(always)]
pub fn stack_flow() -> i32 {
    count(Counter::StackFlow);
    TC_ACT_UNSPEC
}

/// Drops the packet, recording why.
#[inline(always)]
pub fn drop(reason: Counter) -> i32 {
    count(reason);
    TC_ACT_SHOT
}

/// Counts `counter` for a packet handed to a redirect helper, whose return
/// value `action` is TC_ACT_REDIRECT, or TC_ACT_SHOT when it refused.
#[inline(always)]
pub fn redirected(counter: Counter, action: i64) -> i32 {
    if action == i64::from(TC_ACT_REDIRECT) {
        count(counter);
        TC_ACT_REDIRECT
    } else {
        drop(Counter::DropHelperFailed)
    }
}
