//! Sockets inside network namespaces: the echo server every virtual pod runs, and the
//! client side (`tcp_request`, `udp_request`) usable from any namespace.
//!
//! Both run in-process on a dedicated thread that `setns(2)`s into the target namespace
//! before creating its sockets (a socket stays in the namespace it was created in). This
//! is cheaper than spawning a helper binary per request, needs no extra build target,
//! and lets errors come back as typed values instead of parsed stderr. A thread that has
//! entered a namespace is never reused for anything else.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Move the calling thread into the named network namespace (`/run/netns/NAME`).
fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))
        .map_err(|e| io::Error::new(e.kind(), format!("netns {name}: {e}")))?;
    // SAFETY: setns only reads the fd, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

thread_local! {
    /// The namespace this whole process already runs in: set only in the forked child of
    /// [`crate::in_cgroup`], which entered it itself.
    static PROCESS_NETNS: std::cell::RefCell<Option<String>> =
        const { std::cell::RefCell::new(None) };
}

/// Mark this (single-threaded, forked) process as living in `netns` for good, so
/// [`in_netns`] runs there on the calling thread instead of spawning one.
pub(crate) fn settle_in_netns(netns: &str) {
    PROCESS_NETNS.with(|n| *n.borrow_mut() = Some(netns.to_owned()));
}

/// Run `f` on a fresh thread inside the network namespace `netns` (a name under
/// /run/netns) and return its result. The caller's thread never changes namespace.
/// In [`crate::in_cgroup`]'s forked child, already in `netns`, `f` runs on the calling
/// thread: a child forked from a multi-threaded process should not start threads (a lock
/// another thread held at the fork stays held in the child forever).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    if PROCESS_NETNS.with(|n| n.borrow().as_deref() == Some(netns)) {
        return Ok(f());
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| enter_netns(netns).map(|()| f()))
            .join()
            .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
    })
}

/// `GET path` over HTTP/1.0 to `addr` from inside `netns`: the status code and the body.
pub fn http_get(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    in_netns(netns, || -> io::Result<(u16, String)> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP response: {response:?}")))?;
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .to_owned();
        Ok((status, body))
    })?
}

/// Why a request failed, classified the way tests assert on it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// TCP RST or ICMP port unreachable (what a `reject` rule sends).
    #[error("connection refused")]
    Refused,
    /// No answer in time (what a `drop` rule looks like).
    #[error("timed out")]
    Timeout,
    /// ICMP host/network unreachable, or no route.
    #[error("unreachable: {0}")]
    Unreachable(io::Error),
    /// Anything else (namespace missing, bind failure, ...).
    #[error("{0}")]
    Other(io::Error),
}

impl From<io::Error> for RequestError {
    fn from(e: io::Error) -> Self {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused | K::ConnectionReset => RequestError::Refused,
            K::TimedOut | K::WouldBlock => RequestError::Timeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                RequestError::Unreachable(e)
            }
            _ => RequestError::Other(e),
        }
    }
}

fn socket_for(dst: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    Socket::new(domain, ty, Some(proto))
}

fn bind_source(sock: &Socket, src: Option<IpAddr>) -> io::Result<()> {
    if let Some(ip) = src {
        sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    Ok(())
}

/// Connect over TCP to `dst` from inside namespace `netns` (optionally from source
/// address `src`), read until the server closes, and return what it sent.
pub fn tcp_request(
    netns: &str,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_netns(netns, || -> Result<String, RequestError> {
        let sock = socket_for(dst, Type::STREAM, Protocol::TCP)?;
        bind_source(&sock, src)?;
        sock.connect_timeout(&SockAddr::from(dst), timeout)?;
        let mut stream: std::net::TcpStream = sock.into();
        stream.set_read_timeout(Some(timeout))?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    })?
}

/// Send one UDP datagram to `dst` from inside namespace `netns` (optionally from source
/// address `src`) and return the reply datagram. The socket is connected, so an ICMP
/// port unreachable comes back as [`RequestError::Refused`].
pub fn udp_request(
    netns: &str,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_netns(netns, || -> Result<String, RequestError> {
        let sock = socket_for(dst, Type::DGRAM, Protocol::UDP)?;
        bind_source(&sock, src)?;
        udp_ping(sock, dst, timeout)
    })?
}

/// Send one datagram from `sock` to `dst` and return the reply.
fn udp_ping(sock: Socket, dst: SocketAddr, timeout: Duration) -> Result<String, RequestError> {
    sock.connect(&SockAddr::from(dst))?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(timeout))?;
    sock.send(b"ping\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// [`udp_request`] from exactly `src` (an address of `netns`, or unspecified, and a fixed
/// port): repeated calls reuse one 5-tuple, and so one conntrack entry, as a DNS client
/// reusing its source port does.
pub fn udp_request_bound(
    netns: &str,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String, RequestError> {
    in_netns(netns, || -> Result<String, RequestError> {
        let sock = socket_for(dst, Type::DGRAM, Protocol::UDP)?;
        // The previous call's socket is closed, but be safe against one still lingering.
        sock.set_reuse_address(true)?;
        sock.bind(&SockAddr::from(src))?;
        udp_ping(sock, dst, timeout)
    })?
}

/// Transport of an echo reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A parsed echo server reply: `"<pod-ip> <peer-ip>:<peer-port> <tcp|udp>/<local-port>\n"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply {
    /// The address the server answered on (the pod's own address).
    pub pod: IpAddr,
    /// The source the server saw: the client's address unless masqueraded.
    pub peer: SocketAddr,
    pub proto: Proto,
    /// The port the server listened on (after any targetPort mapping).
    pub port: u16,
}

impl EchoReply {
    fn render(pod: IpAddr, peer: SocketAddr, proto: Proto, port: u16) -> String {
        let proto = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        format!("{pod} {peer} {proto}/{port}\n")
    }

    /// Parse a reply; `None` when it is not an echo server's.
    pub fn parse(reply: &str) -> Option<EchoReply> {
        let mut parts = reply.split_whitespace();
        let pod = parts.next()?.parse().ok()?;
        let peer = parts.next()?.parse().ok()?;
        let (proto, port) = parts.next()?.split_once('/')?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return None,
        };
        let port = port.parse().ok()?;
        parts.next().is_none().then_some(EchoReply {
            pod,
            peer,
            proto,
            port,
        })
    }
}

/// The echo server of one namespace: TCP listeners and UDP sockets on every given
/// address and port, served by one thread with `poll(2)`. Each TCP connection gets
/// the reply and is closed (the server reads nothing); each UDP datagram is answered.
/// Stopped and joined on drop.
#[derive(Debug)]
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

enum Listening {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listening {
    fn fd(&self) -> i32 {
        match self {
            Listening::Tcp(l) => l.as_raw_fd(),
            Listening::Udp(s) => s.as_raw_fd(),
        }
    }

    /// Answer everything pending; errors on one client never stop the server.
    fn serve(&self) {
        match self {
            Listening::Tcp(listener) => {
                while let Ok((mut stream, peer)) = listener.accept() {
                    let Ok(local) = stream.local_addr() else {
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                    let reply = EchoReply::render(local.ip(), peer, Proto::Tcp, local.port());
                    let _ = stream.write_all(reply.as_bytes());
                }
            }
            Listening::Udp(sock) => {
                let mut buf = [0u8; 2048];
                let Ok(local) = sock.local_addr() else {
                    return;
                };
                while let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let reply = EchoReply::render(local.ip(), peer, Proto::Udp, local.port());
                    let _ = sock.send_to(reply.as_bytes(), peer);
                }
            }
        }
    }
}

impl EchoServer {
    /// Start serving in namespace `netns` on `addrs` × `tcp_ports` (TCP) and
    /// `addrs` × `udp_ports` (UDP). Returns once every socket is bound, so a request
    /// sent afterwards cannot race the server's startup.
    pub fn start(
        netns: &str,
        addrs: &[IpAddr],
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> io::Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.to_string();
        let addrs = addrs.to_vec();
        let (tcp_ports, udp_ports) = (tcp_ports.to_vec(), udp_ports.to_vec());
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("echo-{netns}"))
            .spawn(move || {
                let bound = (|| -> io::Result<Vec<Listening>> {
                    enter_netns(&netns)?;
                    let mut socks = Vec::new();
                    for &ip in &addrs {
                        for &port in &tcp_ports {
                            let l = TcpListener::bind((ip, port))?;
                            l.set_nonblocking(true)?;
                            socks.push(Listening::Tcp(l));
                        }
                        for &port in &udp_ports {
                            let s = UdpSocket::bind((ip, port))?;
                            s.set_nonblocking(true)?;
                            socks.push(Listening::Udp(s));
                        }
                    }
                    Ok(socks)
                })();
                let socks = match bound {
                    Ok(socks) => {
                        let _ = ready_tx.send(Ok(()));
                        socks
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut fds: Vec<libc::pollfd> = socks
                    .iter()
                    .map(|s| libc::pollfd {
                        fd: s.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                while !stop_flag.load(Ordering::Relaxed) {
                    // The timeout only bounds how long a stop request waits.
                    // SAFETY: `fds` is a valid, exclusively borrowed array of its length.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
                    if n <= 0 {
                        continue;
                    }
                    for (pfd, sock) in fds.iter_mut().zip(&socks) {
                        if pfd.revents != 0 {
                            pfd.revents = 0;
                            sock.serve();
                        }
                    }
                }
            })?;
        let server = EchoServer {
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("echo server thread exited early"))??;
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_reply_round_trips() {
        let text = EchoReply::render(
            "10.244.1.10".parse().unwrap(),
            "[fd00::1]:4000".parse().unwrap(),
            Proto::Udp,
            53,
        );
        assert_eq!(text, "10.244.1.10 [fd00::1]:4000 udp/53\n");
        let reply = EchoReply::parse(&text).unwrap();
        assert_eq!(reply.port, 53);
        assert_eq!(reply.proto, Proto::Udp);
        assert_eq!(reply.peer.port(), 4000);
        assert!(EchoReply::parse("10.0.0.1 nonsense tcp/1").is_none());
        assert!(EchoReply::parse("10.0.0.1 1.2.3.4:5 tcp/1 extra").is_none());
    }

    #[test]
    fn io_errors_are_classified() {
        use io::ErrorKind as K;
        assert!(matches!(
            RequestError::from(io::Error::from(K::ConnectionRefused)),
            RequestError::Refused
        ));
        assert!(matches!(
            RequestError::from(io::Error::from(K::WouldBlock)),
            RequestError::Timeout
        ));
        assert!(matches!(
            RequestError::from(io::Error::from(K::HostUnreachable)),
            RequestError::Unreachable(_)
        ));
    }
}
