//! k8s-openapi objects → validated compact types, checking what the API server
//! checks (and what the standalone mode needs on top, such as a set clusterIP).
//! Every rejection names the object, the JSON field path, the value and the reason.

mod endpoint_slice;
mod node;
mod pod;
mod service;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use endpoint_slice::{
    LAST_CHANGE_TRIGGER_TIME_ANNOTATION, SERVICE_NAME_LABEL, endpoint_slice_from_k8s,
};
pub use node::{ZONE_LABEL, node_from_k8s};
pub use pod::pod_from_k8s;
pub use service::{
    DEFAULT_SESSION_AFFINITY_TIMEOUT, MAX_SESSION_AFFINITY_TIMEOUT, SERVICE_PROXY_NAME_LABEL,
    service_from_k8s,
};

use crate::error::InvalidObject;
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

/// The object being converted, to build errors that name it.
#[derive(Debug)]
pub(crate) struct Ctx {
    kind: Kind,
    object: String,
}

impl Ctx {
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
        text.parse()
            .map_err(|_| self.err(field, text, "must be a valid IP address"))
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

/// How `metadata.name` must look for a kind.
#[derive(Clone, Copy)]
pub(crate) enum NameRule {
    Dns1123Subdomain,
    Dns1035Label,
}

impl NameRule {
    fn check(self, name: &str) -> Result<(), &'static str> {
        let (ok, reason) = match self {
            NameRule::Dns1123Subdomain => (
                crate::validate::is_dns1123_subdomain(name),
                DNS1123_SUBDOMAIN_REASON,
            ),
            NameRule::Dns1035Label => (
                crate::validate::is_dns1035_label(name),
                DNS1035_LABEL_REASON,
            ),
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
    let ctx = Ctx {
        kind,
        object: object_ref(namespace, name),
    };
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
    let ctx = Ctx {
        kind,
        object: object_ref("", name),
    };
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
pub(crate) const DNS1035_LABEL_REASON: &str = "must be a DNS-1035 label: lower-case alphanumerics or '-', starting with a letter and ending with an alphanumeric, at most 63 characters";
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

        let err =
            namespaced(Kind::Service, &meta(None, "1web"), NameRule::Dns1035Label).unwrap_err();
        assert_eq!(err.field, "metadata.name");
        assert_eq!(err.value, "1web");

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
        let ctx = Ctx {
            kind: Kind::Pod,
            object: "default/p".into(),
        };
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
        let ctx = Ctx {
            kind: Kind::Pod,
            object: "default/p".into(),
        };
        assert_eq!(ctx.port("f", 65535).unwrap(), 65535);
        assert_eq!(ctx.port("f", 0).unwrap_err().value, "0");
        assert_eq!(ctx.protocol("f", None).unwrap(), Protocol::Tcp);
        assert_eq!(ctx.protocol("f", Some("SCTP")).unwrap(), Protocol::Sctp);
        assert!(ctx.protocol("f", Some("tcp")).is_err());
        assert!(ctx.ip("f", "fd00::1").is_ok());
        assert!(ctx.ip("f", "10.0.0.256").is_err());
        // Leading zeros are ambiguous (octal?) and the API server rejects them.
        assert!(ctx.ip("f", "010.0.0.1").is_err());
    }
}
