//! The record logic: Kubernetes DNS-Based Service Discovery 1.1.0 from svcplane's model
//! objects, with CoreDNS's `kubernetes` plugin behaviour where the spec leaves room.
//!
//! A [`Zone`] is an immutable snapshot: every name and record is computed when it is built,
//! so answering is a hash lookup (the server swaps in a new snapshot after each change).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use svcplane_model::{EndpointSlice, NamespacedName, Service, ServiceType};

/// The spec version served at `dns-version.<zone>`.
pub const SPEC_VERSION: &str = "1.1.0";

/// CoreDNS's default TTL for the `kubernetes` plugin.
pub const DEFAULT_TTL: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("invalid cluster domain {domain:?}: {message}")]
    Domain { domain: String, message: String },
    #[error("invalid DNS name {name:?}: {message}")]
    Name { name: String, message: String },
}

/// What a name resolves to in a [`Zone`] ([`Zone::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A/AAAA records (empty: the name exists without addresses, e.g. a headless
    /// Service without ready endpoints has NXDOMAIN, an empty non-terminal none).
    Addresses(Vec<IpAddr>),
    /// An ExternalName: the CNAME target, and its addresses when it is in the zone.
    Cname {
        target: String,
        addresses: Vec<IpAddr>,
    },
    /// No such name in the zone.
    NxDomain,
    /// Not a name of the cluster domain.
    Outside,
}

/// What the zone is built with.
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local` (absolute).
    pub origin: Name,
    /// TTL of every answer, and the SOA minimum (negative caching).
    pub ttl: u32,
}

impl ZoneConfig {
    pub fn new(cluster_domain: &str, ttl: u32) -> Result<ZoneConfig, ZoneError> {
        let err = |message: String| ZoneError::Domain {
            domain: cluster_domain.to_string(),
            message,
        };
        let trimmed = cluster_domain.trim_end_matches('.');
        if trimmed.is_empty() {
            return Err(err("must not be empty".into()));
        }
        let mut origin = Name::from_ascii(trimmed).map_err(|e| err(e.to_string()))?;
        origin.set_fqdn(true);
        Ok(ZoneConfig {
            origin: origin.to_lowercase(),
            ttl,
        })
    }
}

/// The result of looking one question up in the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The zone is authoritative for the name: answer this.
    Answer(Answer<'a>),
    /// Not a name of this zone (forward it, or refuse).
    Outside,
}

/// An authoritative answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<'a> {
    pub rcode: ResponseCode,
    pub answers: Vec<&'a Record>,
    /// The SOA on NXDOMAIN and NODATA (RFC 2308), else empty.
    pub authority: Vec<&'a Record>,
    /// A/AAAA of SRV targets inside the zone.
    pub additionals: Vec<&'a Record>,
}

impl Answer<'_> {
    /// NOERROR with no answer records.
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

/// Records of one owner name, grouped by type. An empty node is an existing name without
/// records (an empty non-terminal such as `ns.svc.zone`): NODATA, not NXDOMAIN.
#[derive(Debug, Default, Clone)]
struct Node {
    rrsets: Vec<(RecordType, Vec<Record>)>,
}

impl Node {
    fn get(&self, rtype: RecordType) -> &[Record] {
        self.rrsets
            .iter()
            .find(|(t, _)| *t == rtype)
            .map_or(&[], |(_, r)| r.as_slice())
    }

    fn push(&mut self, record: Record) {
        let rtype = record.record_type();
        match self.rrsets.iter_mut().find(|(t, _)| *t == rtype) {
            Some((_, records)) => {
                // Identical records (the same endpoint address in two slices) are kept once.
                if !records.contains(&record) {
                    records.push(record);
                }
            }
            None => self.rrsets.push((rtype, vec![record])),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Record> {
        self.rrsets.iter().flat_map(|(_, r)| r.iter())
    }
}

/// A snapshot of the cluster zone (and the reverse names of its addresses).
#[derive(Debug)]
pub struct Zone {
    origin: LowerName,
    ttl: u32,
    names: HashMap<LowerName, Node>,
    /// PTR names (`in-addr.arpa`, `ip6.arpa`) of ClusterIPs and headless endpoints.
    reverse: HashMap<LowerName, Node>,
    soa: Record,
    soa_v4_arpa: Record,
    soa_v6_arpa: Record,
    services: usize,
}

impl Zone {
    /// An empty zone (apex and `dns-version` only).
    pub fn empty(config: &ZoneConfig, serial: u32) -> Zone {
        Zone::build(config, std::iter::empty(), std::iter::empty(), serial)
    }

    /// Build the zone from every Service and EndpointSlice. `serial` goes into the SOA.
    pub fn build<'a>(
        config: &ZoneConfig,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        serial: u32,
    ) -> Zone {
        let origin = config.origin.clone();
        let ttl = config.ttl;
        let soa_for = |owner: &Name| {
            let mname = name_in(&["ns", "dns"], &origin);
            let rname = name_in(&["hostmaster"], &origin);
            // CoreDNS's values: refresh 2h, retry 30m, expire 1d, minimum = ttl.
            let soa = SOA::new(mname, rname, serial, 7200, 1800, 86400, ttl);
            Record::from_rdata(owner.clone(), ttl, RData::SOA(soa))
        };
        let soa = soa_for(&origin);
        let soa_v4_arpa =
            soa_for(&Name::from_ascii("in-addr.arpa.").unwrap_or_else(|_| Name::root()));
        let soa_v6_arpa = soa_for(&Name::from_ascii("ip6.arpa.").unwrap_or_else(|_| Name::root()));

        let mut b = Builder {
            origin: origin.clone(),
            ttl,
            names: HashMap::new(),
            reverse: HashMap::new(),
        };
        b.add(origin.clone(), soa.data.clone());
        b.add(
            name_in(&["dns-version"], &origin),
            RData::TXT(TXT::new(vec![SPEC_VERSION.to_string()])),
        );

        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices {
            if let Some(svc) = &slice.service_name {
                by_service
                    .entry((slice.name.namespace.as_ref(), svc.as_ref()))
                    .or_default()
                    .push(slice);
            }
        }
        // Services in a stable order, so record order does not depend on hashing.
        let mut ordered: BTreeMap<&NamespacedName, &Service> = BTreeMap::new();
        for svc in services {
            ordered.insert(&svc.name, svc);
        }
        let services = ordered.len();
        for svc in ordered.values() {
            let slices = by_service
                .get(&(svc.name.namespace.as_ref(), svc.name.name.as_ref()))
                .map_or(&[][..], |v| v.as_slice());
            b.add_service(svc, slices);
        }
        b.finish_srv_weights();
        b.add_ancestors();
        Zone {
            origin: LowerName::new(&origin),
            ttl,
            names: b.names,
            reverse: b.reverse,
            soa,
            soa_v4_arpa,
            soa_v6_arpa,
            services,
        }
    }

    /// The zone's origin (the cluster domain, absolute).
    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// Number of Services the snapshot was built from.
    pub fn services(&self) -> usize {
        self.services
    }

    /// Number of owner names (forward and reverse).
    pub fn names(&self) -> usize {
        self.names.len() + self.reverse.len()
    }

    /// The zone's SOA record.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Answer `qtype` for `qname` (already lower-cased by [`LowerName`]).
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Lookup<'_> {
        if let Some(node) = self.reverse.get(qname) {
            let soa = if qname.to_string().ends_with(".ip6.arpa.") {
                &self.soa_v6_arpa
            } else {
                &self.soa_v4_arpa
            };
            return Lookup::Answer(self.answer_node(node, qtype, soa));
        }
        if !self.origin.zone_of(qname) {
            return Lookup::Outside;
        }
        match self.names.get(qname) {
            None => Lookup::Answer(Answer {
                rcode: ResponseCode::NXDomain,
                answers: Vec::new(),
                authority: vec![&self.soa],
                additionals: Vec::new(),
            }),
            Some(node) => Lookup::Answer(self.answer_node(node, qtype, &self.soa)),
        }
    }

    /// What `name` resolves to here, as this zone answers its A, AAAA (and CNAME)
    /// queries: for tools that follow a name the way a pod's lookup would (`svcplane
    /// trace NAME`). `name` is taken as absolute.
    pub fn resolve(&self, name: &str) -> Result<Resolution, ZoneError> {
        let mut parsed =
            Name::from_ascii(name.trim_end_matches('.')).map_err(|e| ZoneError::Name {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        parsed.set_fqdn(true);
        let qname = LowerName::new(&parsed);
        let mut addresses = Vec::new();
        let mut cname = None;
        let mut nxdomain = false;
        for qtype in [RecordType::A, RecordType::AAAA] {
            let Lookup::Answer(answer) = self.lookup(&qname, qtype) else {
                return Ok(Resolution::Outside);
            };
            nxdomain |= answer.rcode == ResponseCode::NXDomain;
            for record in answer.answers {
                match &record.data {
                    RData::A(A(ip)) => addresses.push(IpAddr::V4(*ip)),
                    RData::AAAA(AAAA(ip)) => addresses.push(IpAddr::V6(*ip)),
                    RData::CNAME(CNAME(target)) => cname = Some(target.to_string()),
                    _ => {}
                }
            }
        }
        addresses.dedup();
        Ok(match cname {
            Some(target) => Resolution::Cname { target, addresses },
            None if nxdomain => Resolution::NxDomain,
            None => Resolution::Addresses(addresses),
        })
    }

    fn answer_node<'a>(&'a self, node: &'a Node, qtype: RecordType, soa: &'a Record) -> Answer<'a> {
        let mut answer = Answer {
            rcode: ResponseCode::NoError,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
        };
        let cname = node.get(RecordType::CNAME);
        if let (Some(cname), true) = (cname.first(), qtype != RecordType::CNAME) {
            // ExternalName: the CNAME, and the target's records when it is in this zone.
            answer.answers.push(cname);
            if let RData::CNAME(CNAME(target)) = &cname.data
                && let Some(target) = self.names.get(&LowerName::new(target))
            {
                answer.answers.extend(select(target, qtype));
            }
            return answer;
        }
        answer.answers.extend(select(node, qtype));
        if answer.answers.is_empty() {
            answer.authority.push(soa);
        }
        if qtype == RecordType::SRV {
            let mut seen = HashSet::new();
            for srv in &answer.answers {
                if let RData::SRV(srv) = &srv.data {
                    if !seen.insert(&srv.target) {
                        continue;
                    }
                    if let Some(target) = self.names.get(&LowerName::new(&srv.target)) {
                        answer.additionals.extend(target.get(RecordType::A));
                        answer.additionals.extend(target.get(RecordType::AAAA));
                    }
                }
            }
        }
        answer
    }
}

fn select(node: &Node, qtype: RecordType) -> Vec<&Record> {
    if qtype == RecordType::ANY {
        node.all().collect()
    } else {
        node.get(qtype).iter().collect()
    }
}

/// `labels` prepended to `origin`; the labels come from validated objects, but a name that
/// still does not build (too long) falls back to the origin and is dropped by the caller.
fn name_in(labels: &[&str], origin: &Name) -> Name {
    try_name(labels, origin).unwrap_or_else(|| origin.clone())
}

fn try_name(labels: &[&str], origin: &Name) -> Option<Name> {
    let relative = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
    relative
        .append_domain(origin)
        .ok()
        .map(|n| n.to_lowercase())
}

/// CoreDNS's name for an endpoint without a hostname: its address with dashes
/// (`10-244-1-5`, `fd00-244--5`).
pub fn dashed_ip(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string().replace('.', "-"),
        IpAddr::V6(ip) => ip.to_string().replace(':', "-"),
    }
}

struct Builder {
    origin: Name,
    ttl: u32,
    names: HashMap<LowerName, Node>,
    reverse: HashMap<LowerName, Node>,
}

impl Builder {
    fn add(&mut self, owner: Name, rdata: RData) {
        let record = Record::from_rdata(owner.clone(), self.ttl, rdata);
        self.names
            .entry(LowerName::new(&owner))
            .or_default()
            .push(record);
    }

    fn add_ip(&mut self, owner: &Name, ip: IpAddr) {
        let rdata = match ip {
            IpAddr::V4(ip) => RData::A(A(ip)),
            IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
        };
        self.add(owner.clone(), rdata);
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &Name) {
        let owner = Name::from(ip);
        let record = Record::from_rdata(owner.clone(), self.ttl, RData::PTR(PTR(target.clone())));
        self.reverse
            .entry(LowerName::new(&owner))
            .or_default()
            .push(record);
    }

    fn add_service(&mut self, svc: &Service, slices: &[&EndpointSlice]) {
        let ns = svc.name.namespace.as_ref();
        let Some(base) = try_name(&[&svc.name.name, ns, "svc"], &self.origin) else {
            tracing::debug!(service = %svc.name, "service name does not fit in the zone; no records");
            return;
        };
        // The namespace exists while it has Services: `ns.svc.zone` is NODATA, not NXDOMAIN.
        if let Some(ns_name) = try_name(&[ns, "svc"], &self.origin) {
            self.names.entry(LowerName::new(&ns_name)).or_default();
        }
        if svc.service_type == ServiceType::ExternalName {
            let Some(target) = svc.rare.external_name.as_deref().and_then(absolute_name) else {
                return;
            };
            self.add(base.clone(), RData::CNAME(CNAME(target.clone())));
            for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                if let Some(owner) = srv_owner(&port.name, port.protocol.as_lower(), &base) {
                    self.add(
                        owner,
                        RData::SRV(SRV::new(0, 100, port.port, target.clone())),
                    );
                }
            }
            return;
        }
        if svc.headless {
            self.add_headless(svc, &base, slices);
            return;
        }
        for ip in &svc.cluster_ips {
            self.add_ip(&base, *ip);
            self.add_ptr(*ip, &base);
        }
        for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            if let Some(owner) = srv_owner(&port.name, port.protocol.as_lower(), &base) {
                self.add(owner, RData::SRV(SRV::new(0, 100, port.port, base.clone())));
            }
        }
    }

    fn add_headless(&mut self, svc: &Service, base: &Name, slices: &[&EndpointSlice]) {
        for slice in slices {
            if slice.address_family.is_none() {
                continue; // FQDN slices carry no addresses to serve.
            }
            for ep in &slice.endpoints {
                // publishNotReadyAddresses: every endpoint is published, as CoreDNS does.
                if !(ep.ready || svc.publish_not_ready_addresses) {
                    continue;
                }
                for ip in ep.addresses() {
                    let label = match ep.hostname() {
                        Some(h) => h.to_string(),
                        None => dashed_ip(ip),
                    };
                    let Some(host) = try_name(&[&label], base) else {
                        continue;
                    };
                    self.add_ip(base, *ip);
                    self.add_ip(&host, *ip);
                    self.add_ptr(*ip, &host);
                    for port in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                        // SRV belongs to a port the Service declares (by name and protocol).
                        let declared = svc
                            .ports
                            .iter()
                            .any(|sp| sp.name == port.name && sp.protocol == port.protocol);
                        if !declared {
                            continue;
                        }
                        if let Some(owner) = srv_owner(&port.name, port.protocol.as_lower(), base) {
                            // Weights are set once every target is known.
                            self.add(owner, RData::SRV(SRV::new(0, 0, port.port, host.clone())));
                        }
                    }
                }
            }
        }
    }

    /// CoreDNS: each SRV record of a set gets weight 100 / (records in the set), at least 1.
    fn finish_srv_weights(&mut self) {
        for node in self.names.values_mut() {
            for (rtype, records) in &mut node.rrsets {
                if *rtype != RecordType::SRV {
                    continue;
                }
                let n = records.len().max(1);
                let weight = u16::try_from(100 / n).unwrap_or(1).max(1);
                for record in records.iter_mut() {
                    if let RData::SRV(srv) = &mut record.data
                        && srv.weight == 0
                    {
                        srv.weight = weight;
                    }
                }
            }
        }
    }

    /// Every ancestor of an owner name up to the origin exists (empty non-terminals, RFC 8020).
    fn add_ancestors(&mut self) {
        let origin = LowerName::new(&self.origin);
        let mut missing = Vec::new();
        for name in self.names.keys() {
            let mut cur = name.base_name();
            while origin.zone_of(&cur) && cur != origin {
                if !self.names.contains_key(&cur) {
                    missing.push(cur.clone());
                }
                cur = cur.base_name();
            }
        }
        for name in missing {
            self.names.entry(name).or_default();
        }
    }
}

fn srv_owner(port: &str, proto: &str, base: &Name) -> Option<Name> {
    let port = format!("_{port}");
    let proto = format!("_{proto}");
    try_name(&[&port, &proto], base)
}

fn absolute_name(s: &str) -> Option<Name> {
    let mut name = Name::from_ascii(s.trim_end_matches('.')).ok()?;
    name.set_fqdn(true);
    Some(name)
}

#[cfg(test)]
mod tests;
