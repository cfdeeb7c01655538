//! The DNS server: hickory-server's [`Server`] (UDP and TCP) over a [`RequestHandler`] that
//! answers from the current [`Zone`] snapshot, and forwards other names to upstream servers
//! for clients in the allowed networks.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::DnsMetrics;
use crate::records::{Lookup, Zone};

/// Largest UDP response svcplane sends, whatever the client advertises (RFC 6891 lets the
/// responder cap it; 4096 is what most servers use).
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// How long one upstream server gets to answer a forwarded query.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle TCP connections are closed after this long.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("--dns-listen {addr}: cannot listen on {proto}: {error}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        error: io::Error,
    },
    #[error("DNS server failed: {0}")]
    Server(String),
}

/// Where queries for names outside the zone go.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// Upstream servers, tried in order; empty: names outside the zone are REFUSED.
    pub upstreams: Vec<SocketAddr>,
    /// Clients allowed to recurse (everyone else is REFUSED for names outside the zone).
    pub allow: Vec<IpNet>,
    pub timeout: Duration,
}

impl Forwarding {
    /// The default allowed networks: loopback plus the cluster CIDRs.
    pub fn default_allow(cluster_cidrs: &[IpNet]) -> Vec<IpNet> {
        let mut allow: Vec<IpNet> = vec![
            IpNet::from(IpAddr::from([127, 0, 0, 1])).supernet_or_self(8),
            IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ];
        allow.extend_from_slice(cluster_cidrs);
        allow
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

trait SupernetOrSelf {
    fn supernet_or_self(self, prefix: u8) -> IpNet;
}

impl SupernetOrSelf for IpNet {
    fn supernet_or_self(self, prefix: u8) -> IpNet {
        IpNet::new(self.addr(), prefix)
            .map(|n| n.trunc())
            .unwrap_or(self)
    }
}

/// Answers queries from the zone snapshot (swapped in by [`crate::ZoneStore`]).
pub struct DnsHandler {
    zone: Arc<ArcSwap<Zone>>,
    forwarding: Forwarding,
    metrics: Arc<DnsMetrics>,
}

impl DnsHandler {
    pub fn new(
        zone: Arc<ArcSwap<Zone>>,
        forwarding: Forwarding,
        metrics: Arc<DnsMetrics>,
    ) -> DnsHandler {
        DnsHandler {
            zone,
            forwarding,
            metrics,
        }
    }

    async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> (Option<RecordType>, ResponseInfo) {
        let resp_edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            edns.set_version(0);
            edns
        });
        let builder = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
        let fail = |code| {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = code;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        macro_rules! send {
            ($response:expr, $code:expr) => {
                match handle.send_response($response).await {
                    Ok(info) => info,
                    Err(error) => {
                        tracing::debug!(%error, "cannot send DNS response");
                        fail($code)
                    }
                }
            };
        }
        macro_rules! error {
            ($qtype:expr, $code:expr) => {{
                let response = builder.error_msg(&request.metadata, $code);
                return ($qtype, send!(response, $code));
            }};
        }

        if request.metadata.op_code != OpCode::Query {
            error!(None, ResponseCode::NotImp);
        }
        let query = match request.request_info() {
            Ok(info) => info.query,
            // Not exactly one question.
            Err(_) => error!(None, ResponseCode::FormErr),
        };
        let qtype = query.query_type();
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            error!(Some(qtype), ResponseCode::BADVERS);
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            error!(Some(qtype), ResponseCode::Refused);
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            error!(Some(qtype), ResponseCode::Refused);
        }
        let may_recurse =
            !self.forwarding.upstreams.is_empty() && self.forwarding.allowed(request.src().ip());

        let zone = self.zone.load_full();
        match zone.lookup(query.name(), qtype) {
            Lookup::Answer(answer) => {
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                metadata.recursion_available = may_recurse;
                metadata.response_code = answer.rcode;
                let response = builder.build(
                    metadata,
                    answer.answers.iter().copied(),
                    answer.authority.iter().copied(),
                    std::iter::empty(),
                    answer.additionals.iter().copied(),
                );
                (Some(qtype), send!(response, ResponseCode::ServFail))
            }
            Lookup::Outside if !may_recurse => error!(Some(qtype), ResponseCode::Refused),
            Lookup::Outside => {
                let Some(upstream) = forward(&self.forwarding, request).await else {
                    error!(Some(qtype), ResponseCode::ServFail);
                };
                let mut metadata = upstream.metadata;
                metadata.id = request.metadata.id;
                metadata.authoritative = false;
                metadata.recursion_available = true;
                let response = builder.build(
                    metadata,
                    upstream.answers.iter(),
                    upstream.authorities.iter(),
                    std::iter::empty(),
                    upstream.additionals.iter(),
                );
                (Some(qtype), send!(response, ResponseCode::ServFail))
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let start = Instant::now();
        let (qtype, info) = self.respond(request, response_handle).await;
        self.metrics.request(qtype);
        self.metrics.response(info.response_code, start.elapsed());
        info
    }
}

/// Ask the upstream servers in turn; `None` when none answered in time.
async fn forward(forwarding: &Forwarding, request: &Request) -> Option<Message> {
    let raw = request.as_slice();
    for upstream in &forwarding.upstreams {
        let id = random_id();
        let mut query = raw.to_vec();
        if query.len() < 12 {
            return None;
        }
        query[..2].copy_from_slice(&id.to_be_bytes());
        let attempt = async {
            let mut reply = forward_udp(*upstream, &query, id).await?;
            // A truncated answer is fetched again over TCP for TCP clients (UDP clients get
            // TC from us and retry over TCP themselves).
            if reply.metadata.truncation && request.protocol() == Protocol::Tcp {
                reply = forward_tcp(*upstream, &query, id).await?;
            }
            Ok::<_, io::Error>(reply)
        };
        match tokio::time::timeout(forwarding.timeout, attempt).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(error)) => tracing::debug!(%upstream, %error, "upstream DNS server failed"),
            Err(_) => tracing::debug!(%upstream, "upstream DNS server timed out"),
        }
    }
    None
}

fn random_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // A fresh RandomState is randomly keyed: enough for an ID on a fresh source port.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() as u16
}

async fn forward_udp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything that is not the answer to this query is ignored (spoofing, stray packets).
        if let Some(reply) = parse_reply(&buf[..n], id) {
            return Ok(reply);
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Message> {
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    parse_reply(&buf, id).ok_or_else(|| io::Error::other("invalid answer from upstream"))
}

fn parse_reply(bytes: &[u8], id: u16) -> Option<Message> {
    let msg = Message::from_vec(bytes).ok()?;
    (msg.metadata.id == id && msg.metadata.message_type == MessageType::Response).then_some(msg)
}

/// A bound UDP socket per worker (SO_REUSEPORT, so the kernel spreads queries over them)
/// and one TCP listener, registered with hickory's [`Server`].
pub struct DnsServer {
    server: Server<DnsHandler>,
    local_addr: SocketAddr,
}

impl DnsServer {
    /// Bind `listen` (port 0: any free port, the same for UDP and TCP) and start serving.
    /// Must be called inside a tokio runtime.
    pub fn bind(
        listen: SocketAddr,
        handler: DnsHandler,
        udp_sockets: usize,
    ) -> Result<DnsServer, DnsError> {
        let bind_err = |proto, error| DnsError::Bind {
            addr: listen,
            proto,
            error,
        };
        let tcp = bind_tcp(listen).map_err(|e| bind_err("TCP", e))?;
        let local_addr = tcp.local_addr().map_err(|e| bind_err("TCP", e))?;
        let mut server = Server::new(handler);
        for _ in 0..udp_sockets.max(1) {
            let udp = bind_udp(local_addr).map_err(|e| bind_err("UDP", e))?;
            server.register_socket(udp);
        }
        server.register_listener(tcp, TCP_TIMEOUT, 32);
        Ok(DnsServer { server, local_addr })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until a socket fails.
    pub async fn run(mut self) -> Result<(), DnsError> {
        self.server
            .block_until_done()
            .await
            .map_err(|e: NetError| DnsError::Server(e.to_string()))
    }
}

fn bind_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Answer one raw message as the server would (for tests and fuzzing): `None` when the
/// server would not reply (shorter than a header, or a response).
pub async fn answer_bytes(
    handler: &DnsHandler,
    raw: &[u8],
    src: SocketAddr,
    protocol: Protocol,
) -> Option<Vec<u8>> {
    let request = match Request::from_bytes(raw.to_vec(), src, protocol) {
        Ok(r) => r,
        Err(_) => {
            // As hickory's server: a readable header gets FORMERR, anything shorter nothing.
            let header = Header::read(&mut BinDecoder::new(raw)).ok()?;
            let mut metadata = Metadata::response_from_request(&header.metadata);
            metadata.response_code = ResponseCode::FormErr;
            let mut out = Vec::new();
            let mut enc = BinEncoder::new(&mut out);
            Header {
                metadata,
                counts: HeaderCounts::default(),
            }
            .emit(&mut enc)
            .ok()?;
            return Some(out);
        }
    };
    if request.metadata.message_type == MessageType::Response {
        return None;
    }
    let capture = Capture {
        slot: Arc::default(),
        protocol,
    };
    handler
        .handle_request::<_, TokioTime>(&request, capture.clone())
        .await;
    capture.slot.lock().ok()?.take()
}

/// A [`ResponseHandler`] that keeps the encoded response (same size limits as the server's).
#[derive(Clone)]
struct Capture {
    slot: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    protocol: Protocol,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = match self.protocol {
            Protocol::Udp => response.edns().map_or(512, |e| e.max_payload()),
            _ => u16::MAX,
        };
        let mut out = Vec::new();
        let mut enc = BinEncoder::new(&mut out);
        enc.set_max_size(max);
        let info = response
            .destructive_emit(&mut enc)
            .map_err(|e| NetError::from(e.to_string()))?;
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(out);
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests;
