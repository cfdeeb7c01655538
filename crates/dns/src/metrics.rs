//! DNS metrics, named after CoreDNS's (`coredns_dns_*` → `svcplane_dns_*`).

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Query types counted by name (CoreDNS's list, less the DNSSEC ones); others are `other`.
const TYPES: [(RecordType, &str); 12] = [
    (RecordType::A, "A"),
    (RecordType::AAAA, "AAAA"),
    (RecordType::SRV, "SRV"),
    (RecordType::PTR, "PTR"),
    (RecordType::CNAME, "CNAME"),
    (RecordType::TXT, "TXT"),
    (RecordType::SOA, "SOA"),
    (RecordType::NS, "NS"),
    (RecordType::MX, "MX"),
    (RecordType::ANY, "ANY"),
    (RecordType::AXFR, "AXFR"),
    (RecordType::IXFR, "IXFR"),
];
const OTHER: usize = TYPES.len();

const RCODES: [(ResponseCode, &str); 7] = [
    (ResponseCode::NoError, "NOERROR"),
    (ResponseCode::NXDomain, "NXDOMAIN"),
    (ResponseCode::ServFail, "SERVFAIL"),
    (ResponseCode::Refused, "REFUSED"),
    (ResponseCode::FormErr, "FORMERR"),
    (ResponseCode::NotImp, "NOTIMP"),
    (ResponseCode::BADVERS, "BADVERS"),
];
const OTHER_RCODE: usize = RCODES.len();

/// CoreDNS's request duration buckets: 0.25 ms × 2, 16 buckets (0.25 ms … 8.2 s).
pub fn duration_buckets() -> Vec<f64> {
    exponential_buckets(0.00025, 2.0, 16).collect()
}

/// Counters per label value are resolved once here, so a query only does atomic adds.
pub struct DnsMetrics {
    requests: Family<Labels, Counter>,
    responses: Family<Labels, Counter>,
    by_type: Vec<Counter>,
    by_rcode: Vec<Counter>,
    pub duration: Histogram,
}

impl std::fmt::Debug for DnsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsMetrics").finish_non_exhaustive()
    }
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DnsMetrics {
    pub fn new() -> DnsMetrics {
        let requests: Family<Labels, Counter> = Family::default();
        let responses: Family<Labels, Counter> = Family::default();
        let by_type = TYPES
            .iter()
            .map(|(_, name)| *name)
            .chain(["other"])
            .map(|name| requests.get_or_create(&vec![("type", name)]).clone())
            .collect();
        let by_rcode = RCODES
            .iter()
            .map(|(_, name)| *name)
            .chain(["OTHER"])
            .map(|name| responses.get_or_create(&vec![("rcode", name)]).clone())
            .collect();
        DnsMetrics {
            requests,
            responses,
            by_type,
            by_rcode,
            duration: Histogram::new(duration_buckets()),
        }
    }

    /// Add the metrics to `registry` (counters without `_total`: the encoder appends it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "svcplane_dns_requests",
            "Counter of DNS requests made per type",
            self.requests.clone(),
        );
        registry.register(
            "svcplane_dns_responses",
            "Counter of response status codes",
            self.responses.clone(),
        );
        registry.register(
            "svcplane_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took",
            self.duration.clone(),
        );
    }

    /// Count one request by its query type (`None`: no question could be read).
    pub fn request(&self, qtype: Option<RecordType>) {
        let i = qtype
            .and_then(|t| TYPES.iter().position(|(rt, _)| *rt == t))
            .unwrap_or(OTHER);
        if let Some(c) = self.by_type.get(i) {
            c.inc();
        }
    }

    /// Count one response by its code, and how long it took.
    pub fn response(&self, rcode: ResponseCode, took: Duration) {
        let i = RCODES
            .iter()
            .position(|(rc, _)| *rc == rcode)
            .unwrap_or(OTHER_RCODE);
        if let Some(c) = self.by_rcode.get(i) {
            c.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn counts_by_type_and_rcode() {
        let m = DnsMetrics::new();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.request(Some(RecordType::A));
        m.request(Some(RecordType::A));
        m.request(Some(RecordType::HINFO));
        m.response(ResponseCode::NXDomain, Duration::from_millis(1));
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("svcplane_dns_requests_total{type=\"A\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("svcplane_dns_requests_total{type=\"other\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("svcplane_dns_requests_total{type=\"SRV\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("svcplane_dns_responses_total{rcode=\"NXDOMAIN\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("svcplane_dns_request_duration_seconds_count 1"),
            "{out}"
        );
    }
}
