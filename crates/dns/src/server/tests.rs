//! The handler over raw messages, as the server sees them.

use super::*;
use hickory_proto::op::Query;
use hickory_proto::rr::{Name, RData};
use svcplane_model::{Change, Format, parse_manifest};

use crate::{ZoneConfig, ZoneStore};

const CLIENT: &str = "127.0.0.1:5555";
const OUTSIDER: &str = "192.0.2.7:5555";

fn headless_yaml(endpoints: usize) -> String {
    let mut eps = String::new();
    for i in 0..endpoints {
        eps.push_str(&format!(
            "  - {{addresses: [10.244.{}.{}], hostname: pod-{i}}}\n",
            i / 200,
            i % 200 + 1
        ));
    }
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: big, namespace: demo}}
spec:
  clusterIP: None
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: big-1, namespace: demo, labels: {{kubernetes.io/service-name: big}}}}
addressType: IPv4
ports: [{{name: http, port: 80, protocol: TCP}}]
endpoints:
{eps}"#
    )
}

fn store(yaml: &str) -> ZoneStore {
    let parsed = parse_manifest(yaml, Format::Yaml).expect("manifests parse");
    assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
    let changes: Vec<Change> = parsed.objects.into_iter().map(Change::Apply).collect();
    let mut store = ZoneStore::new(ZoneConfig::new("cluster.local", 5).unwrap());
    store.apply(&changes);
    store
}

fn handler_with(store: &ZoneStore, upstreams: Vec<SocketAddr>) -> DnsHandler {
    DnsHandler::new(
        store.snapshot_handle(),
        Forwarding {
            upstreams,
            allow: Forwarding::default_allow(&[]),
            timeout: Duration::from_millis(500),
        },
        Arc::new(DnsMetrics::new()),
    )
}

fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut msg = Message::query();
    msg.metadata.id = 0x1234;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        msg.set_edns(e);
    }
    msg.to_vec().unwrap()
}

async fn ask_raw(h: &DnsHandler, raw: &[u8], src: &str, protocol: Protocol) -> Message {
    let bytes = answer_bytes(h, raw, src.parse().unwrap(), protocol)
        .await
        .expect("an answer");
    Message::from_vec(&bytes).expect("a valid DNS message")
}

async fn ask(h: &DnsHandler, name: &str, rtype: RecordType) -> Message {
    ask_raw(h, &query(name, rtype, None), CLIENT, Protocol::Udp).await
}

#[tokio::test]
async fn answers_from_the_zone_authoritatively() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let r = ask(&h, "web.demo.svc.cluster.local.", RecordType::A).await;
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(!r.metadata.recursion_available, "no upstream: no recursion");
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].data, RData::A("10.96.0.10".parse().unwrap()));
    assert_eq!(r.answers[0].ttl, 5);
    assert_eq!(
        r.queries[0].name().to_ascii(),
        "web.demo.svc.cluster.local."
    );
}

#[tokio::test]
async fn nxdomain_carries_the_soa() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let r = ask(&h, "nope.demo.svc.cluster.local.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities.len(), 1);
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn axfr_and_other_classes_are_refused() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    for rtype in [RecordType::AXFR, RecordType::IXFR] {
        let r = ask_raw(
            &h,
            &query("cluster.local.", rtype, None),
            CLIENT,
            Protocol::Tcp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{rtype}");
        assert!(r.answers.is_empty());
    }
    let mut msg = Message::query();
    let mut q = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    msg.add_query(q);
    let r = ask_raw(&h, &msg.to_vec().unwrap(), CLIENT, Protocol::Udp).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn other_opcodes_are_not_implemented() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let mut msg = Message::new(9, MessageType::Query, OpCode::Status);
    msg.add_query(Query::query(
        Name::from_ascii("web.demo.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let r = ask_raw(&h, &msg.to_vec().unwrap(), CLIENT, Protocol::Udp).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    assert!(r.answers.is_empty());
}

#[tokio::test]
async fn outside_the_zone_without_upstream_is_refused() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let r = ask(&h, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn bad_edns_version_and_two_questions() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let mut msg = Message::query();
    msg.add_query(Query::query(
        Name::from_ascii("web.demo.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    msg.set_edns(e);
    let r = ask_raw(&h, &msg.to_vec().unwrap(), CLIENT, Protocol::Udp).await;
    // 16 on the wire; hickory decodes it as BADSIG (the same code).
    assert_eq!(u16::from(r.metadata.response_code), 16);

    let mut msg = Message::query();
    for name in ["web.demo.svc.cluster.local.", "big.demo.svc.cluster.local."] {
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    }
    let r = ask_raw(&h, &msg.to_vec().unwrap(), CLIENT, Protocol::Udp).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
}

#[tokio::test]
async fn big_answers_are_truncated_on_udp_only() {
    let s = store(&headless_yaml(300));
    let h = handler_with(&s, vec![]);
    let name = "big.demo.svc.cluster.local.";
    // No EDNS: 512 bytes.
    let r = ask_raw(&h, &query(name, RecordType::A, None), CLIENT, Protocol::Udp).await;
    assert!(r.metadata.truncation, "TC expected");
    assert!(r.answers.len() < 300);
    // EDNS 1232: more fits, still not all 300 (16 bytes each, compressed).
    let small = r.answers.len();
    let r = ask_raw(
        &h,
        &query(name, RecordType::A, Some(1232)),
        CLIENT,
        Protocol::Udp,
    )
    .await;
    assert!(r.metadata.truncation);
    assert!(r.answers.len() > small, "{} <= {small}", r.answers.len());
    // EDNS 4096 holds all 300 A records (12 + 32 + 300 * 16 = 4844 > 4096: no), so TCP.
    let r = ask_raw(&h, &query(name, RecordType::A, None), CLIENT, Protocol::Tcp).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 300);
    // A small answer over UDP is not truncated.
    let r = ask(&h, "web.demo.svc.cluster.local.", RecordType::A).await;
    assert!(!r.metadata.truncation);
}

#[tokio::test]
async fn edns_in_the_answer_caps_the_payload() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let r = ask_raw(
        &h,
        &query("web.demo.svc.cluster.local.", RecordType::A, Some(65000)),
        CLIENT,
        Protocol::Udp,
    )
    .await;
    let edns = r.edns.expect("EDNS answered with EDNS");
    assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD);
}

#[tokio::test]
async fn snapshot_swaps_are_answered_from_the_next_query() {
    let mut s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let name = "fresh.demo.svc.cluster.local.";
    assert_eq!(
        ask(&h, name, RecordType::A).await.metadata.response_code,
        ResponseCode::NXDomain
    );
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: fresh, namespace: demo}\nspec:\n  clusterIP: 10.96.9.9\n  ports: [{port: 80}]\n";
    let parsed = parse_manifest(yaml, Format::Yaml).unwrap();
    let changes: Vec<Change> = parsed.objects.into_iter().map(Change::Apply).collect();
    assert!(s.apply(&changes));
    let r = ask(&h, name, RecordType::A).await;
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].data, RData::A("10.96.9.9".parse().unwrap()));
    // Applying the same objects again publishes nothing new.
    assert!(!s.apply(&changes));
}

/// A fake upstream: answers every A query with 192.0.2.1 (and counts them).
async fn fake_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_available = true;
            for query in &q.queries {
                r.add_query(query.clone());
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A("192.0.2.1".parse().unwrap()),
                ));
            }
            let _ = socket.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn forwards_outside_names_for_allowed_clients_only() {
    let (upstream, seen) = fake_upstream().await;
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![upstream]);
    let r = ask(&h, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.metadata.id, 0x1234);
    assert!(!r.metadata.authoritative);
    assert!(r.metadata.recursion_available);
    assert_eq!(r.answers[0].data, RData::A("192.0.2.1".parse().unwrap()));
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    // In-zone names never go upstream, and tell allowed clients that recursion is available.
    let r = ask(&h, "web.demo.svc.cluster.local.", RecordType::A).await;
    assert!(r.metadata.recursion_available);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Someone outside the allowed networks: refused, nothing sent upstream.
    let raw = query("example.com.", RecordType::A, None);
    let r = ask_raw(&h, &raw, OUTSIDER, Protocol::Udp).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    // ... but it gets in-zone answers.
    let raw = query("web.demo.svc.cluster.local.", RecordType::A, None);
    let r = ask_raw(&h, &raw, OUTSIDER, Protocol::Udp).await;
    assert_eq!(r.answers.len(), 1);
    assert!(!r.metadata.recursion_available);
}

/// An upstream that answers UDP with TC and no records, and TCP with the full answer.
async fn truncating_upstream() -> SocketAddr {
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    let answer = |q: &Message, truncated: bool| {
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.truncation = truncated;
        for query in &q.queries {
            r.add_query(query.clone());
            if !truncated {
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A("192.0.2.9".parse().unwrap()),
                ));
            }
        }
        r.to_vec().unwrap()
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if let Ok(q) = Message::from_vec(&buf[..n]) {
                let _ = udp.send_to(&answer(&q, true), from).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let Ok(len) = stream.read_u16().await else {
                continue;
            };
            let mut buf = vec![0u8; usize::from(len)];
            if stream.read_exact(&mut buf).await.is_err() {
                continue;
            }
            let Ok(q) = Message::from_vec(&buf) else {
                continue;
            };
            let out = answer(&q, false);
            let mut framed = (out.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&out);
            let _ = stream.write_all(&framed).await;
        }
    });
    addr
}

#[tokio::test]
async fn a_truncated_upstream_answer_is_fetched_over_tcp_for_tcp_clients() {
    let upstream = truncating_upstream().await;
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![upstream]);
    let raw = query("example.com.", RecordType::A, None);
    // A UDP client gets the TC answer (and retries over TCP itself).
    let r = ask_raw(&h, &raw, CLIENT, Protocol::Udp).await;
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());
    // A TCP client gets the whole answer.
    let r = ask_raw(&h, &raw, CLIENT, Protocol::Tcp).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers[0].data, RData::A("192.0.2.9".parse().unwrap()));
}

#[tokio::test]
async fn a_silent_upstream_is_servfail_and_the_next_one_is_tried() {
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![silent_addr]);
    let r = ask(&h, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    let (upstream, _) = fake_upstream().await;
    let h = handler_with(&s, vec![silent_addr, upstream]);
    let r = ask(&h, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    drop(silent);
}

#[tokio::test]
async fn short_and_malformed_messages() {
    let s = store(&headless_yaml(2));
    let h = handler_with(&s, vec![]);
    let src: SocketAddr = CLIENT.parse().unwrap();
    assert!(
        answer_bytes(&h, &[1, 2, 3], src, Protocol::Udp)
            .await
            .is_none()
    );
    // A header claiming a question that is not there: FORMERR.
    let raw = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e'];
    let r = answer_bytes(&h, &raw, src, Protocol::Udp).await.unwrap();
    let r = Message::from_vec(&r).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 0x1234);
    // A response is never answered (no reflection loops).
    let mut msg = Message::response(7, OpCode::Query);
    msg.add_query(Query::query(
        Name::from_ascii("web.demo.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    assert!(
        answer_bytes(&h, &msg.to_vec().unwrap(), src, Protocol::Udp)
            .await
            .is_none()
    );
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    static HANDLER: std::sync::LazyLock<(ZoneStore, DnsHandler)> = std::sync::LazyLock::new(|| {
        let s = store(&headless_yaml(40));
        let h = handler_with(&s, vec![]);
        (s, h)
    });

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes, and mutated real queries: never a panic, and anything answered
        /// parses as a DNS message with the request's ID.
        #[test]
        fn random_packets(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            tcp in any::<bool>(),
        ) {
            let rt = runtime();
            let h = &HANDLER.1;
            let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
            let src: SocketAddr = CLIENT.parse().unwrap();
            let mut mutated = query("_http._tcp.big.demo.svc.cluster.local.", RecordType::SRV, Some(1232));
            for (at, b) in flips {
                let len = mutated.len();
                mutated[at % len] ^= b;
            }
            for raw in [bytes, mutated] {
                if let Some(out) = rt.block_on(answer_bytes(h, &raw, src, protocol)) {
                    prop_assert!(out.len() >= 12);
                    prop_assert_eq!(&out[..2], &raw[..2]);
                    if protocol == Protocol::Udp {
                        prop_assert!(out.len() <= usize::from(MAX_UDP_PAYLOAD));
                    }
                }
            }
            // The handler still answers a good query afterwards.
            let good = rt.block_on(ask(h, "web.demo.svc.cluster.local.", RecordType::A));
            prop_assert_eq!(good.answers.len(), 1);
        }
    }
}
