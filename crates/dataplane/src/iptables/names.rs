//! Chain names: svcplane's own prefix (`SVCP-`), so kube-proxy's `KUBE-` chains can
//! exist beside them during a migration, and kube-proxy's hashes, so that
//! `SVCP-SVC-XPGD46QRK7WJZT7O` is the service port kube-proxy calls
//! `KUBE-SVC-XPGD46QRK7WJZT7O`. Every name is at most 25 characters (iptables allows 28).

use std::fmt::Write as _;
use std::net::IpAddr;

use svcplane_model::ServicePortName;
use svcplane_proxy::DataplaneError;

use crate::hash::base32_sha256;

/// iptables' limit on chain names.
pub const CHAIN_LENGTH_MAX: usize = 28;

/// Every chain svcplane creates starts with this.
pub const PREFIX: &str = "SVCP-";

// Fixed chains (kube-proxy's names with svcplane's prefix).
pub const SERVICES: &str = "SVCP-SERVICES";
pub const EXTERNAL_SERVICES: &str = "SVCP-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "SVCP-NODEPORTS";
pub const POSTROUTING: &str = "SVCP-POSTROUTING";
pub const MARK_MASQ: &str = "SVCP-MARK-MASQ";
pub const FORWARD: &str = "SVCP-FORWARD";
pub const PROXY_FIREWALL: &str = "SVCP-PROXY-FIREWALL";
pub const CANARY: &str = "SVCP-CANARY";
/// Hairpin: a connection DNATed back to the pod that opened it is marked for
/// masquerade (a tree on the source address, one rule per endpoint address).
pub const HAIRPIN: &str = "SVCP-HAIRPIN";
/// Marks for masquerade unless the source is in one of several cluster CIDRs (one
/// CIDR is matched inline, as kube-proxy does).
pub const MASQ_OUTSIDE: &str = "SVCP-MASQ-OUTSIDE";

// Per-service-port chains.
/// Balances ClusterIP traffic (the internal target).
pub const SVC: &str = "SVCP-SVC-";
/// Balances the eTP Local short-circuits (cluster-wide endpoints), when not the same
/// endpoints as `SVC`.
pub const SVO: &str = "SVCP-SVO-";
/// Balances external traffic (the external target), when not the same endpoints as an
/// earlier chain of the service.
pub const SVX: &str = "SVCP-SVX-";
pub const EXT: &str = "SVCP-EXT-";
pub const FW: &str = "SVCP-FW-";
pub const SEP: &str = "SVCP-SEP-";
/// Dispatch tree chains (addresses, then ports).
pub const DISPATCH_ADDR: &str = "SVCP-DA-";
pub const DISPATCH_PORT: &str = "SVCP-DP-";

/// kube-proxy's `ServicePortName.String()`: `ns/name:port`, or `ns/name` for an
/// unnamed port. Used in comments and hashed into chain names.
pub fn port_name(spn: &ServicePortName) -> String {
    let mut s = String::with_capacity(64);
    let _ = write!(s, "{}/{}", spn.service.namespace, spn.service.name);
    if !spn.port.is_empty() {
        s.push(':');
        s.push_str(&spn.port);
    }
    s
}

/// `ip:port`, `[ip]:port` for IPv6 (Go's `net.JoinHostPort`).
pub fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Comments are written in double quotes: validated names never contain anything that
/// could end them, but data that bypassed validation is refused rather than written.
pub fn check_comment_safe(spn: &ServicePortName) -> Result<(), DataplaneError> {
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if ok(&spn.service.namespace) && ok(&spn.service.name) && ok(&spn.port) {
        Ok(())
    } else {
        Err(DataplaneError::Other(format!(
            "service port {spn:?}: namespace, name or port name has characters that cannot be used in an iptables rule; refusing to render"
        )))
    }
}

/// kube-proxy's `portProtoHash`: 16 characters of base32(sha256(port name + protocol)).
pub fn service_hash(spn: &ServicePortName) -> String {
    let input = port_name(spn) + spn.protocol.as_lower();
    base32_sha256(input.as_bytes(), 16)
}

/// `prefix` + the service port's hash.
pub fn service_chain(prefix: &str, hash: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + hash.len());
    s.push_str(prefix);
    s.push_str(hash);
    s
}

/// kube-proxy's `servicePortEndpointChainName`: hash of port name + protocol + `ip:port`.
pub fn endpoint_chain(spn: &ServicePortName, ip: IpAddr, port: u16) -> String {
    let input = port_name(spn) + spn.protocol.as_lower() + &host_port(ip, port);
    service_chain(SEP, &base32_sha256(input.as_bytes(), 16))
}

/// A dispatch-tree chain, named by what it dispatches: stable as long as its prefix is.
pub fn dispatch_chain(prefix: &str, key: &str) -> String {
    service_chain(prefix, &base32_sha256(key.as_bytes(), 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcplane_model::{NamespacedName, Protocol};

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            service: NamespacedName::new(ns, name),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn hashes_are_kube_proxys() {
        // kube-proxy's iptables proxier_test.go expectations for these service ports.
        let s = spn("ns1", "svc1", "p80");
        assert_eq!(
            service_chain(SVC, &service_hash(&s)),
            "SVCP-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            endpoint_chain(&s, "10.180.0.1".parse().unwrap(), 80),
            "SVCP-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(port_name(&spn("ns", "svc", "")), "ns/svc");
    }

    #[test]
    fn names_fit_iptables() {
        let long = "a".repeat(63);
        let s = spn(&long, &long, &long);
        let h = service_hash(&s);
        for prefix in [SVC, SVO, SVX, EXT, FW, SEP, DISPATCH_ADDR, DISPATCH_PORT] {
            assert!(
                service_chain(prefix, &h).len() <= CHAIN_LENGTH_MAX,
                "{prefix}"
            );
        }
        let ep = endpoint_chain(
            &s,
            "fd00:1234:5678:9abc:def0:1234:5678:9abc".parse().unwrap(),
            65535,
        );
        assert!(ep.len() <= CHAIN_LENGTH_MAX);
        for fixed in [
            SERVICES,
            EXTERNAL_SERVICES,
            NODEPORTS,
            POSTROUTING,
            MARK_MASQ,
            FORWARD,
            PROXY_FIREWALL,
            CANARY,
            MASQ_OUTSIDE,
            HAIRPIN,
        ] {
            assert!(fixed.len() <= CHAIN_LENGTH_MAX && fixed.starts_with(PREFIX));
        }
        // Stable, and different for different inputs.
        assert_eq!(h, service_hash(&s));
        assert_ne!(h, service_hash(&spn("a", "b", "c")));
    }

    #[test]
    fn hostile_names_are_refused() {
        assert!(check_comment_safe(&spn("ns", "svc", "http")).is_ok());
        assert!(check_comment_safe(&spn("ns\" -j ACCEPT", "svc", "p")).is_err());
        assert!(check_comment_safe(&spn("ns", "svc\n", "p")).is_err());
    }
}
