//! svcplane's socket-level load balancer (`--proxy-mode ebpf`): cgroup v2 sock_addr programs
//! that translate a Service address to a backend once per connection (TCP, connected UDP) or
//! per datagram (unconnected UDP), and translate it back for recvmsg and getpeername, so no
//! packet of an east-west connection is NATed. Cilium's bpf/bpf_sock.c is the model.
//!
//! Built for bpfel-unknown-none by crates/dataplane's build.rs (aya-build); on the host this
//! crate compiles to an empty `main` so the workspace's clippy and tests cover it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::EbpfContext as _;
    use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr};
    use aya_ebpf::helpers::generated::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    };
    use aya_ebpf::macros::{cgroup_sock_addr, map};
    use aya_ebpf::maps::{Array, HashMap, LruHashMap};
    use aya_ebpf::programs::SockAddrContext;
    use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
    use svcplane_ebpf_common::*;

    // Sizes here are placeholders: user space sets every map's size from its flags.
    #[map(name = "SVCP_SVC_V1")]
    static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(1024, BPF_F_NO_PREALLOC);
    #[map(name = "SVCP_BE_V1")]
    static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(1024, BPF_F_NO_PREALLOC);
    #[map(name = "SVCP_RNAT_V1")]
    static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(1024, 0);
    #[map(name = "SVCP_AFF_V1")]
    static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(1024, 0);
    #[map(name = "SVCP_CFG_V1")]
    static CONFIG: Array<Config> = Array::pinned(1, 0);

    const ECONNREFUSED: i32 = 111;
    const ETIMEDOUT: i32 = 110;
    /// Let the call proceed (1); 0 fails it, with the error set by bpf_set_retval (else EPERM).
    const PROCEED: i32 = 1;
    const FAIL: i32 = 0;

    /// `::ffff:0:0` prefix word 2 in network order, read natively.
    const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    // The verifier allows only 32-bit loads and stores of these context fields: volatile
    // accesses keep the compiler from merging or widening them.
    #[inline(always)]
    fn ctx_u32(p: *const u32) -> u32 {
        unsafe { read_volatile(p) }
    }
    #[inline(always)]
    fn set_u32(p: *mut u32, v: u32) {
        unsafe { write_volatile(p, v) }
    }

    /// The destination the application gave, as a 16-byte address (v4 mapped) and port.
    #[inline(always)]
    fn user_dest(sa: *mut bpf_sock_addr, v6: bool) -> ([u32; 4], u16) {
        let addr = unsafe {
            if v6 {
                let p = addr_of!((*sa).user_ip6) as *const u32;
                [
                    ctx_u32(p),
                    ctx_u32(p.add(1)),
                    ctx_u32(p.add(2)),
                    ctx_u32(p.add(3)),
                ]
            } else {
                [0, 0, V4_MAPPED, ctx_u32(addr_of!((*sa).user_ip4))]
            }
        };
        // user_port: a u32 whose low 16 bits hold the big-endian port.
        let port = unsafe { ctx_u32(addr_of!((*sa).user_port)) } as u16;
        (addr, port)
    }

    #[inline(always)]
    fn set_user_dest(sa: *mut bpf_sock_addr, v6: bool, addr: &[u32; 4], port: u16) {
        unsafe {
            if v6 {
                let p = addr_of_mut!((*sa).user_ip6) as *mut u32;
                set_u32(p, addr[0]);
                set_u32(p.add(1), addr[1]);
                set_u32(p.add(2), addr[2]);
                set_u32(p.add(3), addr[3]);
            } else {
                set_u32(addr_of_mut!((*sa).user_ip4), addr[3]);
            }
            set_u32(addr_of_mut!((*sa).user_port), port as u32);
        }
    }

    #[inline(always)]
    fn is_v4_mapped(addr: &[u32; 4]) -> bool {
        addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED
    }

    #[inline(always)]
    fn protocol(sa: *mut bpf_sock_addr) -> Option<u8> {
        let p = unsafe { ctx_u32(addr_of!((*sa).protocol)) };
        if p == PROTO_TCP as u32 || p == PROTO_UDP as u32 {
            Some(p as u8)
        } else {
            None
        }
    }

    /// The backend for a new connection (or datagram) to `svc`: the affine one while its
    /// entry is fresh and it still serves the service, else one picked at random.
    #[inline(always)]
    fn pick(ctx: &SockAddrContext, key: &ServiceKey, svc: &ServiceValue) -> Option<(u32, Backend)> {
        let affinity = svc.flags & FLAG_AFFINITY != 0;
        let now = unsafe { bpf_ktime_get_ns() };
        let akey = AffinityKey {
            netns_cookie: if affinity {
                unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
            } else {
                0
            },
            svc_id: svc.svc_id,
            pad: 0,
        };
        if affinity && let Some(a) = unsafe { AFFINITY.get(&akey) } {
            let age = now.wrapping_sub(a.last_used_ns);
            if age <= svc.affinity_timeout as u64 * 1_000_000_000 {
                let id = a.backend_id;
                // Backend ids are per service: one that still exists still serves it.
                if let Some(b) = unsafe { BACKENDS.get(&id) } {
                    let b = *b;
                    let _ = AFFINITY.insert(
                        &akey,
                        &AffinityValue {
                            last_used_ns: now,
                            backend_id: id,
                            pad: 0,
                        },
                        0,
                    );
                    return Some((id, b));
                }
            }
        }
        let slot = (unsafe { bpf_get_prandom_u32() } % svc.count as u32) as u16 + 1;
        let skey = ServiceKey { slot, ..*key };
        let id = unsafe { SERVICES.get(&skey) }?.backend_id;
        let b = *unsafe { BACKENDS.get(&id) }?;
        if affinity {
            let _ = AFFINITY.insert(
                &akey,
                &AffinityValue {
                    last_used_ns: now,
                    backend_id: id,
                    pad: 0,
                },
                0,
            );
        }
        Some((id, b))
    }

    /// connect and sendmsg: Service address → backend.
    #[inline(always)]
    fn translate(ctx: SockAddrContext, v6: bool) -> i32 {
        let sa = ctx.sock_addr;
        let Some(proto) = protocol(sa) else {
            return PROCEED;
        };
        if let Some(c) = CONFIG.get(0)
            && c.flags & CONFIG_HOSTNS_ONLY != 0
            && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != c.host_netns_cookie
        {
            // hostns-only: a pod's socket keeps the Service address (its sidecar sees it);
            // the node's north-south path serves it.
            return PROCEED;
        }
        let (addr, port) = user_dest(sa, v6);
        let key = ServiceKey {
            addr,
            port,
            slot: 0,
            proto,
            pad: [0; 3],
        };
        let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
            // Not a frontend: a ClusterIP's other ports are refused (its wildcard entry,
            // count 0, no flags), anything else is not ours.
            let wild = ServiceKey {
                port: WILDCARD_PORT,
                proto: WILDCARD_PROTO,
                ..key
            };
            return match unsafe { SERVICES.get(&wild) } {
                Some(w) => refuse(w),
                None => PROCEED,
            };
        };
        let svc = *svc;
        if svc.count == 0 {
            return refuse(&svc);
        }
        let Some((_, backend)) = pick(&ctx, &key, &svc) else {
            // An update is in flight and this slot is gone: as no backend.
            return refuse(&svc);
        };
        // An IPv4 socket cannot reach an IPv6 backend (user space never programs that).
        if !v6 && !is_v4_mapped(&backend.addr) {
            return PROCEED;
        }
        set_user_dest(sa, v6, &backend.addr, backend.port);
        let rkey = RevNatKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr: backend.addr,
            port: backend.port,
            pad: [0; 6],
        };
        let rval = RevNatValue {
            addr,
            port,
            pad: 0,
            svc_id: svc.svc_id,
        };
        let _ = REVNAT.insert(&rkey, &rval, 0);
        PROCEED
    }

    /// No backend: REJECT gives ECONNREFUSED at once; DROP gives ETIMEDOUT at once, what a
    /// client of a dropped SYN ends with, without holding it for the whole retry time.
    #[inline(always)]
    fn refuse(svc: &ServiceValue) -> i32 {
        let err = if svc.flags & FLAG_DROP_WHEN_EMPTY != 0 {
            ETIMEDOUT
        } else {
            ECONNREFUSED
        };
        unsafe { bpf_set_retval(-err) };
        FAIL
    }

    /// recvmsg and getpeername: backend → the Service address the application used.
    #[inline(always)]
    fn reverse(ctx: SockAddrContext, v6: bool) -> i32 {
        let sa = ctx.sock_addr;
        if protocol(sa).is_none() {
            return PROCEED;
        }
        let (addr, port) = user_dest(sa, v6);
        let rkey = RevNatKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr,
            port,
            pad: [0; 6],
        };
        if let Some(r) = unsafe { REVNAT.get(&rkey) } {
            let r = *r;
            if v6 || is_v4_mapped(&r.addr) {
                set_user_dest(sa, v6, &r.addr, r.port);
            }
        }
        // These hooks must always return 1: they cannot fail the call.
        PROCEED
    }

    #[cgroup_sock_addr(connect4)]
    pub fn svcp_connect4(ctx: SockAddrContext) -> i32 {
        translate(ctx, false)
    }
    #[cgroup_sock_addr(connect6)]
    pub fn svcp_connect6(ctx: SockAddrContext) -> i32 {
        translate(ctx, true)
    }
    #[cgroup_sock_addr(sendmsg4)]
    pub fn svcp_sendmsg4(ctx: SockAddrContext) -> i32 {
        translate(ctx, false)
    }
    #[cgroup_sock_addr(sendmsg6)]
    pub fn svcp_sendmsg6(ctx: SockAddrContext) -> i32 {
        translate(ctx, true)
    }
    #[cgroup_sock_addr(recvmsg4)]
    pub fn svcp_recvmsg4(ctx: SockAddrContext) -> i32 {
        reverse(ctx, false)
    }
    #[cgroup_sock_addr(recvmsg6)]
    pub fn svcp_recvmsg6(ctx: SockAddrContext) -> i32 {
        reverse(ctx, true)
    }
    #[cgroup_sock_addr(getpeername4)]
    pub fn svcp_getpeername4(ctx: SockAddrContext) -> i32 {
        reverse(ctx, false)
    }
    #[cgroup_sock_addr(getpeername6)]
    pub fn svcp_getpeername6(ctx: SockAddrContext) -> i32 {
        reverse(ctx, true)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}
