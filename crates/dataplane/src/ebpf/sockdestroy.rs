//! Connected UDP sockets whose backend was removed are destroyed (sock_diag `SOCK_DESTROY`,
//! as Cilium does): the socket load balancer translated them once, at connect, so without
//! this they would keep sending to a backend that no longer serves the Service. The
//! application gets ECONNABORTED and reconnects, which picks a live backend: socket-LB's
//! counterpart of the conntrack reconciler.
//!
//! Sockets live in every network namespace (the pods'), and sock_diag answers for the
//! namespace of its netlink socket only: each distinct namespace of /proc/*/ns/net is
//! entered (on a scoped thread, so the caller never moves) and its connected UDP sockets
//! dumped. Only a socket whose cookie has a reverse-NAT entry naming the removed backend
//! of that very Service is destroyed: svcplane's own translations, never a socket that
//! connected to a pod address by itself.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::netlink::{NLM_F_DUMP, NLM_F_REQUEST, Socket};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const IPPROTO_UDP: u8 = 17;
/// A connected UDP socket is in TCP_ESTABLISHED (1).
const ESTABLISHED: u32 = 1 << 1;
/// `struct inet_diag_sockid`: ports, src, dst, if, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then 5 u32.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// A backend removed from a Service: (svc_id, address, port), the port in host order.
pub type Stale = (u32, IpAddr, u16);

/// One connected UDP socket from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSock {
    pub family: u8,
    pub cookie: u64,
    pub dst: IpAddr,
    pub dport: u16,
    /// The raw `inet_diag_sockid`, sent back as is to name the socket.
    pub id: [u8; SOCKID_LEN],
}

/// Parse one `inet_diag_msg`.
pub fn parse_msg(b: &[u8]) -> Option<UdpSock> {
    if b.len() < MSG_LEN {
        return None;
    }
    let family = b[0];
    let id: [u8; SOCKID_LEN] = b[4..4 + SOCKID_LEN].try_into().ok()?;
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let dst_bytes: [u8; 16] = id[20..36].try_into().ok()?;
    let dst = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(
            dst_bytes[0],
            dst_bytes[1],
            dst_bytes[2],
            dst_bytes[3],
        )),
        libc::AF_INET6 => {
            let v6 = Ipv6Addr::from(dst_bytes);
            // A dual-stack socket connected to an IPv4 backend.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    let c0 = u32::from_ne_bytes(id[40..44].try_into().ok()?);
    let c1 = u32::from_ne_bytes(id[44..48].try_into().ok()?);
    Some(UdpSock {
        family,
        cookie: u64::from(c0) | (u64::from(c1) << 32),
        dst,
        dport,
        id,
    })
}

/// `struct inet_diag_req_v2` for UDP of `family`, naming `id`.
fn request(family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + SOCKID_LEN);
    b.extend_from_slice(&[family, IPPROTO_UDP, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(id);
    b
}

/// Every distinct network namespace of a running process (by device and inode).
fn namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let path = e.path().join("ns/net");
        // A process may exit meanwhile, or be out of reach: skip it.
        if let Ok(m) = std::fs::metadata(&path)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(path);
        }
    }
    out
}

/// Run `f` on a thread inside the namespace of `path` (an `ns/net` file).
fn in_namespace<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns only reads the fd, which `file` keeps open for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
    })
}

/// What a destroy pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub destroyed: usize,
    /// Namespaces or sockets that could not be handled (logged by the caller).
    pub errors: Vec<String>,
}

/// Destroy the connected UDP sockets, in every namespace, that `translated` says the
/// socket load balancer connected to one of `stale` (`translated(cookie, addr, port)`
/// gives the Service id of the socket's reverse-NAT entry).
pub fn destroy(
    stale: &BTreeSet<Stale>,
    translated: &(dyn Fn(u64, IpAddr, u16) -> Option<u32> + Sync),
) -> Outcome {
    let mut outcome = Outcome::default();
    if stale.is_empty() {
        return outcome;
    }
    let targets: HashSet<(IpAddr, u16)> = stale.iter().map(|&(_, ip, p)| (ip, p)).collect();
    for ns in namespaces() {
        let r = in_namespace(&ns, || -> Result<usize, String> {
            let mut sock = Socket::open(NETLINK_SOCK_DIAG, None).map_err(|e| e.to_string())?;
            let mut n = 0;
            for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                let dump = sock
                    .request(
                        SOCK_DIAG_BY_FAMILY,
                        NLM_F_REQUEST | NLM_F_DUMP,
                        &request(family, ESTABLISHED, &[0; SOCKID_LEN]),
                    )
                    .map_err(|e| format!("dumping UDP sockets: {e}"))?;
                for msg in dump {
                    let Some(s) = parse_msg(&msg) else { continue };
                    if !targets.contains(&(s.dst, s.dport)) {
                        continue;
                    }
                    let Some(svc) = translated(s.cookie, s.dst, s.dport) else {
                        continue;
                    };
                    if !stale.contains(&(svc, s.dst, s.dport)) {
                        continue;
                    }
                    match sock.request(
                        SOCK_DESTROY,
                        NLM_F_REQUEST,
                        &request(s.family, u32::MAX, &s.id),
                    ) {
                        Ok(_) => n += 1,
                        // Closed meanwhile: nothing left to do.
                        Err(e) if e.errno() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            return Err(format!(
                                "destroying the UDP socket to {}:{}: {e}",
                                s.dst, s.dport
                            ));
                        }
                    }
                }
            }
            Ok(n)
        });
        match r {
            Ok(Ok(n)) => outcome.destroyed += n,
            Ok(Err(e)) => outcome.errors.push(format!("{}: {e}", ns.display())),
            // The process exited since the listing: its sockets are gone with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => outcome.errors.push(format!("{}: {e}", ns.display())),
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dumped_socket_parses() {
        let mut m = vec![0u8; MSG_LEN];
        m[0] = libc::AF_INET as u8;
        m[1] = 1;
        // sport 40000, dport 5353, src 10.0.0.1, dst 10.244.0.10, cookie 0x1_0000_0002.
        m[4..6].copy_from_slice(&40000u16.to_be_bytes());
        m[6..8].copy_from_slice(&5353u16.to_be_bytes());
        m[8..12].copy_from_slice(&[10, 0, 0, 1]);
        m[24..28].copy_from_slice(&[10, 244, 0, 10]);
        m[44..48].copy_from_slice(&2u32.to_ne_bytes());
        m[48..52].copy_from_slice(&1u32.to_ne_bytes());
        let s = parse_msg(&m).expect("parses");
        assert_eq!(s.dst, "10.244.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(s.dport, 5353);
        assert_eq!(s.cookie, 0x1_0000_0002);
        assert_eq!(&s.id[..], &m[4..52]);
        // A v4-mapped destination of a dual-stack socket reads as IPv4.
        m[0] = libc::AF_INET6 as u8;
        m[24..40].copy_from_slice(&"::ffff:10.244.0.10".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            parse_msg(&m).expect("parses").dst,
            "10.244.0.10".parse::<IpAddr>().unwrap()
        );
        assert!(parse_msg(&m[..MSG_LEN - 1]).is_none());
    }

    #[test]
    fn nothing_stale_does_nothing() {
        assert_eq!(
            destroy(&BTreeSet::new(), &|_, _, _| Some(1)),
            Outcome::default()
        );
    }
}
