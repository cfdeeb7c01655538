//! v1 Pod → [`Pod`].

use k8s_openapi::api::core::v1 as k8s;

use super::{Ctx, DNS1123_LABEL_REASON, DNS1123_SUBDOMAIN_REASON, NameRule, namespaced};
use crate::error::{Converted, InvalidObject};
use crate::types::{ContainerPort, IpFamily, Kind, Pod};
use crate::validate::{is_dns1123_label, is_dns1123_subdomain, is_iana_svc_name};

/// Validate and convert a Pod: what the standalone EndpointSlice controller needs.
/// A field that cannot be used (an IP that does not parse, a second IP of one family,
/// an invalid hostname, a container port with an invalid name or number) is ignored
/// with a warning; the Pod is still an endpoint with the rest.
pub fn pod_from_k8s(p: &k8s::Pod) -> Result<Converted<Pod>, InvalidObject> {
    let (name, ctx) = namespaced(Kind::Pod, &p.metadata, NameRule::Dns1123Subdomain)?;
    let labels = ctx.labels("metadata.labels", p.metadata.labels.as_ref())?;
    let status = p.status.as_ref();
    let ips = pod_ips(&ctx, status);
    let ready = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );

    let spec = p.spec.as_ref();
    let hostname = ctx.name_or_warn(
        "spec.hostname",
        spec.and_then(|s| s.hostname.as_ref()),
        is_dns1123_label,
        DNS1123_LABEL_REASON,
    );
    let subdomain = ctx.name_or_warn(
        "spec.subdomain",
        spec.and_then(|s| s.subdomain.as_ref()),
        is_dns1123_label,
        DNS1123_LABEL_REASON,
    );
    let node_name = ctx.name_or_warn(
        "spec.nodeName",
        spec.and_then(|s| s.node_name.as_ref()),
        is_dns1123_subdomain,
        DNS1123_SUBDOMAIN_REASON,
    );
    let container_ports = container_ports(
        &ctx,
        spec.map(|s| s.containers.as_slice()).unwrap_or_default(),
    );

    Ok(ctx.finish(Pod {
        name,
        labels,
        ips,
        node_name,
        ready,
        terminating: p.metadata.deletion_timestamp.is_some(),
        finished,
        hostname,
        subdomain,
        container_ports,
    }))
}

/// status.podIPs, or status.podIP when podIPs is absent: at most one per family (the
/// API server's rule; the EndpointSlice controller takes the first of each family).
fn pod_ips(ctx: &Ctx, status: Option<&k8s::PodStatus>) -> Vec<std::net::IpAddr> {
    let Some(status) = status else {
        return Vec::new();
    };
    let listed: Vec<(String, &str)> = match status.pod_ips.as_deref() {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.as_str()))
            .collect(),
        _ => match status.pod_ip.as_deref() {
            Some(ip) if !ip.is_empty() => vec![("status.podIP".to_string(), ip)],
            _ => Vec::new(),
        },
    };
    let mut ips: Vec<std::net::IpAddr> = Vec::with_capacity(listed.len());
    for (field, text) in listed {
        let Some(ip) = ctx.ip_or_warn(&field, text) else {
            continue;
        };
        if let Some(first) = ips.iter().find(|q| IpFamily::of(q) == IpFamily::of(&ip)) {
            ctx.warn(
                field,
                text,
                format!("a Pod has one IP per family, and {first} came first"),
            );
            continue;
        }
        ips.push(ip);
    }
    ips
}

const IANA_SVC_NAME_REASON: &str = "must be an IANA service name: at most 15 lower-case alphanumerics or '-', with at least one letter";

/// Every container's ports; one that cannot be used (bad name, number or protocol, or
/// a name already taken) is ignored with a warning.
fn container_ports(ctx: &Ctx, containers: &[k8s::Container]) -> Vec<ContainerPort> {
    let mut ports: Vec<ContainerPort> = Vec::new();
    for (ci, container) in containers.iter().enumerate() {
        for (pi, p) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let name = match p.name.as_deref() {
                None | Some("") => None,
                Some(n) if is_iana_svc_name(n) => Some(n.to_string()),
                Some(n) => {
                    ctx.warn(format!("{field}.name"), n, IANA_SVC_NAME_REASON);
                    continue;
                }
            };
            // Named ports resolve Service targetPorts, so a name must mean one port per Pod.
            if let Some(n) = &name
                && ports.iter().any(|q| q.name.as_ref() == Some(n))
            {
                ctx.warn(
                    format!("{field}.name"),
                    n.as_str(),
                    "duplicate port name in the Pod (the first is used)",
                );
                continue;
            }
            let Some(port) =
                ctx.ignore(ctx.port(format!("{field}.containerPort"), p.container_port))
            else {
                continue;
            };
            let Some(protocol) =
                ctx.ignore(ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref()))
            else {
                continue;
            };
            ports.push(ContainerPort {
                name,
                port,
                protocol,
            });
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::convert::test_util::meta;
    use crate::types::Protocol;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn container(name: &str, ports: Vec<k8s::ContainerPort>) -> k8s::Container {
        k8s::Container {
            name: name.into(),
            ports: Some(ports),
            ..Default::default()
        }
    }

    fn cport(name: Option<&str>, port: i32, protocol: Option<&str>) -> k8s::ContainerPort {
        k8s::ContainerPort {
            name: name.map(str::to_string),
            container_port: port,
            protocol: protocol.map(str::to_string),
            ..Default::default()
        }
    }

    fn pod() -> k8s::Pod {
        let mut metadata = meta(Some("ns"), "web-0");
        metadata.labels = Some(BTreeMap::from([("app".into(), "web".into())]));
        k8s::Pod {
            metadata,
            spec: Some(k8s::PodSpec {
                containers: vec![
                    container("a", vec![cport(Some("http"), 8080, None)]),
                    container("b", vec![cport(None, 53, Some("UDP"))]),
                ],
                hostname: Some("web-0".into()),
                subdomain: Some("web".into()),
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(k8s::PodStatus {
                pod_ip: Some("10.1.0.5".into()),
                pod_ips: Some(vec![
                    k8s::PodIP {
                        ip: "10.1.0.5".into(),
                    },
                    k8s::PodIP {
                        ip: "fd00::5".into(),
                    },
                ]),
                phase: Some("Running".into()),
                conditions: Some(vec![k8s::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    /// Converted without warnings.
    fn clean(k: &k8s::Pod) -> Pod {
        let c = pod_from_k8s(k).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        c.object
    }

    /// Converted, with the fields of its warnings.
    fn warned(k: &k8s::Pod) -> (Pod, Vec<String>) {
        let c = pod_from_k8s(k).unwrap();
        let fields = c.warnings.iter().map(|w| w.field.clone()).collect();
        (c.object, fields)
    }

    #[test]
    fn full_pod() {
        let p = clean(&pod());
        assert_eq!(p.name.to_string(), "ns/web-0");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            p.ips,
            vec![
                "10.1.0.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(p.ready && !p.terminating && !p.finished);
        assert_eq!(p.hostname.as_deref(), Some("web-0"));
        assert_eq!(p.subdomain.as_deref(), Some("web"));
        assert_eq!(p.node_name.as_deref(), Some("node-1"));
        assert_eq!(
            p.container_ports,
            vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                ContainerPort {
                    name: None,
                    port: 53,
                    protocol: Protocol::Udp
                },
            ]
        );
    }

    #[test]
    fn pod_ip_fallback_and_ignored_ips() {
        let mut k = pod();
        let status = k.status.as_mut().unwrap();
        status.pod_ips = None;
        assert_eq!(clean(&k).ips.len(), 1);

        // One IP per family: a second one is ignored, as is one that does not parse.
        let mut k = pod();
        k.status.as_mut().unwrap().pod_ips = Some(
            ["nope", "10.1.0.5", "10.1.0.6", "fd00::5"]
                .into_iter()
                .map(|ip| k8s::PodIP { ip: ip.into() })
                .collect(),
        );
        let (p, warnings) = warned(&k);
        assert_eq!(warnings, ["status.podIPs[0].ip", "status.podIPs[2].ip"]);
        assert_eq!(
            p.ips,
            vec![
                "10.1.0.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );

        let mut k = pod();
        k.status = None;
        let p = clean(&k);
        assert!(p.ips.is_empty() && !p.ready);
    }

    #[test]
    fn readiness_termination_phase() {
        let mut k = pod();
        k.status.as_mut().unwrap().conditions = Some(vec![k8s::PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            ..Default::default()
        }]);
        assert!(!clean(&k).ready);

        let mut k = pod();
        k.metadata.deletion_timestamp = Some(Time("2024-01-01T00:00:00Z".parse().unwrap()));
        assert!(clean(&k).terminating);

        for (phase, finished) in [("Succeeded", true), ("Failed", true), ("Pending", false)] {
            let mut k = pod();
            k.status.as_mut().unwrap().phase = Some(phase.into());
            assert_eq!(clean(&k).finished, finished, "{phase}");
        }
    }

    /// A port or name that cannot be used is ignored; the Pod is still an endpoint.
    #[test]
    fn port_and_name_rules() {
        let mut k = pod();
        k.spec.as_mut().unwrap().containers = vec![container(
            "a",
            vec![
                cport(None, 0, None),
                cport(Some("8080"), 80, None),
                cport(None, 80, Some("ICMP")),
                cport(Some("http"), 80, None),
                cport(Some("http"), 81, None),
            ],
        )];
        let (p, warnings) = warned(&k);
        assert_eq!(
            warnings,
            [
                "spec.containers[0].ports[0].containerPort",
                "spec.containers[0].ports[1].name",
                "spec.containers[0].ports[2].protocol",
                "spec.containers[0].ports[4].name"
            ]
        );
        assert_eq!(
            p.container_ports,
            vec![ContainerPort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp
            }]
        );

        let mut k = pod();
        let spec = k.spec.as_mut().unwrap();
        spec.hostname = Some("web.0".into());
        spec.subdomain = Some("Web".into());
        spec.node_name = Some("node_1".into());
        let (p, warnings) = warned(&k);
        assert_eq!(
            warnings,
            ["spec.hostname", "spec.subdomain", "spec.nodeName"]
        );
        assert_eq!((p.hostname, p.subdomain, p.node_name), (None, None, None));
        assert_eq!(p.ips.len(), 2);
    }
}
