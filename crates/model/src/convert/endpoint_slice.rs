//! discovery.k8s.io/v1 EndpointSlice → [`EndpointSlice`].

use std::sync::Arc;

use k8s_openapi::api::discovery::v1 as k8s;

use super::{Ctx, DNS1123_LABEL_REASON, DNS1123_SUBDOMAIN_REASON, NameRule, namespaced};
use crate::error::{Converted, InvalidObject};
use crate::intern::{shared_name, shared_ports};
use crate::types::{Endpoint, EndpointHints, EndpointPort, EndpointSlice, IpFamily, Kind};
use crate::validate::{is_dns1123_label, is_dns1123_subdomain};

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation with the time of the change that triggered the slice's update.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// Validate and convert an EndpointSlice. As kube-proxy, what cannot be used is
/// ignored (with a warning) rather than costing the whole slice: an address that is
/// not an IP of the slice's family, an endpoint left without addresses, a port with
/// an invalid number, name or protocol. Ports without a port number (which mean "all
/// ports" and which kube-proxy skips) are dropped silently. For addressType FQDN the
/// endpoints are kept with empty `addresses` (kube-proxy ignores such slices). The
/// API server's size limits (1000 endpoints, 100 ports) are not repeated: kube-proxy
/// programs any size.
pub fn endpoint_slice_from_k8s(
    s: &k8s::EndpointSlice,
) -> Result<Converted<EndpointSlice>, InvalidObject> {
    let (name, ctx) = namespaced(Kind::EndpointSlice, &s.metadata, NameRule::Dns1123Subdomain)?;
    let labels = ctx.labels("metadata.labels", s.metadata.labels.as_ref())?;

    let address_family = match s.address_type.as_str() {
        "IPv4" => Some(IpFamily::V4),
        "IPv6" => Some(IpFamily::V6),
        "FQDN" => None,
        other => {
            return Err(ctx.err(
                "addressType",
                other,
                "supported values: \"FQDN\", \"IPv4\", \"IPv6\"",
            ));
        }
    };

    // Sized up front: a collected `filter_map` grows by doubling (16 slots for 10 endpoints),
    // and every slice is kept for as long as it exists.
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    endpoints.extend(
        s.endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| endpoint(&ctx, i, e, address_family)),
    );
    let ports = shared_ports(&ports(&ctx, s.ports.as_deref().unwrap_or_default()));

    let service_name = labels
        .get(SERVICE_NAME_LABEL)
        .map(|s| Arc::from(s.as_str()));
    let last_change_trigger_time = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME_ANNOTATION))
        .map(|t| t.as_str().into());

    Ok(ctx.finish(EndpointSlice {
        name,
        service_name,
        address_family,
        ports,
        endpoints: endpoints.into_boxed_slice(),
        last_change_trigger_time,
    }))
}

/// One endpoint, or `None` (with a warning) when it has no usable address: kube-proxy
/// skips endpoints without addresses or of the wrong IP family. The addresses of an
/// endpoint are fungible (kube-proxy uses the first), so a bad one costs only itself.
fn endpoint(ctx: &Ctx, i: usize, e: &k8s::Endpoint, family: Option<IpFamily>) -> Option<Endpoint> {
    let field = format!("endpoints[{i}]");
    let mut addresses = Vec::with_capacity(e.addresses.len());
    // FQDN addresses are never used (not even stored), so they are not checked.
    if let Some(family) = family {
        if e.addresses.is_empty() {
            ctx.warn(
                format!("{field}.addresses"),
                "",
                "must have at least one address",
            );
            return None;
        }
        for (j, text) in e.addresses.iter().enumerate() {
            let address_field = format!("{field}.addresses[{j}]");
            let Some(ip) = ctx.ip_or_warn(&address_field, text) else {
                continue;
            };
            if IpFamily::of(&ip) != family {
                ctx.warn(
                    address_field,
                    text.as_str(),
                    format!("must be an {family} address (addressType {family})"),
                );
                continue;
            }
            addresses.push(ip);
        }
        if addresses.is_empty() {
            // Each address was reported; the endpoint has nothing left to program.
            return None;
        }
    }

    // Defaults as documented on EndpointConditions.
    let conditions = e.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);

    // The hostname becomes a DNS name; kube-proxy does not use it.
    let hostname = ctx.name_or_warn(
        &format!("{field}.hostname"),
        e.hostname.as_ref(),
        is_dns1123_label,
        DNS1123_LABEL_REASON,
    );
    // A node name no node can have never matches this node: the endpoint is not local.
    let node_name = ctx.name_or_warn(
        &format!("{field}.nodeName"),
        e.node_name.as_ref(),
        is_dns1123_subdomain,
        DNS1123_SUBDOMAIN_REASON,
    );
    let hints = e.hints.as_ref().map(|h| EndpointHints {
        for_zones: h
            .for_zones
            .iter()
            .flatten()
            .map(|z| z.name.clone())
            .collect(),
        for_nodes: h
            .for_nodes
            .iter()
            .flatten()
            .map(|n| n.name.clone())
            .collect(),
    });

    let mut endpoint = Endpoint::new(&addresses)
        .with_topology(node_name.as_deref(), e.zone.as_deref())
        .with_hostname(hostname.as_deref())
        .with_hints(hints);
    endpoint.ready = ready;
    endpoint.serving = serving;
    endpoint.terminating = terminating;
    Some(endpoint)
}

/// The slice's ports; one that cannot be used is ignored with a warning (kube-proxy
/// ignores ports with no or a zero number; a name or protocol no Service port can have
/// would match none).
fn ports(ctx: &Ctx, k8s_ports: &[k8s::EndpointPort]) -> Vec<EndpointPort> {
    let mut ports: Vec<EndpointPort> = Vec::with_capacity(k8s_ports.len());
    // Index in `k8s_ports` of each kept port, for duplicate messages.
    let mut origins: Vec<usize> = Vec::with_capacity(k8s_ports.len());
    for (i, p) in k8s_ports.iter().enumerate() {
        let field = format!("ports[{i}]");
        // The API treats a nil name as "".
        let name = p.name.clone().unwrap_or_default();
        let Some(port) = p.port else {
            continue;
        };
        if !name.is_empty() && !is_dns1123_label(&name) {
            ctx.warn(format!("{field}.name"), name, DNS1123_LABEL_REASON);
            continue;
        }
        let Some(protocol) =
            ctx.ignore(ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref()))
        else {
            continue;
        };
        let Some(port) = ctx.ignore(ctx.port(format!("{field}.port"), port)) else {
            continue;
        };
        if let Some(j) = ports.iter().position(|q| *q.name == *name) {
            // Which of the two was meant is unknowable; the first stays.
            ctx.warn(
                format!("{field}.name"),
                name,
                format!("duplicate port name (also ports[{}])", origins[j]),
            );
            continue;
        }
        ports.push(EndpointPort {
            name: shared_name(&name),
            protocol,
            port,
        });
        origins.push(i);
    }
    ports
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::convert::test_util::meta;
    use crate::types::Protocol;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, ForNode, ForZone};

    fn endpoint(addr: &str) -> k8s::Endpoint {
        k8s::Endpoint {
            addresses: vec![addr.to_string()],
            ..Default::default()
        }
    }

    fn slice(address_type: &str, endpoints: Vec<k8s::Endpoint>) -> k8s::EndpointSlice {
        let mut metadata = meta(None, "web-abc12");
        metadata.labels = Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), "web".into())]));
        k8s::EndpointSlice {
            metadata,
            address_type: address_type.into(),
            endpoints,
            ports: Some(vec![k8s::EndpointPort {
                port: Some(8080),
                ..Default::default()
            }]),
        }
    }

    /// Converted without warnings.
    fn clean(k: &k8s::EndpointSlice) -> EndpointSlice {
        let c = endpoint_slice_from_k8s(k).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        c.object
    }

    /// Converted, with the fields of its warnings.
    fn warned(k: &k8s::EndpointSlice) -> (EndpointSlice, Vec<String>) {
        let c = endpoint_slice_from_k8s(k).unwrap();
        let fields = c.warnings.iter().map(|w| w.field.clone()).collect();
        (c.object, fields)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn basic() {
        let mut k = slice("IPv4", vec![endpoint("10.1.0.5")]);
        k.metadata.annotations = Some(BTreeMap::from([(
            LAST_CHANGE_TRIGGER_TIME_ANNOTATION.into(),
            "2024-01-01T00:00:00Z".into(),
        )]));
        let s = clean(&k);
        assert_eq!(s.name.to_string(), "default/web-abc12");
        assert_eq!(s.service_name.as_deref(), Some("web"));
        assert_eq!(s.address_family, Some(IpFamily::V4));
        assert_eq!(
            *s.ports,
            [EndpointPort {
                name: "".into(),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );
        assert_eq!(s.endpoints[0].addresses(), [ip("10.1.0.5")]);
        assert_eq!(
            s.last_change_trigger_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
    }

    #[test]
    fn no_service_label() {
        let mut k = slice("IPv4", vec![]);
        k.metadata.labels = None;
        assert_eq!(clean(&k).service_name, None);
    }

    #[test]
    fn address_types() {
        let s = clean(&slice("IPv6", vec![endpoint("fd00::5")]));
        assert_eq!(s.address_family, Some(IpFamily::V6));
        let e = endpoint_slice_from_k8s(&slice("ipv4", vec![])).unwrap_err();
        assert_eq!(e.field, "addressType");

        // FQDN endpoints are never used, so their names are not checked.
        for name in ["db.example.com", "not a name"] {
            let s = clean(&slice("FQDN", vec![endpoint(name)]));
            assert_eq!(s.address_family, None);
            assert_eq!(s.endpoints.len(), 1);
            assert!(s.endpoints[0].addresses().is_empty());
        }
    }

    /// As kube-proxy: an endpoint of the wrong family, or without a usable address, is
    /// ignored; the slice's other endpoints stay.
    #[test]
    fn unusable_endpoints_cost_only_themselves() {
        let (s, warnings) = warned(&slice(
            "IPv4",
            vec![
                endpoint("fd00::5"),
                endpoint("10.0.0"),
                k8s::Endpoint::default(),
                endpoint("10.1.0.5"),
            ],
        ));
        assert_eq!(
            warnings,
            [
                "endpoints[0].addresses[0]",
                "endpoints[1].addresses[0]",
                "endpoints[2].addresses"
            ]
        );
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.endpoints[0].addresses(), [ip("10.1.0.5")]);

        let (s, warnings) = warned(&slice("IPv6", vec![endpoint("10.0.0.1")]));
        assert_eq!(warnings, ["endpoints[0].addresses[0]"]);
        assert!(s.endpoints.is_empty());

        // Addresses are fungible: a bad one costs only itself.
        let mut two = endpoint("bad");
        two.addresses.push("10.1.0.6".into());
        let (s, warnings) = warned(&slice("IPv4", vec![two]));
        assert_eq!(warnings, ["endpoints[0].addresses[0]"]);
        assert_eq!(s.endpoints[0].addresses(), [ip("10.1.0.6")]);

        let c = endpoint_slice_from_k8s(&slice("IPv4", vec![endpoint("fd00::5")])).unwrap();
        assert_eq!(
            c.warnings[0].to_string(),
            "EndpointSlice default/web-abc12: endpoints[0].addresses[0]: invalid value \"fd00::5\": must be an IPv4 address (addressType IPv4)"
        );
    }

    /// What API servers before 1.20 stored: read as kube-proxy reads it.
    #[test]
    fn legacy_leading_zero_addresses() {
        let s = clean(&slice("IPv4", vec![endpoint("010.244.001.005")]));
        assert_eq!(s.endpoints[0].addresses(), [ip("10.244.1.5")]);
    }

    /// The API server's limits are not kube-proxy's: any size is programmed.
    #[test]
    fn no_size_limits() {
        let many: Vec<k8s::Endpoint> = (0..1500)
            .map(|i| endpoint(&format!("10.1.{}.{}", i / 250, i % 250)))
            .collect();
        assert_eq!(clean(&slice("IPv4", many)).endpoints.len(), 1500);
    }

    #[test]
    fn condition_defaults() {
        let with = |ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>| {
            let mut e = endpoint("10.1.0.5");
            e.conditions = Some(EndpointConditions {
                ready,
                serving,
                terminating,
            });
            let s = clean(&slice("IPv4", vec![e]));
            let e = &s.endpoints[0];
            (e.ready, e.serving, e.terminating)
        };
        assert_eq!(with(None, None, None), (true, true, false));
        assert_eq!(with(Some(false), None, None), (false, false, false));
        assert_eq!(
            with(Some(false), Some(true), Some(true)),
            (false, true, true)
        );
        assert_eq!(with(None, Some(false), None), (true, false, false));
        // No conditions at all: same defaults.
        let s = clean(&slice("IPv4", vec![endpoint("10.1.0.5")]));
        let e = &s.endpoints[0];
        assert_eq!((e.ready, e.serving, e.terminating), (true, true, false));
    }

    #[test]
    fn endpoint_fields() {
        let mut e = endpoint("10.1.0.5");
        e.hostname = Some("web-0".into());
        e.node_name = Some("node-1".into());
        e.zone = Some("zone-a".into());
        e.hints = Some(k8s::EndpointHints {
            for_zones: Some(vec![ForZone {
                name: "zone-a".into(),
            }]),
            for_nodes: Some(vec![ForNode {
                name: "node-1".into(),
            }]),
        });
        let s = clean(&slice("IPv4", vec![e.clone()]));
        let got = &s.endpoints[0];
        assert_eq!(got.hostname().map(|h| &**h), Some("web-0"));
        assert_eq!(got.node_name().map(|n| &**n), Some("node-1"));
        assert_eq!(got.zone().map(|z| &**z), Some("zone-a"));
        assert_eq!(
            got.hints(),
            Some(&EndpointHints {
                for_zones: vec!["zone-a".into()],
                for_nodes: vec!["node-1".into()]
            })
        );

        // An invalid hostname or nodeName is dropped; the endpoint stays.
        let mut bad = e;
        bad.hostname = Some("web.0".into());
        bad.node_name = Some("Node_1".into());
        let (s, warnings) = warned(&slice("IPv4", vec![bad]));
        assert_eq!(warnings, ["endpoints[0].hostname", "endpoints[0].nodeName"]);
        let got = &s.endpoints[0];
        assert_eq!((got.hostname(), got.node_name()), (None, None));
        assert_eq!(got.addresses(), [ip("10.1.0.5")]);
    }

    #[test]
    fn port_rules() {
        let port =
            |name: Option<&str>, port: Option<i32>, protocol: Option<&str>| k8s::EndpointPort {
                name: name.map(str::to_string),
                port,
                protocol: protocol.map(str::to_string),
                ..Default::default()
            };
        let with = |ports: Vec<k8s::EndpointPort>| {
            let mut k = slice("IPv4", vec![]);
            k.ports = Some(ports);
            warned(&k)
        };
        let (s, warnings) = with(vec![
            port(Some("http"), Some(8080), None),
            port(Some("dns"), Some(53), Some("UDP")),
            port(Some("all"), None, None),
        ]);
        assert!(
            warnings.is_empty(),
            "a port without number is skipped silently"
        );
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[1].protocol, Protocol::Udp);

        // Each unusable port is ignored with a warning; the good one stays.
        let (s, warnings) = with(vec![
            port(None, Some(0), None),
            port(Some("b"), Some(65536), None),
            port(Some("HTTP"), Some(80), None),
            port(Some("c"), Some(80), Some("tcp")),
            port(Some("a"), Some(80), None),
            port(Some("a"), Some(81), None),
        ]);
        assert_eq!(
            warnings,
            [
                "ports[0].port",
                "ports[1].port",
                "ports[2].name",
                "ports[3].protocol",
                "ports[5].name"
            ]
        );
        assert_eq!(s.ports.len(), 1);
        assert_eq!((s.ports[0].name.as_ref(), s.ports[0].port), ("a", 80));
        // nil and "" are the same name.
        let (s, warnings) = with(vec![
            port(None, Some(80), None),
            port(Some(""), Some(81), None),
        ]);
        assert_eq!(warnings, ["ports[1].name"]);
        assert_eq!(s.ports[0].port, 80);
    }

    #[test]
    fn slice_name_rules() {
        let mut k = slice("IPv4", vec![]);
        k.metadata.name = Some("Web".into());
        assert_eq!(
            endpoint_slice_from_k8s(&k).unwrap_err().field,
            "metadata.name"
        );
    }
}
