//! The kernel side of the reconciler: ctnetlink (dump one L3 family's conntrack table,
//! delete entries by their original tuple) over a raw `NETLINK_NETFILTER` socket, and the
//! node's local addresses (`getifaddrs`), both optionally inside a named network namespace.
//!
//! Hand-encoded rather than through a netlink crate: the reconciler needs two requests and
//! a handful of attributes (`linux/netfilter/nfnetlink_conntrack.h`). Netlink headers and
//! attribute headers are in host byte order; ctnetlink payloads (addresses, ports, zone,
//! id) are in network byte order.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use svcplane_model::IpFamily;

use super::{ConntrackError, Flow, Tuple};
use crate::netlink::{
    NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, in_netns, netfilter_socket,
};

// nfnetlink / ctnetlink constants (uapi headers; libc lacks most of them).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNETLINK_V0: u8 = 0;

const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from an attribute type.
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const NLMSG_HDR_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Larger than any skb the kernel builds for a dump (it sizes them by our largest read,
/// capped at 32 KiB), so nothing is truncated.
const RECV_BUF: usize = 64 * 1024;
/// Deletes sent per `send`: their acks must fit the default receive buffer.
const DELETE_BATCH: usize = 64;

fn ct_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

fn l3_family(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => libc::AF_INET as u8,
        IpFamily::V6 => libc::AF_INET6 as u8,
    }
}

/// What one batch of deletes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Entries the kernel deleted.
    pub deleted: u64,
    /// Entries already gone (timed out, or replaced: a newer entry has another id).
    pub missing: u64,
    /// Entries the kernel refused to delete, with its errno.
    pub failed: Vec<(Tuple, i32)>,
}

/// A `NETLINK_NETFILTER` socket bound to the conntrack table of the namespace it was
/// opened in.
#[derive(Debug)]
pub struct ConntrackSocket {
    fd: OwnedFd,
    seq: u32,
}

impl ConntrackSocket {
    /// A socket in this process's network namespace.
    pub fn open() -> Result<ConntrackSocket, ConntrackError> {
        Self::open_in(None)
    }

    /// A socket in the network namespace `/run/netns/NAME`, or this process's for `None`.
    /// (A socket stays in the namespace it was created in, so only its creation runs on a
    /// thread that entered the namespace.)
    pub fn open_in(netns: Option<&str>) -> Result<ConntrackSocket, ConntrackError> {
        let fd = netfilter_socket(netns).map_err(ConntrackError::Socket)?;
        Ok(ConntrackSocket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Every conntrack entry of `family` (the kernel filters the dump by L3 family).
    pub fn dump(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
        self.dump_matching(family, |_| true)
    }

    /// The entries of `family` for which `keep` is true: only those are held in memory,
    /// whatever the table's size.
    pub fn dump_matching(
        &mut self,
        family: IpFamily,
        mut keep: impl FnMut(&Flow) -> bool,
    ) -> Result<Vec<Flow>, ConntrackError> {
        let seq = self.next_seq();
        let request = message(
            ct_type(IPCTNL_MSG_CT_GET),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            l3_family(family),
            &[],
        );
        self.send(&request)?;
        let mut flows = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.recv(&mut buf)?;
            for msg in Messages::new(&buf[..n]) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                match msg.ty {
                    NLMSG_DONE => {
                        // A dump that failed midway ends with a negative errno here.
                        let errno = msg.payload.get(..4).map_or(0, read_i32_ne);
                        if errno < 0 {
                            return Err(ConntrackError::Kernel {
                                request: "dump",
                                errno: -errno,
                            });
                        }
                        return Ok(flows);
                    }
                    NLMSG_ERROR => {
                        let errno = msg.payload.get(..4).map_or(0, read_i32_ne);
                        if errno < 0 {
                            return Err(ConntrackError::Kernel {
                                request: "dump",
                                errno: -errno,
                            });
                        }
                    }
                    t if t == ct_type(IPCTNL_MSG_CT_NEW) => {
                        if let Some(flow) = parse_flow(msg.payload)?
                            && keep(&flow)
                        {
                            flows.push(flow);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Delete `flows` by original tuple (and zone and id, when the dump gave them, so an
    /// entry recreated since the dump is left alone).
    pub fn delete<'a>(
        &mut self,
        flows: impl IntoIterator<Item = &'a Flow>,
    ) -> Result<DeleteOutcome, ConntrackError> {
        let flows: Vec<&Flow> = flows.into_iter().collect();
        let mut outcome = DeleteOutcome::default();
        let mut buf = vec![0u8; RECV_BUF];
        for chunk in flows.chunks(DELETE_BATCH) {
            let mut batch = Vec::new();
            let mut pending = std::collections::HashMap::new();
            for flow in chunk {
                let seq = self.next_seq();
                batch.extend_from_slice(&delete_message(flow, seq));
                pending.insert(seq, flow.orig);
            }
            self.send(&batch)?;
            while !pending.is_empty() {
                let n = self.recv(&mut buf)?;
                for msg in Messages::new(&buf[..n]) {
                    let msg = msg?;
                    if msg.ty != NLMSG_ERROR {
                        continue;
                    }
                    let Some(tuple) = pending.remove(&msg.seq) else {
                        continue;
                    };
                    match msg.payload.get(..4).map_or(0, read_i32_ne) {
                        0 => outcome.deleted += 1,
                        e if -e == libc::ENOENT => outcome.missing += 1,
                        e => outcome.failed.push((tuple, -e)),
                    }
                }
            }
        }
        Ok(outcome)
    }

    fn send(&self, bytes: &[u8]) -> Result<(), ConntrackError> {
        crate::netlink::send(&self.fd, bytes).map_err(ConntrackError::Io)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, ConntrackError> {
        crate::netlink::recv(&self.fd, buf).map_err(ConntrackError::Io)
    }
}

/// Every address on the namespace's interfaces (`/run/netns/NAME`, or this process's).
pub fn local_addresses(netns: Option<&str>) -> io::Result<Vec<IpAddr>> {
    match netns {
        None => getifaddrs(),
        Some(name) => in_netns(name, getifaddrs)?,
    }
}

fn getifaddrs() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

// ---- encoding ----

/// A netlink message: nlmsghdr, nfgenmsg for `family`, then `attrs`.
fn message(ty: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + NFGENMSG_LEN + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(NFNETLINK_V0);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(attrs);
    out
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

fn push_nested(buf: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
}

fn push_tuple(buf: &mut Vec<u8>, ty: u16, t: &Tuple) {
    push_nested(buf, ty, |b| {
        push_nested(b, CTA_TUPLE_IP, |b| match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                push_attr(b, CTA_IP_V4_SRC, &s.octets());
                push_attr(b, CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                push_attr(b, CTA_IP_V6_SRC, &v6_octets(s));
                push_attr(b, CTA_IP_V6_DST, &v6_octets(d));
            }
        });
        push_nested(b, CTA_TUPLE_PROTO, |b| {
            push_attr(b, CTA_PROTO_NUM, &[t.protocol]);
            push_attr(b, CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes());
            push_attr(b, CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes());
        });
    });
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

/// `IPCTNL_MSG_CT_DELETE` for `flow`, acknowledged.
fn delete_message(flow: &Flow, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    push_tuple(&mut attrs, CTA_TUPLE_ORIG, &flow.orig);
    if let Some(zone) = flow.zone {
        push_attr(&mut attrs, CTA_ZONE, &zone.to_be_bytes());
    }
    if let Some(id) = flow.id {
        push_attr(&mut attrs, CTA_ID, &id.to_be_bytes());
    }
    let family = match flow.orig.src {
        IpAddr::V4(_) => IpFamily::V4,
        IpAddr::V6(_) => IpFamily::V6,
    };
    message(
        ct_type(IPCTNL_MSG_CT_DELETE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        l3_family(family),
        &attrs,
    )
}

// ---- decoding ----

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn read_i32_ne(b: &[u8]) -> i32 {
    i32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

struct Message<'a> {
    ty: u16,
    seq: u32,
    /// After the nlmsghdr.
    payload: &'a [u8],
}

/// The netlink messages of one datagram.
struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Messages { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDR_LEN {
            return None;
        }
        let b = self.buf;
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > b.len() {
            self.buf = &[];
            return Some(Err(ConntrackError::Malformed(format!(
                "netlink message length {len} in a {}-byte datagram",
                b.len()
            ))));
        }
        let msg = Message {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            payload: &b[NLMSG_HDR_LEN..len],
        };
        self.buf = b.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

/// The attributes of a buffer, as (type without flags, payload). Stops at the first
/// malformed header (its length says more than the buffer holds).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn ipv4(b: &[u8]) -> Option<IpAddr> {
    let o: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(o)))
}

fn ipv6(b: &[u8]) -> Option<IpAddr> {
    let o: [u8; 16] = b.get(..16)?.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(o)))
}

fn parse_tuple(buf: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0, 0);
    for (ty, payload) in attrs(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, p) in attrs(payload) {
                    match ty {
                        CTA_IP_V4_SRC => src = ipv4(p),
                        CTA_IP_V4_DST => dst = ipv4(p),
                        CTA_IP_V6_SRC => src = ipv6(p),
                        CTA_IP_V6_DST => dst = ipv6(p),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, p) in attrs(payload) {
                    match ty {
                        CTA_PROTO_NUM => proto = p.first().copied(),
                        // Portless protocols (ICMP) carry none; 0 then.
                        CTA_PROTO_SRC_PORT => sport = be16(p).unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = be16(p).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        protocol: proto?,
        src_port: sport,
        dst_port: dport,
    })
}

/// One dumped entry (payload after the nlmsghdr). `None` for an entry without both tuples
/// (nothing the reconciler could match or delete).
fn parse_flow(payload: &[u8]) -> Result<Option<Flow>, ConntrackError> {
    let attrs_buf = payload.get(NFGENMSG_LEN..).ok_or_else(|| {
        ConntrackError::Malformed(format!("ctnetlink message of {} bytes", payload.len()))
    })?;
    let (mut orig, mut reply, mut zone, mut id) = (None, None, None, None);
    for (ty, p) in attrs(attrs_buf) {
        match ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(p),
            CTA_TUPLE_REPLY => reply = parse_tuple(p),
            CTA_ZONE => zone = be16(p),
            CTA_ID => id = be32(p),
            _ => {}
        }
    }
    Ok(orig.zip(reply).map(|(orig, reply)| Flow {
        orig,
        reply,
        zone,
        id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 17,
            src_port: sport,
            dst_port: dport,
        }
    }

    /// A dump reply entry as the kernel sends it (orig, reply, then zone and id).
    fn dumped(flow: &Flow, seq: u32) -> Vec<u8> {
        let mut attrs = Vec::new();
        push_tuple(&mut attrs, CTA_TUPLE_ORIG, &flow.orig);
        push_tuple(&mut attrs, CTA_TUPLE_REPLY, &flow.reply);
        // An attribute the parser does not know (CTA_STATUS) is skipped.
        push_attr(&mut attrs, 3, &0x18u32.to_be_bytes());
        if let Some(zone) = flow.zone {
            push_attr(&mut attrs, CTA_ZONE, &zone.to_be_bytes());
        }
        if let Some(id) = flow.id {
            push_attr(&mut attrs, CTA_ID, &id.to_be_bytes());
        }
        let family = if flow.orig.src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        message(ct_type(IPCTNL_MSG_CT_NEW), 0x2, seq, family, &attrs)
    }

    #[test]
    fn dumped_entries_parse_back_in_both_families() {
        let v4 = Flow {
            orig: tuple("10.244.1.10", "10.96.1.3", 40000, 53),
            reply: tuple("10.244.2.10", "10.244.1.10", 5354, 40000),
            zone: None,
            id: Some(0xdead_beef),
        };
        let v6 = Flow {
            orig: tuple("fd00:244::10", "fd00:96::3", 40001, 53),
            reply: tuple("fd00:244::20", "fd00:244::10", 5354, 40001),
            zone: Some(7),
            id: None,
        };
        let mut datagram = dumped(&v4, 9);
        datagram.extend(dumped(&v6, 9));
        let parsed: Vec<Flow> = Messages::new(&datagram)
            .map(|m| parse_flow(m.unwrap().payload).unwrap().unwrap())
            .collect();
        assert_eq!(parsed, vec![v4, v6]);
    }

    #[test]
    fn delete_request_layout() {
        let flow = Flow {
            orig: tuple("10.0.0.1", "10.96.0.10", 1024, 53),
            reply: tuple("10.244.0.5", "10.0.0.1", 53, 1024),
            zone: Some(1),
            id: Some(42),
        };
        let msg = delete_message(&flow, 77);
        let m = Messages::new(&msg).next().unwrap().unwrap();
        assert_eq!(
            m.ty,
            (1 << 8) | 2,
            "ctnetlink subsystem, IPCTNL_MSG_CT_DELETE"
        );
        assert_eq!(m.seq, 77);
        assert_eq!(
            u16::from_ne_bytes([msg[6], msg[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(m.payload[0], libc::AF_INET as u8);
        let top: Vec<(u16, &[u8])> = attrs(&m.payload[NFGENMSG_LEN..]).collect();
        assert_eq!(
            top.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [CTA_TUPLE_ORIG, CTA_ZONE, CTA_ID]
        );
        // Nested attributes carry NLA_F_NESTED; the tuple parses back to the original.
        assert_eq!(
            u16::from_ne_bytes([m.payload[6], m.payload[7]]),
            CTA_TUPLE_ORIG | NLA_F_NESTED
        );
        assert_eq!(parse_tuple(top[0].1), Some(flow.orig));
        assert_eq!(top[1].1, [0, 1], "zone in network byte order");
        assert_eq!(top[2].1, [0, 0, 0, 42], "id in network byte order");
        // Ports in network byte order: 53 is 00 35.
        let proto = attrs(top[0].1)
            .find(|(t, _)| *t == CTA_TUPLE_PROTO)
            .unwrap()
            .1;
        let dport = attrs(proto)
            .find(|(t, _)| *t == CTA_PROTO_DST_PORT)
            .unwrap()
            .1;
        assert_eq!(dport, [0x00, 0x35]);
    }

    #[test]
    fn malformed_input_is_an_error_or_skipped_never_a_panic() {
        // A length beyond the datagram.
        let mut bad = message(ct_type(IPCTNL_MSG_CT_NEW), 0, 1, 2, &[]);
        bad[0] = 200;
        assert!(matches!(
            Messages::new(&bad).next(),
            Some(Err(ConntrackError::Malformed(_)))
        ));
        // An entry without a reply tuple, and one with a truncated attribute.
        let mut attrs_buf = Vec::new();
        push_tuple(
            &mut attrs_buf,
            CTA_TUPLE_ORIG,
            &tuple("10.0.0.1", "10.0.0.2", 1, 2),
        );
        let msg = message(ct_type(IPCTNL_MSG_CT_NEW), 0, 1, 2, &attrs_buf);
        assert_eq!(parse_flow(&msg[NLMSG_HDR_LEN..]).unwrap(), None);
        let mut truncated = msg.clone();
        truncated.truncate(truncated.len() - 6);
        assert_eq!(parse_flow(&truncated[NLMSG_HDR_LEN..]).unwrap(), None);
        assert!(parse_flow(&[0, 0]).is_err());
    }
}
