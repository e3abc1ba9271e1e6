//! Types shared by the weft agent (userspace, feature `user`) and its eBPF
//! programs (`weft-ebpf`): map names, map keys and values, constants.
//!
//! Everything here is `#[repr(C)]` plain data so that both sides agree on the
//! layout byte for byte. Map key/value structs get `unsafe impl aya::Pod`
//! under `#[cfg(feature = "user")]` (the counters map uses `u32`/`u64`, which
//! already are).
#![no_std]

/// Name of the per-CPU array of datapath counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "WEFT_COUNTERS";

/// Name of the TC classifier attached to the ingress of pod-facing interfaces.
pub const PROG_FROM_POD: &str = "from_pod";

/// Index of one datapath counter in [`COUNTERS_MAP`]. Each slot holds a `u64`
/// per CPU; readers sum over CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen by `from_pod`.
    PacketsSeen = 0,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 1] = [Counter::PacketsSeen];

    /// The slot of this counter in [`COUNTERS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of slots in [`COUNTERS_MAP`] (its `max_entries`).
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;
