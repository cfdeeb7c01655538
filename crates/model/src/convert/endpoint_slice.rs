//! discovery.k8s.io/v1 EndpointSlice → [`EndpointSlice`].

use k8s_openapi::api::discovery::v1 as k8s;

use super::{Ctx, DNS1123_LABEL_REASON, DNS1123_SUBDOMAIN_REASON, NameRule, namespaced};
use crate::error::InvalidObject;
use crate::types::{
    Endpoint, EndpointHints, EndpointPort, EndpointSlice, IpFamily, Kind, Protocol,
};
use crate::validate::{is_dns1123_label, is_dns1123_subdomain};

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation with the time of the change that triggered the slice's update.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// API server limits (k8s.io/kubernetes/pkg/apis/discovery/validation).
const MAX_ENDPOINTS: usize = 1000;
const MAX_ADDRESSES: usize = 100;
const MAX_PORTS: usize = 20000;

/// Validate and convert an EndpointSlice. Ports without a port number (which
/// mean "all ports" and which kube-proxy skips) are dropped. For addressType
/// FQDN the endpoints are kept with empty `addresses`: their names are checked
/// as DNS subdomains but cannot be represented as IPs, and kube-proxy ignores
/// such slices.
pub fn endpoint_slice_from_k8s(s: &k8s::EndpointSlice) -> Result<EndpointSlice, InvalidObject> {
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

    if s.endpoints.len() > MAX_ENDPOINTS {
        return Err(ctx.err(
            "endpoints",
            s.endpoints.len().to_string(),
            format!("must have at most {MAX_ENDPOINTS} items"),
        ));
    }
    let endpoints = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| endpoint(&ctx, i, e, address_family))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = ports(&ctx, s.ports.as_deref().unwrap_or_default())?;

    let service_name = labels.get(SERVICE_NAME_LABEL).cloned();
    let last_change_trigger_time = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME_ANNOTATION))
        .cloned();

    Ok(EndpointSlice {
        name,
        service_name,
        address_family,
        ports,
        endpoints,
        last_change_trigger_time,
    })
}

fn endpoint(
    ctx: &Ctx,
    i: usize,
    e: &k8s::Endpoint,
    family: Option<IpFamily>,
) -> Result<Endpoint, InvalidObject> {
    let field = format!("endpoints[{i}]");
    if e.addresses.is_empty() {
        return Err(ctx.err(
            format!("{field}.addresses"),
            "",
            "must have at least one address",
        ));
    }
    if e.addresses.len() > MAX_ADDRESSES {
        return Err(ctx.err(
            format!("{field}.addresses"),
            e.addresses.len().to_string(),
            format!("must have at most {MAX_ADDRESSES} items"),
        ));
    }
    let mut addresses = Vec::with_capacity(e.addresses.len());
    for (j, text) in e.addresses.iter().enumerate() {
        let address_field = format!("{field}.addresses[{j}]");
        match family {
            Some(family) => {
                let ip = ctx.ip(&address_field, text)?;
                if IpFamily::of(&ip) != family {
                    return Err(ctx.err(
                        address_field,
                        text.as_str(),
                        format!("must be an {family} address (addressType {family})"),
                    ));
                }
                addresses.push(ip);
            }
            None => {
                if !is_dns1123_subdomain(text) {
                    return Err(ctx.err(address_field, text.as_str(), DNS1123_SUBDOMAIN_REASON));
                }
            }
        }
    }

    // Defaults as documented on EndpointConditions.
    let conditions = e.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);

    if let Some(hostname) = &e.hostname
        && !is_dns1123_label(hostname)
    {
        return Err(ctx.err(
            format!("{field}.hostname"),
            hostname.as_str(),
            DNS1123_LABEL_REASON,
        ));
    }
    if let Some(node_name) = &e.node_name
        && !is_dns1123_subdomain(node_name)
    {
        return Err(ctx.err(
            format!("{field}.nodeName"),
            node_name.as_str(),
            DNS1123_SUBDOMAIN_REASON,
        ));
    }
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

    Ok(Endpoint {
        addresses,
        ready,
        serving,
        terminating,
        hostname: e.hostname.clone(),
        node_name: e.node_name.clone(),
        zone: e.zone.clone(),
        hints,
    })
}

fn ports(ctx: &Ctx, k8s_ports: &[k8s::EndpointPort]) -> Result<Vec<EndpointPort>, InvalidObject> {
    if k8s_ports.len() > MAX_PORTS {
        return Err(ctx.err(
            "ports",
            k8s_ports.len().to_string(),
            format!("must have at most {MAX_PORTS} items"),
        ));
    }
    let mut ports: Vec<EndpointPort> = Vec::with_capacity(k8s_ports.len());
    // Index in `k8s_ports` of each kept port, for duplicate messages.
    let mut origins: Vec<usize> = Vec::with_capacity(k8s_ports.len());
    for (i, p) in k8s_ports.iter().enumerate() {
        let field = format!("ports[{i}]");
        // The API treats a nil name as "".
        let name = p.name.clone().unwrap_or_default();
        if !name.is_empty() && !is_dns1123_label(&name) {
            return Err(ctx.err(format!("{field}.name"), name, DNS1123_LABEL_REASON));
        }
        let protocol: Protocol =
            ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?;
        let Some(port) = p.port else {
            continue;
        };
        let port = ctx.port(format!("{field}.port"), port)?;
        if let Some(j) = ports.iter().position(|q| q.name == name) {
            return Err(ctx.err(
                format!("{field}.name"),
                name,
                format!("duplicate port name (also ports[{}])", origins[j]),
            ));
        }
        ports.push(EndpointPort {
            name,
            protocol,
            port,
        });
        origins.push(i);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::convert::test_util::meta;
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

    #[test]
    fn basic() {
        let mut k = slice("IPv4", vec![endpoint("10.1.0.5")]);
        k.metadata.annotations = Some(BTreeMap::from([(
            LAST_CHANGE_TRIGGER_TIME_ANNOTATION.into(),
            "2024-01-01T00:00:00Z".into(),
        )]));
        let s = endpoint_slice_from_k8s(&k).unwrap();
        assert_eq!(s.name.to_string(), "default/web-abc12");
        assert_eq!(s.service_name.as_deref(), Some("web"));
        assert_eq!(s.address_family, Some(IpFamily::V4));
        assert_eq!(
            s.ports,
            vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );
        assert_eq!(
            s.endpoints[0].addresses,
            vec!["10.1.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            s.last_change_trigger_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
    }

    #[test]
    fn no_service_label() {
        let mut k = slice("IPv4", vec![]);
        k.metadata.labels = None;
        assert_eq!(endpoint_slice_from_k8s(&k).unwrap().service_name, None);
    }

    #[test]
    fn address_types() {
        let s = endpoint_slice_from_k8s(&slice("IPv6", vec![endpoint("fd00::5")])).unwrap();
        assert_eq!(s.address_family, Some(IpFamily::V6));

        let e = endpoint_slice_from_k8s(&slice("IPv4", vec![endpoint("fd00::5")])).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("endpoints[0].addresses[0]", "fd00::5")
        );
        let e = endpoint_slice_from_k8s(&slice("IPv6", vec![endpoint("10.0.0.1")])).unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]");
        let e = endpoint_slice_from_k8s(&slice("IPv4", vec![endpoint("10.0.0")])).unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]");
        let e = endpoint_slice_from_k8s(&slice("ipv4", vec![])).unwrap_err();
        assert_eq!(e.field, "addressType");

        let s = endpoint_slice_from_k8s(&slice("FQDN", vec![endpoint("db.example.com")])).unwrap();
        assert_eq!(s.address_family, None);
        assert_eq!(s.endpoints.len(), 1);
        assert!(s.endpoints[0].addresses.is_empty());
        assert!(endpoint_slice_from_k8s(&slice("FQDN", vec![endpoint("not a name")])).is_err());

        let e =
            endpoint_slice_from_k8s(&slice("IPv4", vec![k8s::Endpoint::default()])).unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses");
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
            let s = endpoint_slice_from_k8s(&slice("IPv4", vec![e])).unwrap();
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
        let s = endpoint_slice_from_k8s(&slice("IPv4", vec![endpoint("10.1.0.5")])).unwrap();
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
        let s = endpoint_slice_from_k8s(&slice("IPv4", vec![e.clone()])).unwrap();
        let got = &s.endpoints[0];
        assert_eq!(got.hostname.as_deref(), Some("web-0"));
        assert_eq!(got.node_name.as_deref(), Some("node-1"));
        assert_eq!(got.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            got.hints,
            Some(EndpointHints {
                for_zones: vec!["zone-a".into()],
                for_nodes: vec!["node-1".into()]
            })
        );

        let mut bad = e.clone();
        bad.hostname = Some("web.0".into());
        let err = endpoint_slice_from_k8s(&slice("IPv4", vec![bad])).unwrap_err();
        assert_eq!(err.field, "endpoints[0].hostname");
        let mut bad = e;
        bad.node_name = Some("Node_1".into());
        let err = endpoint_slice_from_k8s(&slice("IPv4", vec![bad])).unwrap_err();
        assert_eq!(err.field, "endpoints[0].nodeName");
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
            endpoint_slice_from_k8s(&k)
        };
        let s = with(vec![
            port(Some("http"), Some(8080), None),
            port(Some("dns"), Some(53), Some("UDP")),
            port(Some("all"), None, None),
        ])
        .unwrap();
        assert_eq!(s.ports.len(), 2, "a port without number is skipped");
        assert_eq!(s.ports[1].protocol, Protocol::Udp);

        assert_eq!(
            with(vec![port(None, Some(0), None)]).unwrap_err().field,
            "ports[0].port"
        );
        assert_eq!(
            with(vec![port(None, Some(65536), None)]).unwrap_err().field,
            "ports[0].port"
        );
        assert_eq!(
            with(vec![port(Some("HTTP"), Some(80), None)])
                .unwrap_err()
                .field,
            "ports[0].name"
        );
        assert_eq!(
            with(vec![port(None, Some(80), Some("tcp"))])
                .unwrap_err()
                .field,
            "ports[0].protocol"
        );
        let e = with(vec![
            port(Some("a"), Some(80), None),
            port(Some("a"), Some(81), None),
        ])
        .unwrap_err();
        assert_eq!(e.field, "ports[1].name");
        // nil and "" are the same name.
        let e = with(vec![
            port(None, Some(80), None),
            port(Some(""), Some(81), None),
        ])
        .unwrap_err();
        assert_eq!(e.field, "ports[1].name");
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
