//! v1 Pod → [`Pod`].

use k8s_openapi::api::core::v1 as k8s;

use super::{Ctx, DNS1123_LABEL_REASON, DNS1123_SUBDOMAIN_REASON, NameRule, namespaced};
use crate::error::InvalidObject;
use crate::types::{ContainerPort, IpFamily, Kind, Pod};
use crate::validate::{is_dns1123_label, is_dns1123_subdomain, is_iana_svc_name};

/// Validate and convert a Pod: what the standalone EndpointSlice controller needs.
pub fn pod_from_k8s(p: &k8s::Pod) -> Result<Pod, InvalidObject> {
    let (name, ctx) = namespaced(Kind::Pod, &p.metadata, NameRule::Dns1123Subdomain)?;
    let labels = ctx.labels("metadata.labels", p.metadata.labels.as_ref())?;
    let status = p.status.as_ref();
    let ips = pod_ips(&ctx, status)?;
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
    let hostname = optional_name(
        &ctx,
        "spec.hostname",
        spec.and_then(|s| s.hostname.as_ref()),
        is_dns1123_label,
        DNS1123_LABEL_REASON,
    )?;
    let subdomain = optional_name(
        &ctx,
        "spec.subdomain",
        spec.and_then(|s| s.subdomain.as_ref()),
        is_dns1123_label,
        DNS1123_LABEL_REASON,
    )?;
    let node_name = optional_name(
        &ctx,
        "spec.nodeName",
        spec.and_then(|s| s.node_name.as_ref()),
        is_dns1123_subdomain,
        DNS1123_SUBDOMAIN_REASON,
    )?;
    let container_ports = container_ports(
        &ctx,
        spec.map(|s| s.containers.as_slice()).unwrap_or_default(),
    )?;

    Ok(Pod {
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
    })
}

/// status.podIPs, or status.podIP when podIPs is absent: at most one per family.
fn pod_ips(
    ctx: &Ctx,
    status: Option<&k8s::PodStatus>,
) -> Result<Vec<std::net::IpAddr>, InvalidObject> {
    let Some(status) = status else {
        return Ok(Vec::new());
    };
    let ips = match status.pod_ips.as_deref() {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, ip)| ctx.ip(format!("status.podIPs[{i}].ip"), &ip.ip))
            .collect::<Result<Vec<_>, _>>()?,
        _ => match status.pod_ip.as_deref() {
            Some(ip) if !ip.is_empty() => vec![ctx.ip("status.podIP", ip)?],
            _ => Vec::new(),
        },
    };
    if ips.len() > 2 {
        return Err(ctx.err(
            "status.podIPs",
            ips.len().to_string(),
            "may hold at most two IPs, one per IP family",
        ));
    }
    if let [a, b] = ips.as_slice()
        && IpFamily::of(a) == IpFamily::of(b)
    {
        return Err(ctx.err(
            "status.podIPs[1].ip",
            b.to_string(),
            "must be of a different IP family than status.podIPs[0]",
        ));
    }
    Ok(ips)
}

fn optional_name(
    ctx: &Ctx,
    field: &str,
    value: Option<&String>,
    check: fn(&str) -> bool,
    reason: &str,
) -> Result<Option<String>, InvalidObject> {
    match value {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) if check(v) => Ok(Some(v.clone())),
        Some(v) => Err(ctx.err(field, v.as_str(), reason)),
    }
}

fn container_ports(
    ctx: &Ctx,
    containers: &[k8s::Container],
) -> Result<Vec<ContainerPort>, InvalidObject> {
    let mut ports: Vec<ContainerPort> = Vec::new();
    for (ci, container) in containers.iter().enumerate() {
        for (pi, p) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let name = match p.name.as_deref() {
                None | Some("") => None,
                Some(n) if is_iana_svc_name(n) => Some(n.to_string()),
                Some(n) => {
                    return Err(ctx.err(
                        format!("{field}.name"),
                        n,
                        "must be an IANA service name: at most 15 lower-case alphanumerics or '-', with at least one letter",
                    ));
                }
            };
            // Named ports resolve Service targetPorts, so a name must mean one port per Pod.
            if let Some(n) = &name
                && ports.iter().any(|q| q.name.as_ref() == Some(n))
            {
                return Err(ctx.err(
                    format!("{field}.name"),
                    n.as_str(),
                    "duplicate port name in the Pod",
                ));
            }
            let port = ctx.port(format!("{field}.containerPort"), p.container_port)?;
            let protocol = ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?;
            ports.push(ContainerPort {
                name,
                port,
                protocol,
            });
        }
    }
    Ok(ports)
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

    #[test]
    fn full_pod() {
        let p = pod_from_k8s(&pod()).unwrap();
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
    fn pod_ip_fallback_and_errors() {
        let mut k = pod();
        let status = k.status.as_mut().unwrap();
        status.pod_ips = None;
        assert_eq!(pod_from_k8s(&k).unwrap().ips.len(), 1);

        let mut k = pod();
        k.status.as_mut().unwrap().pod_ips = Some(vec![
            k8s::PodIP {
                ip: "10.1.0.5".into(),
            },
            k8s::PodIP {
                ip: "10.1.0.6".into(),
            },
        ]);
        assert_eq!(pod_from_k8s(&k).unwrap_err().field, "status.podIPs[1].ip");

        let mut k = pod();
        k.status.as_mut().unwrap().pod_ips = Some(vec![k8s::PodIP { ip: "nope".into() }]);
        assert_eq!(pod_from_k8s(&k).unwrap_err().field, "status.podIPs[0].ip");

        let mut k = pod();
        k.status = None;
        let p = pod_from_k8s(&k).unwrap();
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
        assert!(!pod_from_k8s(&k).unwrap().ready);

        let mut k = pod();
        k.metadata.deletion_timestamp = Some(Time("2024-01-01T00:00:00Z".parse().unwrap()));
        assert!(pod_from_k8s(&k).unwrap().terminating);

        for (phase, finished) in [("Succeeded", true), ("Failed", true), ("Pending", false)] {
            let mut k = pod();
            k.status.as_mut().unwrap().phase = Some(phase.into());
            assert_eq!(pod_from_k8s(&k).unwrap().finished, finished, "{phase}");
        }
    }

    #[test]
    fn port_and_name_rules() {
        let with_ports = |ports: Vec<k8s::ContainerPort>| {
            let mut k = pod();
            k.spec.as_mut().unwrap().containers = vec![container("a", ports)];
            pod_from_k8s(&k)
        };
        assert_eq!(
            with_ports(vec![cport(None, 0, None)]).unwrap_err().field,
            "spec.containers[0].ports[0].containerPort"
        );
        assert_eq!(
            with_ports(vec![cport(Some("8080"), 80, None)])
                .unwrap_err()
                .field,
            "spec.containers[0].ports[0].name"
        );
        assert_eq!(
            with_ports(vec![cport(None, 80, Some("ICMP"))])
                .unwrap_err()
                .field,
            "spec.containers[0].ports[0].protocol"
        );
        let e = with_ports(vec![
            cport(Some("http"), 80, None),
            cport(Some("http"), 81, None),
        ])
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].ports[1].name");

        let mut k = pod();
        k.spec.as_mut().unwrap().hostname = Some("web.0".into());
        assert_eq!(pod_from_k8s(&k).unwrap_err().field, "spec.hostname");
        let mut k = pod();
        k.spec.as_mut().unwrap().subdomain = Some("Web".into());
        assert_eq!(pod_from_k8s(&k).unwrap_err().field, "spec.subdomain");
        let mut k = pod();
        k.spec.as_mut().unwrap().node_name = Some("node_1".into());
        assert_eq!(pod_from_k8s(&k).unwrap_err().field, "spec.nodeName");
    }
}
