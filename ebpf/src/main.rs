//! weft's eBPF datapath. For now: one TC classifier that counts the packets it
//! sees on the ingress of pod-facing interfaces and lets them through.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use weft_common::{Counter, COUNTER_SLOTS};

/// Datapath counters, one `u64` per CPU and per [`Counter`] (no atomics needed).
#[map]
static WEFT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[classifier]
pub fn from_pod(_ctx: TcContext) -> i32 {
    count(Counter::PacketsSeen);
    TC_ACT_OK
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = WEFT_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the slot belongs to this CPU and the program cannot be
        // preempted on it while it runs.
        unsafe { *slot += 1 }
    }
}

/// The kernel checks GPL-only helpers against this; aya defaults to "GPL"
/// when the section is missing, so state it explicitly.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to here.
    loop {}
}
