//! The spec's examples (Kubernetes DNS-Based Service Discovery 1.1.0), from manifests.

use super::*;
use svcplane_model::{Format, Object, parse_manifest};

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
    - {name: http, port: 80, protocol: TCP}
    - {name: dns, port: 53, protocol: UDP}
    - {name: metrics, port: 9100, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: other}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: demo
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 15432, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.5]
    hostname: db-0
    conditions: {ready: true}
  - addresses: [10.244.2.6]
    conditions: {ready: true}
  - addresses: [10.244.2.7]
    hostname: db-2
    conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: empty-1
  namespace: demo
  labels: {kubernetes.io/service-name: empty}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
  - addresses: [10.244.3.1]
    conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: early, namespace: demo}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: early-1
  namespace: demo
  labels: {kubernetes.io/service-name: early}
addressType: IPv6
ports: [{port: 80}]
endpoints:
  - addresses: ["fd00:244::9"]
    conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: docs, namespace: demo}
spec:
  type: ExternalName
  externalName: docs.example.com
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: demo}
spec:
  type: ExternalName
  externalName: web.demo.svc.cluster.local
"#;

fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let parsed = parse_manifest(yaml, Format::Yaml).expect("test manifests parse");
    assert!(parsed.invalid.is_empty(), "invalid: {:?}", parsed.invalid);
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for o in parsed.objects {
        match o {
            Object::Service(s) => services.push(std::sync::Arc::unwrap_or_clone(s)),
            Object::EndpointSlice(s) => slices.push(std::sync::Arc::unwrap_or_clone(s)),
            _ => {}
        }
    }
    (services, slices)
}

fn zone_from(yaml: &str) -> Zone {
    let (services, slices) = objects(yaml);
    let config = ZoneConfig::new("cluster.local", 5).expect("valid domain");
    Zone::build(&config, &services, &slices, 42)
}

fn zone() -> Zone {
    zone_from(OBJECTS)
}

/// (rcode, answers as "name TYPE data" sorted, authority types, additionals sorted).
#[derive(Debug)]
struct Seen {
    rcode: ResponseCode,
    answers: Vec<String>,
    authority: Vec<String>,
    additionals: Vec<String>,
}

fn show(r: &Record) -> String {
    format!("{} {} {}", r.name, r.record_type(), r.data)
}

fn ask(zone: &Zone, name: &str, rtype: RecordType) -> Option<Seen> {
    let qname = LowerName::new(&Name::from_ascii(name).expect("test name"));
    match zone.lookup(&qname, rtype) {
        Lookup::Outside => None,
        Lookup::Answer(a) => {
            let mut answers: Vec<String> = a.answers.iter().map(|r| show(r)).collect();
            answers.sort();
            let mut additionals: Vec<String> = a.additionals.iter().map(|r| show(r)).collect();
            additionals.sort();
            Some(Seen {
                rcode: a.rcode,
                answers,
                authority: a.authority.iter().map(|r| show(r)).collect(),
                additionals,
            })
        }
    }
}

fn answers(zone: &Zone, name: &str, rtype: RecordType) -> Vec<String> {
    let seen = ask(zone, name, rtype).expect("in zone");
    assert_eq!(
        seen.rcode,
        ResponseCode::NoError,
        "{name} {rtype}: {seen:?}"
    );
    seen.answers
}

fn assert_nxdomain(zone: &Zone, name: &str, rtype: RecordType) {
    let seen = ask(zone, name, rtype).expect("in zone");
    assert_eq!(
        seen.rcode,
        ResponseCode::NXDomain,
        "{name} {rtype}: {seen:?}"
    );
    assert!(seen.answers.is_empty());
    assert_eq!(seen.authority.len(), 1);
    assert!(
        seen.authority[0]
            .starts_with("cluster.local. SOA ns.dns.cluster.local. hostmaster.cluster.local. 42 "),
        "{:?}",
        seen.authority
    );
}

fn assert_nodata(zone: &Zone, name: &str, rtype: RecordType) {
    let seen = ask(zone, name, rtype).expect("in zone");
    assert_eq!(
        seen.rcode,
        ResponseCode::NoError,
        "{name} {rtype}: {seen:?}"
    );
    assert!(seen.answers.is_empty(), "{name} {rtype}: {seen:?}");
    assert_eq!(seen.authority.len(), 1, "SOA in authority: {seen:?}");
    assert!(seen.authority[0].contains(" SOA "));
}

#[test]
fn cluster_ip_a_and_aaaa_both_families() {
    let z = zone();
    assert_eq!(
        answers(&z, "web.demo.svc.cluster.local.", RecordType::A),
        ["web.demo.svc.cluster.local. A 10.96.0.10"]
    );
    assert_eq!(
        answers(&z, "web.demo.svc.cluster.local.", RecordType::AAAA),
        ["web.demo.svc.cluster.local. AAAA fd00:96::10"]
    );
    // A service without endpoints still has its ClusterIP record.
    assert_eq!(
        answers(&z, "lonely.other.svc.cluster.local.", RecordType::A),
        ["lonely.other.svc.cluster.local. A 10.96.0.20"]
    );
    // Single-stack: NODATA for the other family.
    assert_nodata(&z, "lonely.other.svc.cluster.local.", RecordType::AAAA);
}

#[test]
fn names_are_case_insensitive() {
    let z = zone();
    assert_eq!(
        answers(&z, "WeB.DEMO.svc.Cluster.Local.", RecordType::A),
        ["web.demo.svc.cluster.local. A 10.96.0.10"]
    );
}

#[test]
fn cluster_ip_srv_per_named_port() {
    let z = zone();
    let seen = ask(
        &z,
        "_http._tcp.web.demo.svc.cluster.local.",
        RecordType::SRV,
    )
    .unwrap();
    assert_eq!(
        seen.answers,
        ["_http._tcp.web.demo.svc.cluster.local. SRV 0 100 80 web.demo.svc.cluster.local."]
    );
    assert_eq!(
        seen.additionals,
        [
            "web.demo.svc.cluster.local. A 10.96.0.10",
            "web.demo.svc.cluster.local. AAAA fd00:96::10"
        ]
    );
    assert_eq!(
        answers(&z, "_dns._udp.web.demo.svc.cluster.local.", RecordType::SRV),
        ["_dns._udp.web.demo.svc.cluster.local. SRV 0 100 53 web.demo.svc.cluster.local."]
    );
    // The wrong protocol, or an unknown port name, does not exist.
    assert_nxdomain(&z, "_dns._tcp.web.demo.svc.cluster.local.", RecordType::SRV);
    assert_nxdomain(
        &z,
        "_nope._tcp.web.demo.svc.cluster.local.",
        RecordType::SRV,
    );
    // An unnamed port has no SRV record.
    assert_nodata(&z, "lonely.other.svc.cluster.local.", RecordType::SRV);
    // The SRV name has no A record.
    assert_nodata(&z, "_http._tcp.web.demo.svc.cluster.local.", RecordType::A);
    // `_tcp.web...` is an empty non-terminal.
    assert_nodata(&z, "_tcp.web.demo.svc.cluster.local.", RecordType::SRV);
}

#[test]
fn headless_a_per_ready_endpoint() {
    let z = zone();
    assert_eq!(
        answers(&z, "db.demo.svc.cluster.local.", RecordType::A),
        [
            "db.demo.svc.cluster.local. A 10.244.1.5",
            "db.demo.svc.cluster.local. A 10.244.2.6"
        ]
    );
    // The not-ready endpoint (db-2) is not published.
    assert_nxdomain(&z, "db-2.db.demo.svc.cluster.local.", RecordType::A);
}

#[test]
fn headless_hostname_records() {
    let z = zone();
    assert_eq!(
        answers(&z, "db-0.db.demo.svc.cluster.local.", RecordType::A),
        ["db-0.db.demo.svc.cluster.local. A 10.244.1.5"]
    );
    // No hostname: CoreDNS's dashed-IP name.
    assert_eq!(
        answers(&z, "10-244-2-6.db.demo.svc.cluster.local.", RecordType::A),
        ["10-244-2-6.db.demo.svc.cluster.local. A 10.244.2.6"]
    );
    assert_nodata(&z, "db-0.db.demo.svc.cluster.local.", RecordType::AAAA);
}

#[test]
fn headless_srv_per_ready_endpoint_and_port() {
    let z = zone();
    let seen = ask(&z, "_pg._tcp.db.demo.svc.cluster.local.", RecordType::SRV).unwrap();
    // Weight 100 / 2 records; the port is the endpoint's (target) port.
    assert_eq!(
        seen.answers,
        [
            "_pg._tcp.db.demo.svc.cluster.local. SRV 0 50 15432 10-244-2-6.db.demo.svc.cluster.local.",
            "_pg._tcp.db.demo.svc.cluster.local. SRV 0 50 15432 db-0.db.demo.svc.cluster.local."
        ]
    );
    assert_eq!(
        seen.additionals,
        [
            "10-244-2-6.db.demo.svc.cluster.local. A 10.244.2.6",
            "db-0.db.demo.svc.cluster.local. A 10.244.1.5"
        ]
    );
}

#[test]
fn headless_without_ready_endpoints_is_nxdomain() {
    let z = zone();
    assert_nxdomain(&z, "empty.demo.svc.cluster.local.", RecordType::A);
    assert_nxdomain(
        &z,
        "_pg._tcp.empty.demo.svc.cluster.local.",
        RecordType::SRV,
    );
}

#[test]
fn publish_not_ready_addresses_publishes_all() {
    let z = zone();
    assert_eq!(
        answers(&z, "early.demo.svc.cluster.local.", RecordType::AAAA),
        ["early.demo.svc.cluster.local. AAAA fd00:244::9"]
    );
    assert_eq!(
        answers(
            &z,
            "fd00-244--9.early.demo.svc.cluster.local.",
            RecordType::AAAA
        ),
        ["fd00-244--9.early.demo.svc.cluster.local. AAAA fd00:244::9"]
    );
}

#[test]
fn external_name_is_a_cname() {
    let z = zone();
    for rtype in [RecordType::A, RecordType::AAAA, RecordType::CNAME] {
        assert_eq!(
            answers(&z, "docs.demo.svc.cluster.local.", rtype),
            ["docs.demo.svc.cluster.local. CNAME docs.example.com."],
            "{rtype}"
        );
    }
    // A target inside the zone is followed.
    assert_eq!(
        answers(&z, "alias.demo.svc.cluster.local.", RecordType::A),
        [
            "alias.demo.svc.cluster.local. CNAME web.demo.svc.cluster.local.",
            "web.demo.svc.cluster.local. A 10.96.0.10"
        ]
    );
}

#[test]
fn ptr_for_cluster_ips_and_headless_endpoints() {
    let z = zone();
    assert_eq!(
        answers(&z, "10.0.96.10.in-addr.arpa.", RecordType::PTR),
        ["10.0.96.10.in-addr.arpa. PTR web.demo.svc.cluster.local."]
    );
    let v6 = Name::from(IpAddr::from([0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10])).to_ascii();
    assert_eq!(
        answers(&z, &v6, RecordType::PTR),
        [format!("{v6} PTR web.demo.svc.cluster.local.")]
    );
    assert_eq!(
        answers(&z, "5.1.244.10.in-addr.arpa.", RecordType::PTR),
        ["5.1.244.10.in-addr.arpa. PTR db-0.db.demo.svc.cluster.local."]
    );
    assert_eq!(
        answers(&z, "6.2.244.10.in-addr.arpa.", RecordType::PTR),
        ["6.2.244.10.in-addr.arpa. PTR 10-244-2-6.db.demo.svc.cluster.local."]
    );
    // A known address asked for another type: NODATA with the reverse zone's SOA.
    let seen = ask(&z, "10.0.96.10.in-addr.arpa.", RecordType::A).unwrap();
    assert!(seen.answers.is_empty());
    assert!(
        seen.authority[0].starts_with("in-addr.arpa. SOA"),
        "{seen:?}"
    );
    // Unknown addresses are not ours (forwarded or refused by the server).
    assert!(ask(&z, "9.9.9.9.in-addr.arpa.", RecordType::PTR).is_none());
    // The not-ready endpoint has no PTR.
    assert!(ask(&z, "7.2.244.10.in-addr.arpa.", RecordType::PTR).is_none());
}

#[test]
fn dns_version_txt() {
    let z = zone();
    assert_eq!(
        answers(&z, "dns-version.cluster.local.", RecordType::TXT),
        ["dns-version.cluster.local. TXT 1.1.0"]
    );
}

#[test]
fn nonexistent_names_are_nxdomain_with_soa() {
    let z = zone();
    assert_nxdomain(&z, "nope.demo.svc.cluster.local.", RecordType::A);
    assert_nxdomain(&z, "web.nope.svc.cluster.local.", RecordType::A);
    assert_nxdomain(&z, "web.demo.cluster.local.", RecordType::A);
    assert_nxdomain(&z, "x.db-0.db.demo.svc.cluster.local.", RecordType::A);
}

#[test]
fn existing_names_without_the_type_are_nodata() {
    let z = zone();
    assert_nodata(&z, "web.demo.svc.cluster.local.", RecordType::TXT);
    assert_nodata(&z, "web.demo.svc.cluster.local.", RecordType::MX);
    // A namespace with services, the `svc` label and the apex exist.
    assert_nodata(&z, "demo.svc.cluster.local.", RecordType::A);
    assert_nodata(&z, "other.svc.cluster.local.", RecordType::A);
    assert_nodata(&z, "svc.cluster.local.", RecordType::A);
    assert_nodata(&z, "cluster.local.", RecordType::A);
}

#[test]
fn namespace_of_only_an_empty_headless_service_exists() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: h, namespace: lone}
spec:
  clusterIP: None
  ports: [{port: 80}]
"#;
    let z = zone_from(yaml);
    assert_nodata(&z, "lone.svc.cluster.local.", RecordType::A);
    assert_nxdomain(&z, "h.lone.svc.cluster.local.", RecordType::A);
}

#[test]
fn apex_soa() {
    let z = zone();
    let a = answers(&z, "cluster.local.", RecordType::SOA);
    assert_eq!(a.len(), 1);
    assert!(a[0].starts_with("cluster.local. SOA ns.dns.cluster.local. hostmaster.cluster.local. 42 7200 1800 86400 5"), "{a:?}");
}

#[test]
fn any_returns_every_record_of_the_name() {
    let z = zone();
    assert_eq!(
        answers(&z, "web.demo.svc.cluster.local.", RecordType::ANY),
        [
            "web.demo.svc.cluster.local. A 10.96.0.10",
            "web.demo.svc.cluster.local. AAAA fd00:96::10"
        ]
    );
}

#[test]
fn names_outside_the_zone() {
    let z = zone();
    assert!(ask(&z, "example.com.", RecordType::A).is_none());
    assert!(ask(&z, "local.", RecordType::A).is_none());
    assert!(ask(&z, "xcluster.local.", RecordType::A).is_none());
}

#[test]
fn ttl_is_the_configured_one() {
    let (services, slices) = objects(OBJECTS);
    let config = ZoneConfig::new("Cluster.Local.", 30).unwrap();
    let z = Zone::build(&config, &services, &slices, 1);
    let qname = LowerName::new(&Name::from_ascii("web.demo.svc.cluster.local.").unwrap());
    let Lookup::Answer(a) = z.lookup(&qname, RecordType::A) else {
        panic!("in zone");
    };
    assert_eq!(a.answers[0].ttl, 30);
}

#[test]
fn custom_cluster_domain() {
    let (services, slices) = objects(OBJECTS);
    let config = ZoneConfig::new("k8s.example.org", 5).unwrap();
    let z = Zone::build(&config, &services, &slices, 1);
    assert_eq!(
        answers(&z, "web.demo.svc.k8s.example.org.", RecordType::A),
        ["web.demo.svc.k8s.example.org. A 10.96.0.10"]
    );
    assert!(ask(&z, "web.demo.svc.cluster.local.", RecordType::A).is_none());
    assert!(ZoneConfig::new("", 5).is_err());
    assert!(ZoneConfig::new("bad..domain", 5).is_err());
}

#[test]
fn endpoints_in_two_slices_are_served_once() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: h, namespace: ns}
spec:
  clusterIP: None
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: h-1, namespace: ns, labels: {kubernetes.io/service-name: h}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints: [{addresses: [10.0.0.1], hostname: a}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: h-2, namespace: ns, labels: {kubernetes.io/service-name: h}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints: [{addresses: [10.0.0.1], hostname: a}, {addresses: [10.0.0.2], hostname: b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-1, namespace: ns, labels: {kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints: [{addresses: [10.0.0.9]}]
"#;
    let z = zone_from(yaml);
    assert_eq!(
        answers(&z, "h.ns.svc.cluster.local.", RecordType::A),
        [
            "h.ns.svc.cluster.local. A 10.0.0.1",
            "h.ns.svc.cluster.local. A 10.0.0.2"
        ]
    );
    assert_eq!(
        answers(&z, "_http._tcp.h.ns.svc.cluster.local.", RecordType::SRV),
        [
            "_http._tcp.h.ns.svc.cluster.local. SRV 0 50 80 a.h.ns.svc.cluster.local.",
            "_http._tcp.h.ns.svc.cluster.local. SRV 0 50 80 b.h.ns.svc.cluster.local."
        ]
    );
    // A slice of a Service that does not exist serves nothing.
    assert_nxdomain(&z, "other.ns.svc.cluster.local.", RecordType::A);
}

#[test]
fn resolve_follows_a_name_as_a_lookup_would() {
    let z = zone();
    let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
    assert_eq!(
        z.resolve("web.demo.svc.cluster.local").unwrap(),
        Resolution::Addresses(ips(&["10.96.0.10", "fd00:96::10"]))
    );
    // Case and a trailing dot do not matter.
    assert_eq!(
        z.resolve("WEB.demo.svc.cluster.local.").unwrap(),
        Resolution::Addresses(ips(&["10.96.0.10", "fd00:96::10"]))
    );
    // Headless: the ready endpoints.
    assert_eq!(
        z.resolve("db.demo.svc.cluster.local").unwrap(),
        Resolution::Addresses(ips(&["10.244.1.5", "10.244.2.6"]))
    );
    assert_eq!(
        z.resolve("docs.demo.svc.cluster.local").unwrap(),
        Resolution::Cname {
            target: "docs.example.com.".into(),
            addresses: Vec::new()
        }
    );
    assert_eq!(
        z.resolve("alias.demo.svc.cluster.local").unwrap(),
        Resolution::Cname {
            target: "web.demo.svc.cluster.local.".into(),
            addresses: ips(&["10.96.0.10", "fd00:96::10"])
        }
    );
    assert_eq!(
        z.resolve("nope.demo.svc.cluster.local").unwrap(),
        Resolution::NxDomain
    );
    assert_eq!(z.resolve("example.com").unwrap(), Resolution::Outside);
    assert!(z.resolve("a..b").is_err());
}
