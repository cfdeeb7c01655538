//! k8s-openapi objects → validated compact types. An object is rejected whole only
//! when it cannot be programmed safely (a name that would reach rule text, a port that
//! is no port, cluster IPs that contradict their families, no clusterIP for the
//! standalone mode to use); a value kube-proxy would ignore is ignored with a warning
//! ([`Converted::warnings`]) and costs nothing else. Policies that clusters configure on
//! their API server (the node-port range, feature-gated name rules, size limits) are
//! not repeated. Every rejection and warning names the object, the JSON field path, the
//! value and the reason.

mod endpoint_slice;
mod node;
mod pod;
mod service;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use endpoint_slice::{
    LAST_CHANGE_TRIGGER_TIME_ANNOTATION, SERVICE_NAME_LABEL, endpoint_slice_from_k8s,
};
pub use node::{ZONE_LABEL, node_from_k8s};
pub use pod::pod_from_k8s;
pub use service::{
    DEFAULT_SESSION_AFFINITY_TIMEOUT, HEADLESS_LABEL, IPVS_SCHEDULER_ANNOTATION, IPVS_SCHEDULERS,
    MAX_SESSION_AFFINITY_TIMEOUT, SERVICE_PROXY_NAME_LABEL, service_from_k8s,
};

use crate::error::{Converted, InvalidObject};
use crate::types::{Kind, NamespacedName, Protocol};
use crate::validate::{is_dns1123_label, is_label_value, is_qualified_name, is_valid_port_num};

/// Namespace of a namespaced object whose `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name` for messages; `<unnamed>` stands in for a missing name.
pub(crate) fn object_ref(namespace: &str, name: &str) -> String {
    let name = if name.is_empty() { "<unnamed>" } else { name };
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// The object being converted, to build errors that name it and collect the
/// values ignored on the way.
#[derive(Debug)]
pub(crate) struct Ctx {
    kind: Kind,
    object: String,
    warnings: RefCell<Vec<InvalidObject>>,
}

impl Ctx {
    pub(crate) fn new(kind: Kind, object: String) -> Ctx {
        Ctx {
            kind,
            object,
            warnings: RefCell::new(Vec::new()),
        }
    }

    /// One value is ignored, the rest of the object is kept.
    pub(crate) fn warn(
        &self,
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let warning = self.err(field, value, reason);
        self.warnings.borrow_mut().push(warning);
    }

    /// An error about one value becomes a warning: that value is ignored.
    pub(crate) fn ignore<T>(&self, result: Result<T, InvalidObject>) -> Option<T> {
        result.map_err(|e| self.warnings.borrow_mut().push(e)).ok()
    }

    /// An optional name (empty = absent), or a warning and `None` when `check` fails.
    pub(crate) fn name_or_warn(
        &self,
        field: &str,
        value: Option<&String>,
        check: fn(&str) -> bool,
        reason: &str,
    ) -> Option<String> {
        match value {
            Some(v) if v.is_empty() => None,
            Some(v) if !check(v) => {
                self.warn(field, v.as_str(), reason);
                None
            }
            other => other.cloned(),
        }
    }

    /// The converted object with the warnings collected for it.
    pub(crate) fn finish<T>(self, object: T) -> Converted<T> {
        Converted {
            object,
            warnings: self.warnings.into_inner(),
        }
    }

    pub(crate) fn err(
        &self,
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> InvalidObject {
        InvalidObject {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn ip(&self, field: impl Into<String>, text: &str) -> Result<IpAddr, InvalidObject> {
        parse_ip_sloppy(text).ok_or_else(|| self.err(field, text, IP_REASON))
    }

    /// An IP, or a warning and `None`: for lists whose other entries stay usable.
    pub(crate) fn ip_or_warn(&self, field: impl Into<String>, text: &str) -> Option<IpAddr> {
        let ip = parse_ip_sloppy(text);
        if ip.is_none() {
            self.warn(field, text, IP_REASON);
        }
        ip
    }

    pub(crate) fn port(&self, field: impl Into<String>, port: i32) -> Result<u16, InvalidObject> {
        match u16::try_from(port) {
            Ok(p) if is_valid_port_num(port) => Ok(p),
            _ => Err(self.err(field, port.to_string(), "must be between 1 and 65535")),
        }
    }

    /// `protocol`, TCP when absent (the API server's default).
    pub(crate) fn protocol(
        &self,
        field: impl Into<String>,
        protocol: Option<&str>,
    ) -> Result<Protocol, InvalidObject> {
        match protocol {
            None => Ok(Protocol::Tcp),
            Some(p) => Protocol::from_k8s(p)
                .ok_or_else(|| self.err(field, p, "supported values: \"SCTP\", \"TCP\", \"UDP\"")),
        }
    }

    /// Labels checked as label keys/values (they feed selectors).
    pub(crate) fn labels(
        &self,
        field: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, InvalidObject> {
        let Some(labels) = labels else {
            return Ok(BTreeMap::new());
        };
        for (key, value) in labels {
            if !is_qualified_name(key) {
                return Err(self.err(
                    format!("{field}[{key}]"),
                    key.as_str(),
                    "must be a qualified name ([prefix/]name: alphanumerics, '-', '_' or '.', at most 63 characters, prefix a DNS-1123 subdomain)",
                ));
            }
            if !is_label_value(value) {
                return Err(self.err(
                    format!("{field}[{key}]"),
                    value.as_str(),
                    "must be empty or at most 63 characters: alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
                ));
            }
        }
        Ok(labels.clone())
    }
}

const IP_REASON: &str = "must be a valid IP address";

/// An IP as kube-proxy reads it (`netutils.ParseIPSloppy`): IPv4 parts with leading
/// zeros are decimal (`010.096.000.001` is 10.96.0.1; API servers before 1.20 stored
/// such addresses, and they are still served), and an IPv4-mapped IPv6 address is the
/// IPv4 address (Go's `net.IP` makes no difference between the two).
pub(crate) fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(parse_ipv4_leading_zeros(text)?),
    };
    Some(ip.to_canonical())
}

/// `a.b.c.d`, each part 1–3 decimal digits (leading zeros allowed), at most 255.
fn parse_ipv4_leading_zeros(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// A CIDR as kube-proxy reads it (`netutils.ParseCIDRSloppy`), host bits cleared.
pub(crate) fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (ip, prefix) = text.split_once('/')?;
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Not canonicalised: an IPv4-mapped IPv6 CIDR keeps its IPv6 prefix length.
    let ip = match ip.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(parse_ipv4_leading_zeros(ip)?),
    };
    IpNet::new(ip, prefix.parse().ok()?)
        .ok()
        .map(|net| net.trunc())
}

/// How `metadata.name` must look for a kind.
#[derive(Clone, Copy)]
pub(crate) enum NameRule {
    Dns1123Subdomain,
    /// Services: an RFC 1123 label. The API server's default is the stricter RFC 1035
    /// label (starting with a letter), but with its `RelaxedServiceNameValidation`
    /// feature gate (1.34+) a name may start with a digit; both are safe in rule text.
    Dns1123Label,
}

impl NameRule {
    fn check(self, name: &str) -> Result<(), &'static str> {
        let (ok, reason) = match self {
            NameRule::Dns1123Subdomain => (
                crate::validate::is_dns1123_subdomain(name),
                DNS1123_SUBDOMAIN_REASON,
            ),
            NameRule::Dns1123Label => (is_dns1123_label(name), DNS1123_LABEL_REASON),
        };
        if ok { Ok(()) } else { Err(reason) }
    }
}

/// Name and namespace of a namespaced object (namespace `default` when absent).
pub(crate) fn namespaced(
    kind: Kind,
    meta: &ObjectMeta,
    rule: NameRule,
) -> Result<(NamespacedName, Ctx), InvalidObject> {
    let name = meta.name.as_deref().unwrap_or_default();
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    let ctx = Ctx::new(kind, object_ref(namespace, name));
    check_name(&ctx, name, rule)?;
    if !is_dns1123_label(namespace) {
        return Err(ctx.err("metadata.namespace", namespace, DNS1123_LABEL_REASON));
    }
    Ok((NamespacedName::new(namespace, name), ctx))
}

/// Name of a cluster-scoped object (its namespace, if any, is ignored).
pub(crate) fn cluster_scoped(
    kind: Kind,
    meta: &ObjectMeta,
    rule: NameRule,
) -> Result<(String, Ctx), InvalidObject> {
    let name = meta.name.as_deref().unwrap_or_default();
    let ctx = Ctx::new(kind, object_ref("", name));
    check_name(&ctx, name, rule)?;
    Ok((name.to_string(), ctx))
}

fn check_name(ctx: &Ctx, name: &str, rule: NameRule) -> Result<(), InvalidObject> {
    if name.is_empty() {
        return Err(ctx.err("metadata.name", "", "required"));
    }
    rule.check(name)
        .map_err(|reason| ctx.err("metadata.name", name, reason))
}

pub(crate) const DNS1123_LABEL_REASON: &str = "must be a DNS-1123 label: lower-case alphanumerics or '-', starting and ending with an alphanumeric, at most 63 characters";
pub(crate) const DNS1123_SUBDOMAIN_REASON: &str = "must be a DNS-1123 subdomain: lower-case alphanumerics, '-' or '.', starting and ending with an alphanumeric, at most 253 characters";

#[cfg(test)]
pub(crate) mod test_util {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: namespace.map(str::to_string),
            ..ObjectMeta::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::meta;
    use super::*;

    #[test]
    fn namespace_defaults_and_validation() {
        let (name, _) =
            namespaced(Kind::Pod, &meta(None, "p"), NameRule::Dns1123Subdomain).unwrap();
        assert_eq!(name, NamespacedName::new("default", "p"));
        let (name, _) = namespaced(
            Kind::Pod,
            &meta(Some("kube-system"), "p.x"),
            NameRule::Dns1123Subdomain,
        )
        .unwrap();
        assert_eq!(name.to_string(), "kube-system/p.x");

        let err = namespaced(
            Kind::Pod,
            &meta(Some("Bad_NS"), "p"),
            NameRule::Dns1123Subdomain,
        )
        .unwrap_err();
        assert_eq!(err.field, "metadata.namespace");
        assert_eq!(err.object, "Bad_NS/p");

        // A Service name may start with a digit (RelaxedServiceNameValidation).
        let (name, _) =
            namespaced(Kind::Service, &meta(None, "1web"), NameRule::Dns1123Label).unwrap();
        assert_eq!(&*name.name, "1web");
        let err =
            namespaced(Kind::Service, &meta(None, "web.1"), NameRule::Dns1123Label).unwrap_err();
        assert_eq!(err.field, "metadata.name");
        assert_eq!(err.value, "web.1");

        let err = namespaced(
            Kind::Pod,
            &ObjectMeta::default(),
            NameRule::Dns1123Subdomain,
        )
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.reason.as_str()),
            ("metadata.name", "required")
        );
        assert_eq!(err.object, "default/<unnamed>");
    }

    #[test]
    fn cluster_scoped_ignores_namespace() {
        let (name, _) = cluster_scoped(
            Kind::Node,
            &meta(Some("x"), "node-1"),
            NameRule::Dns1123Subdomain,
        )
        .unwrap();
        assert_eq!(name, "node-1");
        assert!(
            cluster_scoped(
                Kind::Node,
                &meta(None, "Node_1"),
                NameRule::Dns1123Subdomain
            )
            .is_err()
        );
    }

    #[test]
    fn label_validation() {
        let ctx = Ctx::new(Kind::Pod, "default/p".into());
        let good = BTreeMap::from([("app.kubernetes.io/name".to_string(), "web".to_string())]);
        assert_eq!(ctx.labels("metadata.labels", Some(&good)).unwrap(), good);
        let bad_value = BTreeMap::from([("app".to_string(), "a b".to_string())]);
        let err = ctx.labels("metadata.labels", Some(&bad_value)).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("metadata.labels[app]", "a b")
        );
        let bad_key = BTreeMap::from([("-app".to_string(), "x".to_string())]);
        assert!(ctx.labels("metadata.labels", Some(&bad_key)).is_err());
    }

    #[test]
    fn ports_protocols_ips() {
        let ctx = Ctx::new(Kind::Pod, "default/p".into());
        assert_eq!(ctx.port("f", 65535).unwrap(), 65535);
        assert_eq!(ctx.port("f", 0).unwrap_err().value, "0");
        assert_eq!(ctx.protocol("f", None).unwrap(), Protocol::Tcp);
        assert_eq!(ctx.protocol("f", Some("SCTP")).unwrap(), Protocol::Sctp);
        assert!(ctx.protocol("f", Some("tcp")).is_err());
        assert!(ctx.ip("f", "fd00::1").is_ok());
        assert!(ctx.ip("f", "10.0.0.256").is_err());
    }

    #[test]
    fn ips_are_read_as_kube_proxy_reads_them() {
        let ip = |s: &str| parse_ip_sloppy(s);
        let v4 = |s: &str| Some(IpAddr::V4(s.parse().unwrap()));
        // Leading zeros are decimal, as in Go before 1.17 and netutils.ParseIPSloppy.
        assert_eq!(ip("010.096.000.001"), v4("10.96.0.1"));
        assert_eq!(ip("10.0.0.010"), v4("10.0.0.10"));
        assert_eq!(ip("::ffff:10.1.2.3"), v4("10.1.2.3"));
        assert_eq!(ip("fd00::1"), Some("fd00::1".parse().unwrap()));
        for bad in [
            "",
            "10.0.0",
            "10.0.0.256",
            "10.0.0.0256",
            "1.2.3.4.5",
            "+1.2.3.4",
            "1.2.3.-4",
            "a.b.c.d",
            "10.0.0.1 ",
            "example.com",
        ] {
            assert_eq!(ip(bad), None, "{bad:?}");
        }
        let net = |s: &str| parse_cidr_sloppy(s);
        assert_eq!(net("010.000.0.0/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(net("10.1.2.3/16"), Some("10.1.0.0/16".parse().unwrap()));
        assert_eq!(
            net("2001:db8::1/32"),
            Some("2001:db8::/32".parse().unwrap())
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "x/8",
            "/8",
        ] {
            assert_eq!(net(bad), None, "{bad:?}");
        }
    }
}
