//! The maps the agent fills and the programs read. Names, keys and values are
//! the contract in `weft-common`.
//!
//! The maps are BTF-defined (section `.maps`, libbpf's layout) rather than
//! aya-ebpf's legacy `bpf_map_def` kind, for two things the legacy kind
//! cannot carry: the key and value types, so the kernel knows them and
//! `bpftool map dump` prints named fields, and `pinning = LIBBPF_PIN_BY_NAME`,
//! so the loader pins each map under its name and a restarted agent adopts
//! the maps of the running datapath instead of emptying them under traffic.
//! (aya-ebpf 0.2's own BTF maps have no pinning attribute; aya's loader
//! reads it.)

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_map_type::{
            BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH,
            BPF_MAP_TYPE_PERCPU_ARRAY,
        },
        BPF_F_NO_PREALLOC, BPF_NOEXIST,
    },
    helpers::generated::{bpf_map_delete_elem, bpf_map_lookup_elem, bpf_map_update_elem},
    macros::btf_map,
    maps::lpm_trie::Key,
};
use weft_common::{
    DataplaneConfig, EndpointEntry, EndpointKey, FlowEntry, FlowKey, LeaseEntry, NatClaim,
    NatEntry, NatKey, NatState, PeerEntry, PeerKey, StackPod, COUNTER_SLOTS, MAX_ENDPOINTS, MAX_LEASES,
    MAX_NAT, MAX_NAT_CLAIMS, MAX_NAT_EXCLUDE, MAX_STACK_FLOWS,
};

/// LIBBPF_PIN_BY_NAME (libbpf.h): pin the map as `<pin dir>/<map name>`.
const PIN_BY_NAME: usize = 1;
/// -EEXIST, as a map update returns it.
const EEXIST: i64 = -17;

/// A BTF map definition. Each field encodes one attribute for the loader:
/// integers as the length of the pointed-to array, key and value as the
/// pointed-to types. Nothing here is ever dereferenced.
#[repr(C)]
pub struct MapDef<
    K,
    V,
    const TYPE: usize,
    const MAX_ENTRIES: usize,
    const FLAGS: usize,
    const PINNING: usize,
> {
    r#type: *const [i32; TYPE],
    key: *const K,
    value: *const V,
    max_entries: *const [i32; MAX_ENTRIES],
    map_flags: *const [i32; FLAGS],
    pinning: *const [i32; PINNING],
}

// SAFETY: the definition holds no data; the kernel owns the map behind it.
unsafe impl<K, V, const T: usize, const M: usize, const F: usize, const P: usize> Sync
    for MapDef<K, V, T, M, F, P>
{
}

impl<K, V, const T: usize, const M: usize, const F: usize, const P: usize>
    MapDef<K, V, T, M, F, P>
{
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    /// The value stored under `key`, as a pointer into the map.
    #[inline(always)]
    fn lookup(&self, key: &K) -> Option<*mut V> {
        // SAFETY: `self` is a map the loader relocated; `key` has the map's key type.
        let value = unsafe {
            bpf_map_lookup_elem(
                ptr::from_ref(self).cast_mut().cast::<c_void>(),
                ptr::from_ref(key).cast(),
            )
        };
        (!value.is_null()).then_some(value.cast())
    }

    /// Stores `value` under `key` with update `flags`; true if it was stored.
    #[inline(always)]
    fn update(&self, key: &K, value: &V, flags: u64) -> bool {
        self.update_errno(key, value, flags) == 0
    }

    /// `bpf_map_update_elem`'s result: 0, or a negative errno.
    #[inline(always)]
    fn update_errno(&self, key: &K, value: &V, flags: u64) -> i64 {
        // SAFETY: `self` is a map the loader relocated; key and value have its types.
        unsafe {
            bpf_map_update_elem(
                ptr::from_ref(self).cast_mut().cast::<c_void>(),
                ptr::from_ref(key).cast(),
                ptr::from_ref(value).cast(),
                flags,
            )
        }
    }

    /// Stores `value` under `key` unless the key is there already; true if it was stored.
    #[inline(always)]
    fn insert_new(&self, key: &K, value: &V) -> bool {
        self.update(key, value, BPF_NOEXIST.into())
    }

    /// Stores `value` under `key`, replacing what is there; true if it was stored.
    #[inline(always)]
    fn set(&self, key: &K, value: &V) -> bool {
        self.update(key, value, 0) // BPF_ANY
    }

    /// Removes the entry under `key`, if any.
    #[inline(always)]
    fn delete(&self, key: &K) {
        // SAFETY: `self` is a map the loader relocated; `key` has the map's key type.
        unsafe {
            bpf_map_delete_elem(
                ptr::from_ref(self).cast_mut().cast::<c_void>(),
                ptr::from_ref(key).cast(),
            )
        };
    }

    /// A copy of the value stored under `key`: the agent may replace the
    /// entry at any time, and a copy cannot change between two reads.
    #[inline(always)]
    fn get(&self, key: &K) -> Option<V>
    where
        V: Copy,
    {
        // SAFETY: a non-null lookup result points at a value of type V.
        self.lookup(key).map(|value| unsafe { *value })
    }
}

/// Remote leases by subnet: longest-prefix match on a pod destination.
/// The kernel requires BPF_F_NO_PREALLOC for LPM tries.
#[btf_map(name = "leases")]
static LEASES: MapDef<
    Key<[u8; 4]>,
    LeaseEntry,
    { BPF_MAP_TYPE_LPM_TRIE as usize },
    { MAX_LEASES as usize },
    { BPF_F_NO_PREALLOC as usize },
    PIN_BY_NAME,
> = MapDef::new();

/// Public IPs of the nodes that hold leases: the only VXLAN sources accepted.
#[btf_map(name = "peers")]
static PEERS: MapDef<
    PeerKey,
    PeerEntry,
    { BPF_MAP_TYPE_HASH as usize },
    { MAX_LEASES as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// Local pods by IP: where decapsulated and routed packets are delivered.
#[btf_map(name = "endpoints")]
static ENDPOINTS: MapDef<
    EndpointKey,
    EndpointEntry,
    { BPF_MAP_TYPE_HASH as usize },
    { MAX_ENDPOINTS as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// The node's settings, entry 0.
#[btf_map(name = "config")]
static CONFIG: MapDef<u32, DataplaneConfig, { BPF_MAP_TYPE_ARRAY as usize }, 1, 0, PIN_BY_NAME> =
    MapDef::new();

/// One `u64` per CPU and per `Counter`: plain increments, no atomics.
#[btf_map(name = "counters")]
static COUNTERS: MapDef<
    u32,
    u64,
    { BPF_MAP_TYPE_PERCPU_ARRAY as usize },
    { COUNTER_SLOTS as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// Connections the node's stack carries (see `flow`): written by the programs, read by
/// the programs, removed by the agent once conntrack has forgotten them. Never evicted:
/// an entry lost while its connection lives would send that connection's replies past
/// the stack that translates them.
#[btf_map(name = "stack_flows")]
static STACK_FLOWS: MapDef<
    FlowKey,
    FlowEntry,
    { BPF_MAP_TYPE_HASH as usize },
    { MAX_STACK_FLOWS as usize },
    { BPF_F_NO_PREALLOC as usize },
    PIN_BY_NAME,
> = MapDef::new();

/// Local pods with a stack connection `stack_flows` had no room for (see `flow`).
#[btf_map(name = "stack_pods")]
static STACK_PODS: MapDef<
    EndpointKey,
    StackPod,
    { BPF_MAP_TYPE_HASH as usize },
    { MAX_ENDPOINTS as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// Source NAT, a pod's flow → the node's address and port (see `nat`).
#[btf_map(name = "nat")]
static NAT: MapDef<
    NatKey,
    NatEntry,
    { BPF_MAP_TYPE_HASH as usize },
    { MAX_NAT as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// Source NAT, the replies' flow → the pod's address and port.
#[btf_map(name = "nat_reverse")]
static NAT_REVERSE: MapDef<
    NatKey,
    NatEntry,
    { BPF_MAP_TYPE_HASH as usize },
    { MAX_NAT as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// Claims on NAT ports changing hands (see `NatClaim`).
#[btf_map(name = "nat_claims")]
static NAT_CLAIMS: MapDef<
    NatClaim,
    u8,
    { BPF_MAP_TYPE_LRU_HASH as usize },
    { MAX_NAT_CLAIMS as usize },
    0,
    PIN_BY_NAME,
> = MapDef::new();

/// Destinations pod traffic reaches with its pod address (`--masquerade-exclude`).
#[btf_map(name = "nat_exclude")]
static NAT_EXCLUDE: MapDef<
    Key<[u8; 4]>,
    u32,
    { BPF_MAP_TYPE_LPM_TRIE as usize },
    { MAX_NAT_EXCLUDE as usize },
    { BPF_F_NO_PREALLOC as usize },
    PIN_BY_NAME,
> = MapDef::new();

/// How many mappings the NAT table holds, entry 0.
#[btf_map(name = "nat_state")]
static NAT_STATE: MapDef<u32, NatState, { BPF_MAP_TYPE_ARRAY as usize }, 1, 0, PIN_BY_NAME> =
    MapDef::new();

/// The mapping of a pod's flow, as a pointer into the map (its timestamps are updated).
#[inline(always)]
pub fn nat(key: &NatKey) -> Option<*mut NatEntry> {
    NAT.lookup(key)
}

/// The mapping of a reply's flow back to the pod.
#[inline(always)]
pub fn nat_reverse(key: &NatKey) -> Option<*mut NatEntry> {
    NAT_REVERSE.lookup(key)
}

/// Stores a new mapping pair: the reverse one first, so that a port another flow holds
/// is refused atomically (BPF_NOEXIST). False if the port is taken; if the flow itself
/// got a mapping on another CPU meanwhile, that one is kept and `entry` of it returned.
#[inline(always)]
pub fn nat_insert(
    key: &NatKey,
    entry: &NatEntry,
    reverse_key: &NatKey,
    reverse: &NatEntry,
) -> Option<NatEntry> {
    if !NAT_REVERSE.insert_new(reverse_key, reverse) {
        return None;
    }
    if NAT.insert_new(key, entry) {
        if let Some(state) = NAT_STATE.lookup(&0) {
            // SAFETY: a non-null lookup result points at the array's value; a lost
            // increment between CPUs only delays the agent's exact count.
            unsafe { (*state).entries += 1 };
        }
        return Some(*entry);
    }
    NAT_REVERSE.delete(reverse_key);
    NAT.get(key)
}

/// Gives a claimed port (see [`nat_claim`]) to the flow `key`: the old holder's mapping
/// (`old_key`) goes. The count stays.
#[inline(always)]
pub fn nat_take_over(old_key: &NatKey, key: &NatKey, entry: &NatEntry) -> Option<NatEntry> {
    NAT.delete(old_key);
    if NAT.insert_new(key, entry) {
        return Some(*entry);
    }
    NAT.get(key)
}

/// Forgets a pod flow's mapping whose port went to another flow.
#[inline(always)]
pub fn nat_forget(key: &NatKey) {
    NAT.delete(key);
}

/// Claims the port whose replies' key is `reply` from its holder as read (`holder`): true
/// for the one program that claims it first (see [`NatClaim`]); it must then change the
/// holder's entry, which retires the claim.
#[inline(always)]
pub fn nat_claim(reply: &NatKey, holder: &NatEntry) -> bool {
    let claim = NatClaim {
        reply: *reply,
        holder: *holder,
    };
    NAT_CLAIMS.insert_new(&claim, &1)
}

/// Replaces the `nat_reverse` entry of a claimed port (atomically, for readers on other
/// CPUs).
#[inline(always)]
pub fn nat_reverse_set(reply: &NatKey, entry: &NatEntry) -> bool {
    NAT_REVERSE.set(reply, entry)
}

/// How many mappings the table holds (as the programs and the agent last counted).
#[inline(always)]
pub fn nat_entries() -> u64 {
    NAT_STATE.get(&0).map_or(0, |s| s.entries)
}

/// Whether pod traffic to `ip` keeps its pod address.
#[inline(always)]
pub fn nat_excluded(ip: [u8; 4]) -> bool {
    NAT_EXCLUDE.lookup(&Key::new(32, ip)).is_some()
}

/// The node's settings (a copy: an agent update cannot tear it mid-packet).
#[inline(always)]
pub fn config() -> Option<DataplaneConfig> {
    CONFIG.get(&0)
}

/// The lease whose subnet holds `ip`.
#[inline(always)]
pub fn lease(ip: [u8; 4]) -> Option<LeaseEntry> {
    LEASES.get(&Key::new(32, ip))
}

/// Whether `ip` is the public IP of a node that holds a lease.
#[inline(always)]
pub fn is_peer(ip: [u8; 4]) -> bool {
    PEERS.lookup(&PeerKey { public_ip: ip }).is_some()
}

/// The local pod that owns `ip`.
#[inline(always)]
pub fn endpoint(ip: [u8; 4]) -> Option<EndpointEntry> {
    ENDPOINTS.get(&EndpointKey { pod_ip: ip })
}

/// This CPU's slot of counter `index`.
#[inline(always)]
pub fn counter_slot(index: u32) -> Option<*mut u64> {
    COUNTERS.lookup(&index)
}

/// Whether `key` is a connection the stack carries.
#[inline(always)]
pub fn stack_flow(key: &FlowKey) -> bool {
    STACK_FLOWS.lookup(key).is_some()
}

/// What became of a connection to record.
pub enum Recorded {
    New,
    Known,
    /// `stack_flows` had no room (or no memory) for it.
    NoRoom,
}

/// Records `key` as a connection the stack carries (the caller looked it up already).
#[inline(always)]
pub fn record_stack_flow(key: &FlowKey, recorded_by: u32, now_ns: u64) -> Recorded {
    let entry = FlowEntry {
        recorded_by,
        _pad: 0,
        recorded_ns: now_ns,
    };
    match STACK_FLOWS.update_errno(key, &entry, BPF_NOEXIST.into()) {
        0 => Recorded::New,
        // Another CPU recorded it first.
        EEXIST => Recorded::Known,
        _ => Recorded::NoRoom,
    }
}

/// Whether the pod `ip` takes the kernel path for all its traffic (`stack_pods`).
#[inline(always)]
pub fn pod_on_stack(ip: [u8; 4]) -> bool {
    STACK_PODS.lookup(&EndpointKey { pod_ip: ip }).is_some()
}

/// Puts the pod `ip` on the kernel path for all its traffic. The map holds one entry per
/// possible local pod, so this cannot run out of room.
#[inline(always)]
pub fn put_pod_on_stack(ip: [u8; 4], now_ns: u64) {
    STACK_PODS.set(&EndpointKey { pod_ip: ip }, &StackPod { since_ns: now_ns });
}
