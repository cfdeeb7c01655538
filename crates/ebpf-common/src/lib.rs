//! The layouts of svcplane's eBPF maps, shared by the programs (crates/ebpf-programs, built
//! for the BPF target) and user space (crates/dataplane, feature `user`), so they cannot drift.
//!
//! Modelled on Cilium's `lb4_key`/`lb4_service`/`lb4_backend`, socket reverse NAT and
//! affinity maps (bpf/lib/lb.h, bpf/bpf_sock.c), with one difference: one set of maps serves
//! both families. Every address is 16 bytes; an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so a dual-stack IPv6 socket connecting to `::ffff:<ClusterIP>` is
//! translated too.
//!
//! Addresses and ports are in network byte order, as the kernel's `bpf_sock_addr` holds them:
//! an address is its 16 bytes read as four native-endian `u32` words (`user_ip6`), a port its
//! two big-endian bytes read as a native `u16` (the low 16 bits of `user_port`).
#![no_std]

/// Bumped whenever a layout, a map's type or a flag's meaning changes. It is part of every
/// map's and link's pinned name: aya reopens an existing pin without checking its key and
/// value sizes, so a new layout must never find an old pin under the same name.
pub const VERSION: u32 = 1;

/// Service map (hash): [`ServiceKey`] → [`ServiceValue`]. Object names are at most 15 bytes.
pub const MAP_SERVICES: &str = "SVCP_SVC_V1";
/// Backend map (hash): backend id (`u32`) → [`Backend`].
pub const MAP_BACKENDS: &str = "SVCP_BE_V1";
/// Reverse NAT (LRU hash): [`RevNatKey`] → [`RevNatValue`].
pub const MAP_REVNAT: &str = "SVCP_RNAT_V1";
/// ClientIP affinity (LRU hash): [`AffinityKey`] → [`AffinityValue`].
pub const MAP_AFFINITY: &str = "SVCP_AFF_V1";
/// Settings (array of one [`Config`]), written by user space at every start.
pub const MAP_CONFIG: &str = "SVCP_CFG_V1";
/// Every map, for pin cleanup.
pub const MAPS: [&str; 5] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_REVNAT,
    MAP_AFFINITY,
    MAP_CONFIG,
];

/// [`Config::flags`]: translate only sockets of the host network namespace (Cilium's
/// `bpf-lb-sock-hostns-only`); pods' connections then leave with the Service address.
pub const CONFIG_HOSTNS_ONLY: u32 = 1;

/// The programs' settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The cookie of the network namespace svcplane runs in (`SO_NETNS_COOKIE`).
    pub host_netns_cookie: u64,
    pub flags: u32,
    pub pad: u32,
}

/// The programs (function names in the object) and the hook each is attached to.
pub const PROGRAMS: [&str; 8] = [
    "svcp_connect4",
    "svcp_connect6",
    "svcp_sendmsg4",
    "svcp_sendmsg6",
    "svcp_recvmsg4",
    "svcp_recvmsg6",
    "svcp_getpeername4",
    "svcp_getpeername6",
];

/// IANA protocol numbers, as the socket's `protocol`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// [`ServiceValue::flags`]: with no backends, behave as the other modes' DROP (the connect
/// fails with ETIMEDOUT: the client never gets an answer) rather than REJECT (ECONNREFUSED).
pub const FLAG_DROP_WHEN_EMPTY: u8 = 1;
/// [`ServiceValue::flags`]: ClientIP session affinity, timeout in `affinity_timeout`.
pub const FLAG_AFFINITY: u8 = 2;

/// [`ServiceKey::port`] and [`ServiceKey::proto`] of a ClusterIP's wildcard entry (slot 0,
/// count 0): a connect or sendmsg to that address on a port and protocol no Service has
/// fails with ECONNREFUSED, as the other modes reject it (kube-proxy's `cluster-ips-check`).
pub const WILDCARD_PORT: u16 = 0;
pub const WILDCARD_PROTO: u8 = 0;

/// A service frontend (address, port, protocol) and a slot: slot 0 is the service itself
/// (count, flags), slots 1..=count hold its backends' ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// Slot 0: `count`, `svc_id`, `flags`, `affinity_timeout`. Slots ≥ 1: `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub pad0: u16,
    /// The service (and scope: ClusterIP or external addresses) this frontend belongs to;
    /// the affinity key and [`RevNatValue`] carry it (Cilium's `rev_nat_index`).
    pub svc_id: u32,
    /// Seconds.
    pub affinity_timeout: u32,
    pub flags: u8,
    pub pad1: [u8; 3],
}

/// A backend: an endpoint address and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: u16,
}

/// What a connected socket or a datagram's sender looks like after translation: the socket
/// (cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u8; 6],
}

/// The frontend the application asked for, which recvmsg/getpeername give back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: u16,
    pub svc_id: u32,
}

/// ClientIP affinity: the client is its network namespace (the socket's netns cookie: a
/// pod's sockets share one), as Cilium's socket-LB does; the address is not bound yet at
/// connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub svc_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` of the last connection.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `repr(C)` data with explicit padding fields, valid for any bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for Config {}
}

// The layouts are ABI between two compilations: pin their sizes.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<RevNatKey>() == 32);
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<Config>() == 16);
