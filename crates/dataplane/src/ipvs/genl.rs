//! IPVS over generic netlink (family "IPVS", `include/uapi/linux/ip_vs.h`): virtual
//! servers and real servers added, edited, deleted and dumped, encoded attribute for
//! attribute as ipvsadm's libipvs (`ipvs_nl_fill_service_attr`, `ipvs_nl_fill_dest_attr`)
//! encodes them: addresses as 16-byte `union nf_inet_addr`, ports in network byte
//! order, everything else (the netmask too) in host byte order, nests without NLA_F_NESTED.
//! Also the connection timeouts (`ipvsadm --set`, `ipvsadm -L --timeout`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use svcplane_model::Protocol;

use super::plan::{RealServer, VirtualServer, VsKey};
use crate::netlink::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkError, Socket, attrs, cstr, ne_u16, ne_u32,
    push_attr, push_nested,
};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// libnl's `genl_ctrl_resolve` asks the controller with version 1.
const CTRL_VERSION: u8 = 1;

pub const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

const IPVS_CMD_NEW_SERVICE: u8 = 1;
const IPVS_CMD_SET_SERVICE: u8 = 2;
const IPVS_CMD_DEL_SERVICE: u8 = 3;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_NEW_DEST: u8 = 5;
const IPVS_CMD_SET_DEST: u8 = 6;
const IPVS_CMD_DEL_DEST: u8 = 7;
const IPVS_CMD_GET_DEST: u8 = 8;
const IPVS_CMD_SET_CONFIG: u8 = 12;
const IPVS_CMD_GET_CONFIG: u8 = 13;

const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_FWMARK: u16 = 5;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;

const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: masquerade (NAT) forwarding.
const IP_VS_CONN_F_MASQ: u32 = 0;

/// IPVS's connection timeouts in seconds, per network namespace: established TCP,
/// TCP in FIN_WAIT, UDP (`ipvsadm --set TCP TCPFIN UDP`). In a SET_CONFIG a 0 leaves
/// the kernel's value as it is (the kernel skips it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

impl Timeouts {
    /// Whether every value is 0: a SET_CONFIG would change nothing.
    pub fn is_unset(&self) -> bool {
        *self == Timeouts::default()
    }
}

/// A real server as the kernel lists it: what was programmed plus its connection counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestStatus {
    pub server: RealServer,
    pub active: u32,
    pub inactive: u32,
    /// A forwarding method other than masquerade (not svcplane's).
    pub foreign_forwarding: bool,
}

fn af(ip: IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

/// `union nf_inet_addr`: an IPv4 address fills the first 4 of 16 bytes.
fn inet_addr(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

pub fn protocol_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u16,
        Protocol::Udp => libc::IPPROTO_UDP as u16,
        Protocol::Sctp => libc::IPPROTO_SCTP as u16,
    }
}

fn protocol_from(n: u16) -> Option<Protocol> {
    match i32::from(n) {
        libc::IPPROTO_TCP => Some(Protocol::Tcp),
        libc::IPPROTO_UDP => Some(Protocol::Udp),
        libc::IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// genlmsghdr (cmd, version, reserved) followed by `attrs`.
fn genl_body(cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let mut body = vec![cmd, version, 0, 0];
    body.extend_from_slice(attrs);
    body
}

/// The service identity attributes (AF, PROTOCOL, ADDR, PORT).
fn push_service_key(b: &mut Vec<u8>, key: &VsKey) {
    push_attr(b, IPVS_SVC_ATTR_AF, &af(key.addr).to_ne_bytes());
    push_attr(
        b,
        IPVS_SVC_ATTR_PROTOCOL,
        &protocol_number(key.protocol).to_ne_bytes(),
    );
    push_attr(b, IPVS_SVC_ATTR_ADDR, &inet_addr(key.addr));
    push_attr(b, IPVS_SVC_ATTR_PORT, &key.port.to_be_bytes());
}

/// `IPVS_CMD_ATTR_SERVICE` with every attribute the kernel needs for NEW/SET_SERVICE.
fn service_attr(vs: &VirtualServer) -> Vec<u8> {
    let mut b = Vec::new();
    push_nested(&mut b, IPVS_CMD_ATTR_SERVICE, |b| {
        push_service_key(b, &vs.key);
        push_attr(b, IPVS_SVC_ATTR_SCHED_NAME, &cstr(&vs.scheduler));
        let flags = if vs.persistence.is_some() {
            IP_VS_SVC_F_PERSISTENT
        } else {
            0
        };
        // struct ip_vs_flags { flags, mask }: libipvs sets every mask bit.
        let mut f = flags.to_ne_bytes().to_vec();
        f.extend_from_slice(&u32::MAX.to_ne_bytes());
        push_attr(b, IPVS_SVC_ATTR_FLAGS, &f);
        push_attr(
            b,
            IPVS_SVC_ATTR_TIMEOUT,
            &vs.persistence.unwrap_or(0).to_ne_bytes(),
        );
        let netmask: u32 = match vs.key.addr {
            IpAddr::V4(_) => u32::MAX,
            IpAddr::V6(_) => 128,
        };
        // libipvs puts it as a plain u32, and the kernel compares the raw value with 128
        // for IPv6: host byte order, whatever ip_vs.h's __be32 says.
        push_attr(b, IPVS_SVC_ATTR_NETMASK, &netmask.to_ne_bytes());
    });
    b
}

/// `IPVS_CMD_ATTR_SERVICE` naming a service only (DEL_SERVICE, dest commands, GET_DEST).
fn service_key_attr(key: &VsKey) -> Vec<u8> {
    let mut b = Vec::new();
    push_nested(&mut b, IPVS_CMD_ATTR_SERVICE, |b| push_service_key(b, key));
    b
}

fn dest_attr(rs: &RealServer) -> Vec<u8> {
    let mut b = Vec::new();
    push_nested(&mut b, IPVS_CMD_ATTR_DEST, |b| {
        push_attr(b, IPVS_DEST_ATTR_ADDR_FAMILY, &af(rs.addr).to_ne_bytes());
        push_attr(b, IPVS_DEST_ATTR_ADDR, &inet_addr(rs.addr));
        push_attr(b, IPVS_DEST_ATTR_PORT, &rs.port.to_be_bytes());
        push_attr(
            b,
            IPVS_DEST_ATTR_FWD_METHOD,
            &IP_VS_CONN_F_MASQ.to_ne_bytes(),
        );
        push_attr(b, IPVS_DEST_ATTR_WEIGHT, &rs.weight.to_ne_bytes());
        push_attr(b, IPVS_DEST_ATTR_U_THRESH, &0u32.to_ne_bytes());
        push_attr(b, IPVS_DEST_ATTR_L_THRESH, &0u32.to_ne_bytes());
    });
    b
}

/// One IPVS request: command and its attributes, ready for [`Ipvs::send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub cmd: u8,
    pub attrs: Vec<u8>,
}

impl Request {
    pub fn new_service(vs: &VirtualServer) -> Request {
        Request {
            cmd: IPVS_CMD_NEW_SERVICE,
            attrs: service_attr(vs),
        }
    }
    pub fn set_service(vs: &VirtualServer) -> Request {
        Request {
            cmd: IPVS_CMD_SET_SERVICE,
            attrs: service_attr(vs),
        }
    }
    pub fn del_service(key: &VsKey) -> Request {
        Request {
            cmd: IPVS_CMD_DEL_SERVICE,
            attrs: service_key_attr(key),
        }
    }
    fn dest(cmd: u8, key: &VsKey, rs: &RealServer) -> Request {
        let mut attrs = service_key_attr(key);
        attrs.extend_from_slice(&dest_attr(rs));
        Request { cmd, attrs }
    }
    pub fn new_dest(key: &VsKey, rs: &RealServer) -> Request {
        Self::dest(IPVS_CMD_NEW_DEST, key, rs)
    }
    pub fn set_dest(key: &VsKey, rs: &RealServer) -> Request {
        Self::dest(IPVS_CMD_SET_DEST, key, rs)
    }
    pub fn del_dest(key: &VsKey, rs: &RealServer) -> Request {
        Self::dest(IPVS_CMD_DEL_DEST, key, rs)
    }
    /// SET_CONFIG with all three timeouts, as libipvs's `ipvs_set_timeout` sends them.
    pub fn set_timeouts(t: &Timeouts) -> Request {
        let mut attrs = Vec::new();
        push_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_TCP, &t.tcp.to_ne_bytes());
        push_attr(
            &mut attrs,
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
            &t.tcp_fin.to_ne_bytes(),
        );
        push_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_UDP, &t.udp.to_ne_bytes());
        Request {
            cmd: IPVS_CMD_SET_CONFIG,
            attrs,
        }
    }

    /// The whole netlink message for generic netlink family `family_id`.
    pub fn encode(&self, family_id: u16, seq: u32) -> Vec<u8> {
        crate::netlink::message(
            family_id,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            &genl_body(self.cmd, IPVS_GENL_VERSION, &self.attrs),
        )
    }
}

/// A generic netlink socket talking to the IPVS family.
#[derive(Debug)]
pub struct Ipvs {
    socket: Socket,
    family: u16,
}

impl Ipvs {
    /// Open a socket (in `/run/netns/NAME`, or here) and resolve the IPVS family.
    /// `Err(ENOENT)` from [`NetlinkError::errno`]: the kernel has no IPVS.
    pub fn open(netns: Option<&str>) -> Result<Ipvs, NetlinkError> {
        let mut socket = Socket::open(libc::NETLINK_GENERIC, netns)?;
        let family = resolve_family(&mut socket, IPVS_GENL_NAME)?;
        Ok(Ipvs { socket, family })
    }

    pub fn send(&mut self, req: &Request) -> Result<(), NetlinkError> {
        self.socket
            .request(
                self.family,
                NLM_F_REQUEST | NLM_F_ACK,
                &genl_body(req.cmd, IPVS_GENL_VERSION, &req.attrs),
            )
            .map(drop)
    }

    /// Every virtual server (fwmark services, not svcplane's, are skipped).
    pub fn services(&mut self) -> Result<Vec<VirtualServer>, NetlinkError> {
        let replies = self.socket.request(
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            &genl_body(IPVS_CMD_GET_SERVICE, IPVS_GENL_VERSION, &[]),
        )?;
        Ok(replies
            .iter()
            .filter_map(|p| parse_service(p.get(4..)?))
            .collect())
    }

    /// One virtual server, `None` when it does not exist.
    pub fn service(&mut self, key: &VsKey) -> Result<Option<VirtualServer>, NetlinkError> {
        match self.socket.request(
            self.family,
            NLM_F_REQUEST,
            &genl_body(
                IPVS_CMD_GET_SERVICE,
                IPVS_GENL_VERSION,
                &service_key_attr(key),
            ),
        ) {
            Ok(replies) => Ok(replies.iter().find_map(|p| parse_service(p.get(4..)?))),
            // ESRCH: no such service.
            Err(e) if e.errno() == Some(libc::ESRCH) || e.errno() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The connection timeouts (GET_CONFIG; the kernel replies with SET_CONFIG's
    /// attributes).
    pub fn timeouts(&mut self) -> Result<Timeouts, NetlinkError> {
        let replies = self.socket.request(
            self.family,
            NLM_F_REQUEST,
            &genl_body(IPVS_CMD_GET_CONFIG, IPVS_GENL_VERSION, &[]),
        )?;
        replies
            .iter()
            .find_map(|p| parse_timeouts(p.get(4..)?))
            .ok_or_else(|| NetlinkError::Malformed("no timeouts in the GET_CONFIG reply".into()))
    }

    /// The real servers of a virtual server, with their connection counts.
    pub fn dests(&mut self, key: &VsKey) -> Result<Vec<DestStatus>, NetlinkError> {
        let replies = self.socket.request(
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            &genl_body(IPVS_CMD_GET_DEST, IPVS_GENL_VERSION, &service_key_attr(key)),
        )?;
        Ok(replies
            .iter()
            .filter_map(|p| parse_dest(p.get(4..)?, key.addr))
            .collect())
    }
}

/// The id of generic netlink family `name` (`CTRL_CMD_GETFAMILY`).
fn resolve_family(socket: &mut Socket, name: &str) -> Result<u16, NetlinkError> {
    let replies = socket.request(GENL_ID_CTRL, NLM_F_REQUEST, &resolve_body(name))?;
    replies
        .iter()
        .filter_map(|p| p.get(4..))
        .flat_map(attrs)
        .find_map(|(ty, p)| (ty == CTRL_ATTR_FAMILY_ID).then(|| ne_u16(p)).flatten())
        .ok_or_else(|| NetlinkError::Malformed(format!("no id for generic netlink family {name}")))
}

fn resolve_body(name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    push_attr(&mut a, CTRL_ATTR_FAMILY_NAME, &cstr(name));
    genl_body(CTRL_CMD_GETFAMILY, CTRL_VERSION, &a)
}

fn addr_of(af: u16, b: &[u8]) -> Option<IpAddr> {
    if i32::from(af) == libc::AF_INET {
        let o: [u8; 4] = b.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(o)))
    } else {
        let o: [u8; 16] = b.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(o)))
    }
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))
}

/// A service from GET_SERVICE's reply attributes (after the genlmsghdr).
fn parse_service(buf: &[u8]) -> Option<VirtualServer> {
    let (_, svc) = attrs(buf).find(|(ty, _)| *ty == IPVS_CMD_ATTR_SERVICE)?;
    let (mut family, mut proto, mut addr, mut port) = (None, None, None, None);
    let (mut sched, mut flags, mut timeout, mut fwmark) = (String::new(), 0u32, 0u32, 0u32);
    for (ty, p) in attrs(svc) {
        match ty {
            IPVS_SVC_ATTR_AF => family = ne_u16(p),
            IPVS_SVC_ATTR_PROTOCOL => proto = ne_u16(p),
            IPVS_SVC_ATTR_ADDR => addr = Some(p),
            IPVS_SVC_ATTR_PORT => port = be16(p),
            IPVS_SVC_ATTR_FWMARK => fwmark = ne_u32(p).unwrap_or(0),
            IPVS_SVC_ATTR_SCHED_NAME => {
                sched = String::from_utf8_lossy(p).trim_end_matches('\0').to_owned()
            }
            IPVS_SVC_ATTR_FLAGS => flags = ne_u32(p).unwrap_or(0),
            IPVS_SVC_ATTR_TIMEOUT => timeout = ne_u32(p).unwrap_or(0),
            _ => {}
        }
    }
    if fwmark != 0 {
        return None;
    }
    let addr = addr_of(family?, addr?)?;
    Some(VirtualServer {
        key: VsKey {
            addr,
            protocol: protocol_from(proto?)?,
            port: port?,
        },
        scheduler: sched,
        persistence: (flags & IP_VS_SVC_F_PERSISTENT != 0).then_some(timeout),
    })
}

/// The timeouts from GET_CONFIG's reply attributes (after the genlmsghdr); `None`
/// without any. (A kernel built without IPVS's TCP or UDP support omits those: 0.)
fn parse_timeouts(buf: &[u8]) -> Option<Timeouts> {
    let mut t = Timeouts::default();
    let mut found = false;
    for (ty, p) in attrs(buf) {
        let slot = match ty {
            IPVS_CMD_ATTR_TIMEOUT_TCP => &mut t.tcp,
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => &mut t.tcp_fin,
            IPVS_CMD_ATTR_TIMEOUT_UDP => &mut t.udp,
            _ => continue,
        };
        *slot = ne_u32(p)?;
        found = true;
    }
    found.then_some(t)
}

/// A real server from GET_DEST's reply attributes; the family defaults to the service's
/// (kernels before 4.x omit IPVS_DEST_ATTR_ADDR_FAMILY).
fn parse_dest(buf: &[u8], service_addr: IpAddr) -> Option<DestStatus> {
    let (_, d) = attrs(buf).find(|(ty, _)| *ty == IPVS_CMD_ATTR_DEST)?;
    let mut family = af(service_addr);
    let (mut addr, mut port, mut weight) = (None, None, 0u32);
    let (mut fwd, mut active, mut inactive) = (0u32, 0u32, 0u32);
    for (ty, p) in attrs(d) {
        match ty {
            IPVS_DEST_ATTR_ADDR_FAMILY => family = ne_u16(p).unwrap_or(family),
            IPVS_DEST_ATTR_ADDR => addr = Some(p),
            IPVS_DEST_ATTR_PORT => port = be16(p),
            IPVS_DEST_ATTR_WEIGHT => weight = ne_u32(p).unwrap_or(0),
            IPVS_DEST_ATTR_FWD_METHOD => fwd = ne_u32(p).unwrap_or(0),
            IPVS_DEST_ATTR_ACTIVE_CONNS => active = ne_u32(p).unwrap_or(0),
            IPVS_DEST_ATTR_INACT_CONNS => inactive = ne_u32(p).unwrap_or(0),
            _ => {}
        }
    }
    Some(DestStatus {
        server: RealServer {
            addr: addr_of(family, addr?)?,
            port: port?,
            weight,
        },
        active,
        inactive,
        foreign_forwarding: fwd & 0x7 != IP_VS_CONN_F_MASQ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(addr: &str, port: u16, persistence: Option<u32>) -> VirtualServer {
        VirtualServer {
            key: VsKey {
                addr: addr.parse().unwrap(),
                protocol: Protocol::Tcp,
                port,
            },
            scheduler: "rr".into(),
            persistence,
        }
    }

    /// Little-endian host (x86_64, the only target built here) bytes of an attribute.
    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((4 + payload.len()) as u16).to_le_bytes().to_vec();
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn new_service_matches_libipvs_layout() {
        // ipvsadm -A -t 10.96.0.10:80 -s rr -p 10800, as libipvs encodes it.
        let req = Request::new_service(&vs("10.96.0.10", 80, Some(10800)));
        let mut inner = Vec::new();
        inner.extend(nla(1, &2u16.to_le_bytes())); // AF_INET
        inner.extend(nla(2, &6u16.to_le_bytes())); // TCP
        inner.extend(nla(3, &[10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        inner.extend(nla(4, &[0, 80])); // port, network order
        inner.extend(nla(6, b"rr\0"));
        inner.extend(nla(7, &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])); // flags PERSISTENT, mask ~0
        inner.extend(nla(8, &10800u32.to_le_bytes()));
        inner.extend(nla(9, &[0xff, 0xff, 0xff, 0xff]));
        let expected = nla(1, &inner);
        assert_eq!(req.attrs, expected);
        assert_eq!(req.cmd, 1);

        let msg = req.encode(0x25, 7);
        let mut header = ((16 + 4 + expected.len()) as u32).to_le_bytes().to_vec();
        header.extend_from_slice(&0x25u16.to_le_bytes());
        header.extend_from_slice(&5u16.to_le_bytes()); // REQUEST | ACK
        header.extend_from_slice(&7u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&[1, 1, 0, 0]); // NEW_SERVICE, version 1
        assert_eq!(&msg[..20], &header[..]);
        assert_eq!(&msg[20..], &expected[..]);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn new_dest_matches_libipvs_layout() {
        let key = vs("fd00::1", 443, None).key;
        let rs = RealServer {
            addr: "fd00:244::5".parse().unwrap(),
            port: 8443,
            weight: 1,
        };
        let req = Request::new_dest(&key, &rs);
        let mut svc = Vec::new();
        svc.extend(nla(1, &10u16.to_le_bytes())); // AF_INET6
        svc.extend(nla(2, &6u16.to_le_bytes()));
        svc.extend(nla(3, &"fd00::1".parse::<Ipv6Addr>().unwrap().octets()));
        svc.extend(nla(4, &443u16.to_be_bytes()));
        let mut dest = Vec::new();
        dest.extend(nla(11, &10u16.to_le_bytes()));
        dest.extend(nla(1, &"fd00:244::5".parse::<Ipv6Addr>().unwrap().octets()));
        dest.extend(nla(2, &8443u16.to_be_bytes()));
        dest.extend(nla(3, &0u32.to_le_bytes())); // masquerade
        dest.extend(nla(4, &1u32.to_le_bytes()));
        dest.extend(nla(5, &0u32.to_le_bytes()));
        dest.extend(nla(6, &0u32.to_le_bytes()));
        let mut expected = nla(1, &svc);
        expected.extend(nla(2, &dest));
        assert_eq!(req.cmd, 5);
        assert_eq!(req.attrs, expected);
        assert_eq!(Request::set_dest(&key, &rs).cmd, 6);
        assert_eq!(Request::del_dest(&key, &rs).cmd, 7);
        assert_eq!(Request::del_service(&key).attrs, nla(1, &svc));
        // An IPv6 service's netmask is 128 in host order (the kernel refuses 128 << 24).
        let six = Request::new_service(&vs("fd00::1", 443, None));
        assert!(six.attrs.ends_with(&nla(9, &128u32.to_le_bytes())));
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn set_timeouts_matches_libipvs_layout() {
        // ipvsadm --set 900 120 0: three plain u32 attributes, the 0 included (the
        // kernel leaves that one alone).
        let req = Request::set_timeouts(&Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 0,
        });
        let mut expected = nla(4, &900u32.to_le_bytes());
        expected.extend(nla(5, &120u32.to_le_bytes()));
        expected.extend(nla(6, &0u32.to_le_bytes()));
        assert_eq!(req.cmd, 12);
        assert_eq!(req.attrs, expected);
        let msg = req.encode(0x25, 3);
        assert_eq!(&msg[16..20], &[12, 1, 0, 0]); // SET_CONFIG, version 1
        assert_eq!(&msg[20..], &expected[..]);
    }

    #[test]
    fn timeouts_parse_back_from_a_get_config_reply() {
        let t = Timeouts {
            tcp: 3600,
            tcp_fin: 90,
            udp: 77,
        };
        assert_eq!(parse_timeouts(&Request::set_timeouts(&t).attrs), Some(t));
        // Attributes in another order, and one the parser does not know, change nothing.
        let mut reply = Vec::new();
        push_attr(&mut reply, IPVS_CMD_ATTR_TIMEOUT_UDP, &300u32.to_ne_bytes());
        push_attr(&mut reply, 99, &[1, 2, 3, 4]);
        push_attr(&mut reply, IPVS_CMD_ATTR_TIMEOUT_TCP, &900u32.to_ne_bytes());
        push_attr(
            &mut reply,
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
            &120u32.to_ne_bytes(),
        );
        assert_eq!(
            parse_timeouts(&reply),
            Some(Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            })
        );
        let mut udp_only = Vec::new();
        push_attr(
            &mut udp_only,
            IPVS_CMD_ATTR_TIMEOUT_UDP,
            &300u32.to_ne_bytes(),
        );
        assert_eq!(
            parse_timeouts(&udp_only),
            Some(Timeouts {
                udp: 300,
                ..Timeouts::default()
            })
        );
        assert_eq!(parse_timeouts(&[]), None);
        assert!(Timeouts::default().is_unset() && !t.is_unset());
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn resolve_request_matches_libnl() {
        // genl_ctrl_resolve(sk, "IPVS"): CTRL_CMD_GETFAMILY v1, CTRL_ATTR_FAMILY_NAME "IPVS\0".
        assert_eq!(
            resolve_body("IPVS"),
            vec![3, 1, 0, 0, 9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0]
        );
    }

    #[test]
    fn replies_parse_back() {
        let v = vs("10.0.0.1", 53, None);
        let parsed = parse_service(&service_attr(&v)).unwrap();
        assert_eq!(parsed, v);
        let p = vs("10.0.0.1", 53, Some(30));
        assert_eq!(parse_service(&service_attr(&p)).unwrap(), p);
        let rs = RealServer {
            addr: "10.244.1.2".parse().unwrap(),
            port: 5353,
            weight: 0,
        };
        // The kernel's reply also carries the counters: append one inside the nest.
        let mut with_counts = dest_attr(&rs);
        push_attr(
            &mut with_counts,
            IPVS_DEST_ATTR_ACTIVE_CONNS,
            &3u32.to_ne_bytes(),
        );
        let total = with_counts.len() as u16;
        with_counts[..2].copy_from_slice(&total.to_ne_bytes());
        let st = parse_dest(&with_counts, v.key.addr).unwrap();
        assert_eq!(st.server, rs);
        assert_eq!(st.active, 3);
        assert!(!st.foreign_forwarding);
    }
}
