//! The netlink sockets svcplane's kernel conversations use (`NETLINK_NETFILTER` for
//! ctnetlink and nf_tables, `NETLINK_ROUTE` and `NETLINK_GENERIC` for IPVS mode's dummy
//! interface and virtual servers), optionally in another network namespace, the framing
//! constants they share, and a plain request/reply exchange ([`Socket`]) with attribute
//! encoding and decoding helpers.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from an attribute type.
pub(crate) const NLA_TYPE_MASK: u16 = 0x3fff;
pub(crate) const NLMSG_HDR_LEN: usize = 16;
/// Larger than any skb the kernel builds for a dump reply.
const RECV_BUF: usize = 64 * 1024;

/// Bounds how long a request waits for the kernel (it answers in micro- to milliseconds).
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound `NETLINK_NETFILTER` socket with a receive timeout, in this process's network
/// namespace or in `/run/netns/NAME`. (A socket stays in the namespace it was created in,
/// so only its creation runs on a thread that entered the namespace.)
pub(crate) fn netfilter_socket(netns: Option<&str>) -> io::Result<OwnedFd> {
    socket_fd(libc::NETLINK_NETFILTER, netns)
}

/// A bound netlink socket of `protocol` (`libc::NETLINK_*`), as [`netfilter_socket`].
pub(crate) fn socket_fd(protocol: libc::c_int, netns: Option<&str>) -> io::Result<OwnedFd> {
    match netns {
        None => open_fd(protocol),
        Some(name) => in_netns(name, || open_fd(protocol))?,
    }
}

/// Send all of `bytes` as one datagram.
pub(crate) fn send(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is a valid buffer of its length; the fd is open for the call.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::other(format!(
            "short netlink send: {n} of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// Receive one datagram into `buf` (retrying on EINTR); an error if it did not fit.
pub(crate) fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(io::Error::other(format!(
                "netlink message of {n} bytes truncated to {}",
                buf.len()
            )));
        }
        return Ok(n);
    }
}

fn open_fd(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_nl is valid; the kernel assigns the port id.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `addr` is a valid sockaddr_nl of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: `timeout` is a valid timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Run `f` on a fresh thread inside `/run/netns/NAME`; the caller's thread never moves.
pub(crate) fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<T> {
                let file = File::open(format!("/run/netns/{name}"))
                    .map_err(|e| io::Error::new(e.kind(), format!("netns {name}: {e}")))?;
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

/// A netlink error the kernel answered with (a negative errno in NLMSG_ERROR or a
/// dump's NLMSG_DONE).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{}", io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
    #[error("malformed netlink message: {0}")]
    Malformed(String),
}

impl NetlinkError {
    /// The kernel's errno, when it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel(e) => Some(*e),
            _ => None,
        }
    }
}

/// A netlink socket for plain request/reply exchanges: one request at a time, its
/// replies (a dump's messages, or an ack) read until the end.
#[derive(Debug)]
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    pub(crate) fn open(protocol: libc::c_int, netns: Option<&str>) -> io::Result<Socket> {
        Ok(Socket {
            fd: socket_fd(protocol, netns)?,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Ask the kernel to honour the filters in dump requests (`NETLINK_GET_STRICT_CHK`,
    /// Linux 4.20): e.g. an address dump of one interface, instead of every address.
    /// `false` when the kernel cannot.
    pub(crate) fn strict_check(&self) -> bool {
        const NETLINK_GET_STRICT_CHK: libc::c_int = 12;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of its size.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                NETLINK_GET_STRICT_CHK,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    }

    /// Send one message (`ty`, `flags`, then `body`: family header and attributes) and
    /// return the payloads (after the nlmsghdr) of its data replies, until the ack
    /// (requests: NLM_F_ACK is added) or NLMSG_DONE (dumps).
    pub(crate) fn request(
        &mut self,
        ty: u16,
        flags: u16,
        body: &[u8],
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        // A request's data replies (a GET's answer) are followed by the ack only when
        // asked for: ask, so the end of the answer is known.
        let flags = if dump { flags } else { flags | NLM_F_ACK };
        send(&self.fd, &message(ty, flags, seq, body))?;
        let mut out = Vec::new();
        loop {
            let n = recv(&self.fd, &mut self.buf)?;
            for msg in messages(&self.buf[..n]) {
                let (mty, mseq, payload) = msg?;
                if mseq != seq {
                    continue;
                }
                match mty {
                    NLMSG_ERROR | NLMSG_DONE => {
                        let errno = payload
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if errno < 0 {
                            return Err(NetlinkError::Kernel(-errno));
                        }
                        if mty == NLMSG_DONE || !dump {
                            return Ok(out);
                        }
                    }
                    _ => out.push(payload.to_vec()),
                }
            }
        }
    }
}

/// One netlink message: nlmsghdr (host byte order, pid 0: the kernel fills it) and `body`.
pub(crate) fn message(ty: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The messages of one datagram, as (type, seq, payload after the nlmsghdr).
pub(crate) fn messages(
    mut buf: &[u8],
) -> impl Iterator<Item = Result<(u16, u32, &[u8]), NetlinkError>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDR_LEN {
            return None;
        }
        let b = buf;
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > b.len() {
            buf = &[];
            return Some(Err(NetlinkError::Malformed(format!(
                "message length {len} in a {}-byte datagram",
                b.len()
            ))));
        }
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        buf = b.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((ty, seq, &b[NLMSG_HDR_LEN..len])))
    })
}

/// The attributes of a buffer, as (type without flags, payload). Stops at the first
/// malformed header.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

/// Append one attribute (padded to 4 bytes).
pub(crate) fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// Append a nested attribute of type `ty` (given with or without NLA_F_NESTED, as the
/// protocol's reference tools send it) holding what `fill` appends.
pub(crate) fn push_nested(buf: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
}

/// A NUL-terminated string attribute payload.
pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub(crate) fn ne_u16(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

pub(crate) fn ne_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}
