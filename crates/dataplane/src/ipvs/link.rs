//! The dummy interface holding every service address, over rtnetlink (`NETLINK_ROUTE`):
//! create it, list and change its addresses, delete it. As kube-proxy's `kube-ipvs0`, it
//! stays down: its addresses are still local (the kernel adds their `local` routes), so
//! packets to them reach IPVS in LOCAL_IN, and it answers no ARP of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netlink::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkError, Socket, attrs,
    cstr, push_attr, push_nested,
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// No duplicate address detection for the IPv6 service addresses.
const IFA_F_NODAD: u8 = 0x02;
const RT_SCOPE_UNIVERSE: u8 = 0;

/// `struct ifinfomsg` (family, pad, type, index, flags, change) with `attrs`.
fn ifinfomsg(index: i32, attrs: &[u8]) -> Vec<u8> {
    let mut b = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(attrs);
    b
}

/// `struct ifaddrmsg` (family, prefixlen, flags, scope, index) and IFA_LOCAL/IFA_ADDRESS.
pub fn ifaddrmsg(index: u32, addr: IpAddr) -> Vec<u8> {
    let (family, prefix, flags, octets) = match addr {
        IpAddr::V4(v4) => (libc::AF_INET as u8, 32, 0, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, 128, IFA_F_NODAD, v6.octets().to_vec()),
    };
    let mut b = vec![family, prefix, flags, RT_SCOPE_UNIVERSE];
    b.extend_from_slice(&index.to_ne_bytes());
    push_attr(&mut b, IFA_LOCAL, &octets);
    push_attr(&mut b, IFA_ADDRESS, &octets);
    b
}

/// `ip link add NAME type dummy`'s message body.
pub fn new_dummy_body(name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    push_attr(&mut a, IFLA_IFNAME, &cstr(name));
    push_nested(&mut a, IFLA_LINKINFO, |b| {
        push_attr(b, IFLA_INFO_KIND, b"dummy")
    });
    ifinfomsg(0, &a)
}

fn name_body(name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    push_attr(&mut a, IFLA_IFNAME, &cstr(name));
    ifinfomsg(0, &a)
}

/// An rtnetlink socket.
#[derive(Debug)]
pub struct Links {
    socket: Socket,
    /// The kernel filters address dumps by interface (see [`Socket::strict_check`]).
    strict: bool,
}

impl Links {
    pub fn open(netns: Option<&str>) -> Result<Links, NetlinkError> {
        let socket = Socket::open(libc::NETLINK_ROUTE, netns)?;
        let strict = socket.strict_check();
        Ok(Links { socket, strict })
    }

    /// The index of interface `name`, `None` when there is none.
    pub fn index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        match self
            .socket
            .request(RTM_GETLINK, NLM_F_REQUEST, &name_body(name))
        {
            Ok(replies) => Ok(replies.iter().find_map(|p| {
                let b: [u8; 4] = p.get(4..8)?.try_into().ok()?;
                Some(i32::from_ne_bytes(b) as u32)
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Interface `name` as a dummy, created when missing; its index.
    pub fn ensure_dummy(&mut self, name: &str) -> Result<u32, NetlinkError> {
        if let Some(i) = self.index(name)? {
            return Ok(i);
        }
        self.socket.request(
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &new_dummy_body(name),
        )?;
        self.index(name)?
            .ok_or_else(|| NetlinkError::Malformed(format!("{name} missing after creation")))
    }

    /// Delete interface `name`; true when it existed.
    pub fn delete(&mut self, name: &str) -> Result<bool, NetlinkError> {
        match self
            .socket
            .request(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, &name_body(name))
        {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The addresses on interface `index`, both families.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        self.addresses_where(Some(index), |i| i == index)
    }

    /// The addresses of every interface but `except` (the dummy, with one address per
    /// service): with a strict-checking kernel, one dump per other interface, so the
    /// cost does not grow with the number of services.
    pub fn addresses_except(&mut self, except: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        if !self.strict {
            return self.addresses_where(None, |i| i != except);
        }
        let body = ifinfomsg(0, &[]);
        let links = self
            .socket
            .request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, &body)?;
        let mut out = Vec::new();
        for p in &links {
            let Some(b) = p.get(4..8) else { continue };
            let index = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            if index != except {
                out.extend(self.addresses(index)?);
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// An address dump (of interface `only` where the kernel filters), keeping the
    /// interfaces `keep` accepts.
    fn addresses_where(
        &mut self,
        only: Option<u32>,
        keep: impl Fn(u32) -> bool,
    ) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
        body.extend(only.filter(|_| self.strict).unwrap_or(0).to_ne_bytes());
        let replies = self
            .socket
            .request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, &body)?;
        let mut out = Vec::new();
        for p in &replies {
            let Some(hdr) = p.get(..8) else { continue };
            if !keep(u32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]])) {
                continue;
            }
            let family = i32::from(hdr[0]);
            let addr = attrs(&p[8..])
                .find(|(ty, _)| *ty == IFA_LOCAL)
                .or_else(|| attrs(&p[8..]).find(|(ty, _)| *ty == IFA_ADDRESS))
                .and_then(|(_, b)| {
                    if family == libc::AF_INET {
                        let o: [u8; 4] = b.get(..4)?.try_into().ok()?;
                        Some(IpAddr::V4(Ipv4Addr::from(o)))
                    } else {
                        let o: [u8; 16] = b.get(..16)?.try_into().ok()?;
                        Some(IpAddr::V6(Ipv6Addr::from(o)))
                    }
                });
            out.extend(addr);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn add_address(&mut self, index: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        match self.socket.request(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &ifaddrmsg(index, addr),
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    pub fn del_address(&mut self, index: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        match self.socket.request(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            &ifaddrmsg(index, addr),
        ) {
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn dummy_link_matches_iproute2_layout() {
        // `ip link add svcplane-ipvs0 type dummy`: ifinfomsg, IFLA_IFNAME, IFLA_LINKINFO
        // { IFLA_INFO_KIND "dummy" } (iproute2 sends the kind without its NUL too).
        let mut expected = vec![0u8; 16];
        expected.extend_from_slice(&[19, 0, 3, 0]);
        expected.extend_from_slice(b"svcplane-ipvs0\0\0");
        expected.extend_from_slice(&[16, 0, 18, 0, 9, 0, 1, 0]);
        expected.extend_from_slice(b"dummy\0\0\0");
        assert_eq!(new_dummy_body("svcplane-ipvs0"), expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn address_messages_match_iproute2_layout() {
        // `ip addr add 10.96.0.1/32 dev <7>`.
        let v4 = ifaddrmsg(7, "10.96.0.1".parse().unwrap());
        assert_eq!(
            v4,
            vec![
                2, 32, 0, 0, 7, 0, 0, 0, 8, 0, 2, 0, 10, 96, 0, 1, 8, 0, 1, 0, 10, 96, 0, 1
            ]
        );
        // `ip addr add fd00::1/128 dev <7> nodad`.
        let v6 = ifaddrmsg(7, "fd00::1".parse().unwrap());
        assert_eq!(&v6[..8], &[10, 128, 2, 0, 7, 0, 0, 0]);
        assert_eq!(&v6[8..12], &[20, 0, 2, 0]);
        assert_eq!(v6.len(), 8 + 20 + 20);
    }
}
