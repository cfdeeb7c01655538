//! v1 Service → [`Service`].

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Ctx, DNS1123_LABEL_REASON, DNS1123_SUBDOMAIN_REASON, NameRule, namespaced, parse_cidr_sloppy,
};
use crate::error::{Converted, InvalidObject};
use crate::intern::shared_name;
use crate::types::{
    AllocationRequest, IpFamilies, IpFamily, IpFamilyPolicy, Kind, Service, ServicePort,
    ServiceRare, ServiceType, TargetPort, TrafficPolicy,
};
use crate::validate::{is_dns1123_label, is_dns1123_subdomain, is_iana_svc_name};

/// Label that hands a Service to another proxy implementation.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service with this label is not proxied (kube-proxy's informer selects it away).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT: u32 = 10800;
/// Largest `sessionAffinityConfig.clientIP.timeoutSeconds` (1 day).
pub const MAX_SESSION_AFFINITY_TIMEOUT: u32 = 86400;

const CLUSTER_IP_NONE: &str = "None";

/// Per-Service IPVS scheduler. kube-proxy has none; this is kube-router's annotation
/// (the one IPVS-based Service proxy with a per-Service scheduler), so Services written
/// for kube-router keep their scheduler, and svcplane invents no name of its own.
pub const IPVS_SCHEDULER_ANNOTATION: &str = "kube-router.io/service.scheduler";
/// The IPVS schedulers svcplane accepts, for `--ipvs-scheduler` and the annotation
/// (kube-proxy's documented list; the kernel loads `ip_vs_<name>`).
pub const IPVS_SCHEDULERS: [&str; 5] = ["rr", "wrr", "lc", "sh", "mh"];

/// Validate and convert a v1 Service. Rejected whole only when it cannot be programmed
/// safely; a value kube-proxy would ignore (an unparsable externalIP, an unknown
/// sessionAffinity) is ignored with a warning. A nodePort may be any port (1–65535):
/// the node-port range is the API server's `--service-node-port-range`, a policy many
/// clusters widen, and kube-proxy programs whatever nodePort a Service carries.
pub fn service_from_k8s(svc: &k8s::Service) -> Result<Converted<Service>, InvalidObject> {
    let (name, ctx) = namespaced(Kind::Service, &svc.metadata, NameRule::Dns1123Label)?;
    let labels = ctx.labels("metadata.labels", svc.metadata.labels.as_ref())?;
    let default_spec = k8s::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let service_type = service_type(&ctx, spec.type_.as_deref())?;
    let external_name = match service_type {
        ServiceType::ExternalName => Some(external_name(&ctx, spec)?),
        _ => None,
    };
    let (cluster_ips, headless) = cluster_ips(&ctx, spec, service_type)?;
    let (ip_families, allocation) = ip_families(&ctx, spec, service_type, &cluster_ips, headless)?;
    if !headless
        && service_type != ServiceType::ExternalName
        && spec.ports.as_deref().unwrap_or_default().is_empty()
    {
        return Err(ctx.err("spec.ports", "", "required"));
    }
    let ports = ports(&ctx, spec, service_type)?;

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        // kube-proxy skips empty entries silently (the API server lets them through).
        .filter(|(_, ip)| !ip.trim().is_empty())
        .filter_map(|(i, ip)| ctx.ip_or_warn(format!("spec.externalIPs[{i}]"), ip))
        .collect();
    let mut load_balancer_ips = load_balancer_ips(&ctx, svc.status.as_ref());
    let load_balancer_source_ranges = source_ranges(&ctx, spec, &mut load_balancer_ips);

    let session_affinity_timeout = session_affinity(&ctx, spec);
    let external_traffic_policy = traffic_policy(
        &ctx,
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        true,
    );
    let internal_traffic_policy = traffic_policy(
        &ctx,
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        false,
    );
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(port) => {
            // kube-proxy only serves health checks for external traffic kept on the node,
            // and otherwise never reads the field.
            let external = matches!(
                service_type,
                ServiceType::LoadBalancer | ServiceType::NodePort
            );
            if external && external_traffic_policy == TrafficPolicy::Local {
                // A port that cannot be listened on costs the health check, not the rules.
                ctx.ignore(ctx.port("spec.healthCheckNodePort", port))
            } else {
                None
            }
        }
    };

    let selector = match spec.selector.as_ref() {
        Some(selector) if !selector.is_empty() => {
            Some(ctx.labels("spec.selector", Some(selector))?)
        }
        _ => None,
    };
    let service_proxy_name = labels.get(SERVICE_PROXY_NAME_LABEL).cloned();
    let ipvs_scheduler = ipvs_scheduler(&ctx, svc.metadata.annotations.as_ref());

    Ok(ctx.finish(Service {
        name,
        service_type,
        cluster_ips,
        headless,
        ip_families,
        ports,
        session_affinity_timeout,
        external_traffic_policy,
        internal_traffic_policy,
        selector,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        headless_label: labels.contains_key(HEADLESS_LABEL),
        allocation,
        rare: ServiceRare {
            external_name,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges,
            health_check_node_port,
            service_proxy_name,
            ipvs_scheduler,
        }
        .into(),
    }))
}

/// The [`IPVS_SCHEDULER_ANNOTATION`]'s scheduler; an unknown one is a warning and `None`
/// (the proxy's `--ipvs-scheduler` applies), as is an empty one, silently.
fn ipvs_scheduler(
    ctx: &Ctx,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<String> {
    let value = annotations?.get(IPVS_SCHEDULER_ANNOTATION)?;
    let name = value.trim();
    if name.is_empty() {
        return None;
    }
    if IPVS_SCHEDULERS.contains(&name) {
        return Some(name.to_owned());
    }
    ctx.warn(
        format!("metadata.annotations[{IPVS_SCHEDULER_ANNOTATION}]"),
        value.as_str(),
        format!(
            "unknown IPVS scheduler (expected one of {}): --ipvs-scheduler's is used",
            IPVS_SCHEDULERS.join(", ")
        ),
    );
    None
}

fn service_type(ctx: &Ctx, type_: Option<&str>) -> Result<ServiceType, InvalidObject> {
    match type_ {
        None | Some("ClusterIP") => Ok(ServiceType::ClusterIp),
        Some("NodePort") => Ok(ServiceType::NodePort),
        Some("LoadBalancer") => Ok(ServiceType::LoadBalancer),
        Some("ExternalName") => Ok(ServiceType::ExternalName),
        Some(other) => Err(ctx.err(
            "spec.type",
            other,
            "supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"",
        )),
    }
}

fn external_name(ctx: &Ctx, spec: &k8s::ServiceSpec) -> Result<String, InvalidObject> {
    let name = spec.external_name.as_deref().unwrap_or_default();
    if name.is_empty() {
        return Err(ctx.err("spec.externalName", "", "required for type ExternalName"));
    }
    // A fully qualified name may end with the root dot.
    let bare = name.strip_suffix('.').unwrap_or(name);
    if !is_dns1123_subdomain(bare) {
        return Err(ctx.err("spec.externalName", name, DNS1123_SUBDOMAIN_REASON));
    }
    Ok(name.to_string())
}

/// spec.clusterIP / spec.clusterIPs → (IPs, headless).
fn cluster_ips(
    ctx: &Ctx,
    spec: &k8s::ServiceSpec,
    service_type: ServiceType,
) -> Result<(Vec<IpAddr>, bool), InvalidObject> {
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or_default();
    let listed: &[String] = spec.cluster_ips.as_deref().unwrap_or_default();
    if let Some(first) = listed.first()
        && !cluster_ip.is_empty()
        && first != cluster_ip
    {
        return Err(ctx.err(
            "spec.clusterIPs[0]",
            first.as_str(),
            format!("must match spec.clusterIP {cluster_ip:?}"),
        ));
    }

    if service_type == ServiceType::ExternalName {
        if let Some(ip) = Some(cluster_ip)
            .filter(|ip| !ip.is_empty())
            .or(listed.first().map(String::as_str))
        {
            let field = if cluster_ip.is_empty() {
                "spec.clusterIPs"
            } else {
                "spec.clusterIP"
            };
            return Err(ctx.err(field, ip, "may not be set for ExternalName services"));
        }
        return Ok((Vec::new(), false));
    }

    // Where the primary came from, for error messages.
    let (texts, field): (Vec<&str>, &str) = if listed.is_empty() {
        if cluster_ip.is_empty() {
            (Vec::new(), "spec.clusterIP")
        } else {
            (vec![cluster_ip], "spec.clusterIP")
        }
    } else {
        (
            listed.iter().map(String::as_str).collect(),
            "spec.clusterIPs",
        )
    };

    match texts.first() {
        // Left to the API server, as `kubectl expose` writes it: the standalone mode's
        // allocator fills it in (see `Service::needs_cluster_ip`).
        None => Ok((Vec::new(), false)),
        Some(&CLUSTER_IP_NONE) => {
            if texts.len() > 1 {
                return Err(ctx.err(
                    "spec.clusterIPs",
                    texts.join(","),
                    "must hold a single \"None\" for a headless Service",
                ));
            }
            if service_type != ServiceType::ClusterIp {
                return Err(ctx.err(
                    "spec.clusterIP",
                    CLUSTER_IP_NONE,
                    "may only be \"None\" for type ClusterIP",
                ));
            }
            Ok((Vec::new(), true))
        }
        Some(_) => {
            if texts.len() > 2 {
                return Err(ctx.err(
                    "spec.clusterIPs",
                    texts.join(","),
                    "may hold at most two IPs, one per IP family",
                ));
            }
            let mut ips = Vec::with_capacity(texts.len());
            for (i, text) in texts.iter().enumerate() {
                let field = if field == "spec.clusterIPs" {
                    format!("spec.clusterIPs[{i}]")
                } else {
                    field.to_string()
                };
                ips.push(ctx.ip(field, text)?);
            }
            if let [a, b] = ips.as_slice()
                && IpFamily::of(a) == IpFamily::of(b)
            {
                return Err(ctx.err(
                    "spec.clusterIPs[1]",
                    texts[1],
                    "must be of a different IP family than spec.clusterIPs[0]",
                ));
            }
            Ok((ips, false))
        }
    }
}

/// spec.ipFamilies, checked against the cluster IPs, and what steers allocation. For a
/// non-headless Service the families are exactly those of its cluster IPs (none before
/// the standalone allocator ran): ipFamilies and ipFamilyPolicy only ask for IPs.
fn ip_families(
    ctx: &Ctx,
    spec: &k8s::ServiceSpec,
    service_type: ServiceType,
    cluster_ips: &[IpAddr],
    headless: bool,
) -> Result<(IpFamilies, AllocationRequest), InvalidObject> {
    if service_type == ServiceType::ExternalName {
        return Ok((IpFamilies::default(), AllocationRequest::default()));
    }
    let mut families = IpFamilies::default();
    for (i, text) in spec.ip_families.iter().flatten().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        let family = IpFamily::from_k8s(text).ok_or_else(|| {
            ctx.err(
                &field,
                text.as_str(),
                "supported values: \"IPv4\", \"IPv6\"",
            )
        })?;
        if families.contains(&family) {
            return Err(ctx.err(field, text.as_str(), "duplicate IP family"));
        }
        if let Some(ip) = cluster_ips.get(i)
            && IpFamily::of(ip) != family
        {
            return Err(ctx.err(
                field,
                text.as_str(),
                format!("must match the family of spec.clusterIPs[{i}] ({ip})"),
            ));
        }
        families.push(family);
    }

    // ipFamilyPolicy tells the API server what to allocate (the standalone allocator
    // follows it); kube-proxy never reads it and programs the cluster IPs there are. A
    // policy they contradict is only reported.
    let policy = match spec.ip_family_policy.as_deref() {
        // The API server defaults an absent policy from what is given.
        None if cluster_ips.len() > 1 || families.len() > 1 => IpFamilyPolicy::RequireDualStack,
        None => IpFamilyPolicy::SingleStack,
        Some("SingleStack") => {
            if cluster_ips.len() > 1 || families.len() > 1 {
                ctx.warn(
                    "spec.ipFamilyPolicy",
                    "SingleStack",
                    "contradicts the dual-stack spec.clusterIPs/ipFamilies, which are programmed",
                );
            }
            IpFamilyPolicy::SingleStack
        }
        Some("PreferDualStack") => IpFamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => IpFamilyPolicy::RequireDualStack,
        Some(other) => {
            ctx.warn(
                "spec.ipFamilyPolicy",
                other,
                "supported values: \"PreferDualStack\", \"RequireDualStack\", \"SingleStack\"",
            );
            IpFamilyPolicy::SingleStack
        }
    };
    let request = AllocationRequest {
        ip_family_policy: policy,
        ip_families: families,
        no_load_balancer_node_ports: spec.allocate_load_balancer_node_ports == Some(false),
    };

    if headless {
        return Ok((families, request));
    }
    // The cluster IPs decide; ipFamilies has been checked to agree with them.
    Ok((cluster_ips.iter().map(IpFamily::of).collect(), request))
}

fn ports(
    ctx: &Ctx,
    spec: &k8s::ServiceSpec,
    service_type: ServiceType,
) -> Result<Vec<ServicePort>, InvalidObject> {
    let k8s_ports: &[k8s::ServicePort] = spec.ports.as_deref().unwrap_or_default();
    let mut ports: Vec<ServicePort> = Vec::with_capacity(k8s_ports.len());
    let node_ports_allowed = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    for (i, p) in k8s_ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        if name.is_empty() {
            if k8s_ports.len() > 1 {
                return Err(ctx.err(
                    format!("{field}.name"),
                    "",
                    "required when the Service has more than one port",
                ));
            }
        } else if !is_dns1123_label(&name) {
            return Err(ctx.err(format!("{field}.name"), name, DNS1123_LABEL_REASON));
        }
        if let Some(j) = ports
            .iter()
            .position(|q| !name.is_empty() && *q.name == *name)
        {
            return Err(ctx.err(
                format!("{field}.name"),
                name,
                format!("duplicate port name (also spec.ports[{j}])"),
            ));
        }

        let port = ctx.port(format!("{field}.port"), p.port)?;
        let protocol = ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?;
        if let Some(j) = ports
            .iter()
            .position(|q| q.port == port && q.protocol == protocol)
        {
            return Err(ctx.err(
                field,
                format!("{port}/{protocol}"),
                format!("duplicate port and protocol (also spec.ports[{j}])"),
            ));
        }

        let target_port = match &p.target_port {
            // The API server defaults an unset, 0 or "" targetPort to the port.
            None => TargetPort::Number(port),
            Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(ctx.port(format!("{field}.targetPort"), *n)?)
            }
            Some(IntOrString::String(s)) => {
                if !is_iana_svc_name(s) {
                    return Err(ctx.err(
                        format!("{field}.targetPort"),
                        s.as_str(),
                        "must be a port number or an IANA service name: at most 15 lower-case alphanumerics or '-', with at least one letter",
                    ));
                }
                TargetPort::Name(s.clone())
            }
        };

        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => {
                let node_field = format!("{field}.nodePort");
                let n = ctx.port(&node_field, n)?;
                if !node_ports_allowed {
                    // The API server refuses it; kube-proxy would open it. Either way it
                    // costs nothing else of the Service.
                    ctx.warn(
                        node_field,
                        n.to_string(),
                        "may only be set for type NodePort or LoadBalancer",
                    );
                    None
                } else if let Some(j) = ports
                    .iter()
                    .position(|q| q.node_port == Some(n) && q.protocol == protocol)
                {
                    // Two ports behind one node port cannot be programmed (one map key).
                    return Err(ctx.err(
                        node_field,
                        n.to_string(),
                        format!("duplicate nodePort and protocol (also spec.ports[{j}])"),
                    ));
                } else {
                    Some(n)
                }
            }
        };

        ports.push(ServicePort {
            name: shared_name(&name),
            protocol,
            port,
            target_port,
            node_port,
        });
    }
    Ok(ports)
}

/// spec.loadBalancerSourceRanges, host bits cleared (as kube-proxy reads them). An
/// unparsable range is ignored, as by kube-proxy; but when ranges were given and none
/// parses, the LoadBalancer IPs are not programmed: kube-proxy would open them to every
/// source, the opposite of what the ranges asked for.
fn source_ranges(
    ctx: &Ctx,
    spec: &k8s::ServiceSpec,
    load_balancer_ips: &mut Vec<IpAddr>,
) -> Vec<IpNet> {
    let given = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let mut ranges = Vec::with_capacity(given.len());
    for (i, text) in given.iter().enumerate() {
        // The API server's validation allows whitespace around a range.
        match parse_cidr_sloppy(text.trim()) {
            Some(net) => ranges.push(net),
            None => ctx.warn(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                text.as_str(),
                "must be a CIDR such as 192.168.0.0/16 or fd00::/8",
            ),
        }
    }
    if !given.is_empty() && ranges.is_empty() && !load_balancer_ips.is_empty() {
        let ips: Vec<String> = load_balancer_ips.iter().map(IpAddr::to_string).collect();
        ctx.warn(
            "status.loadBalancer.ingress",
            ips.join(","),
            "not programmed: no spec.loadBalancerSourceRanges entry is valid, and without one these IPs would be open to every source",
        );
        load_balancer_ips.clear();
    }
    ranges
}

/// status.loadBalancer.ingress[].ip of VIP-mode entries (kube-proxy's `IsVIPMode`).
fn load_balancer_ips(ctx: &Ctx, status: Option<&k8s::ServiceStatus>) -> Vec<IpAddr> {
    let ingress = status
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let mut ips = Vec::new();
    for (i, entry) in ingress.iter().enumerate() {
        let field = format!("status.loadBalancer.ingress[{i}]");
        // Hostname-only entries name no address the node could match.
        let Some(text) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        // Proxy: the load balancer delivers to the node with its own address as the
        // destination, so the node must not capture the VIP.
        let vip = match entry.ip_mode.as_deref() {
            None | Some("VIP") => true,
            Some("Proxy") => false,
            Some(other) => {
                // kube-proxy programs only what is VIP mode.
                ctx.warn(
                    format!("{field}.ipMode"),
                    other,
                    "supported values: \"Proxy\", \"VIP\" (its ip is not programmed)",
                );
                false
            }
        };
        // Only VIP-mode IPs are used, so only they are checked (kube-proxy's order).
        if vip && let Some(ip) = ctx.ip_or_warn(format!("{field}.ip"), text) {
            ips.push(ip);
        }
    }
    ips
}

/// The ClientIP affinity timeout. Anything but `ClientIP` means no affinity, as for
/// kube-proxy. A timeout outside 1..=86400 (which no API server accepts) gets the
/// default instead: nft refuses large ones (≥ 10^8 s with nft 1.0.6), which would
/// fail every Service's transaction.
fn session_affinity(ctx: &Ctx, spec: &k8s::ServiceSpec) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout.map(u32::try_from) {
                None => Some(DEFAULT_SESSION_AFFINITY_TIMEOUT),
                Some(Ok(t)) if (1..=MAX_SESSION_AFFINITY_TIMEOUT).contains(&t) => Some(t),
                Some(_) => {
                    ctx.warn(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        timeout.unwrap_or_default().to_string(),
                        format!(
                            "must be between 1 and {MAX_SESSION_AFFINITY_TIMEOUT} (the default {DEFAULT_SESSION_AFFINITY_TIMEOUT} is used)"
                        ),
                    );
                    Some(DEFAULT_SESSION_AFFINITY_TIMEOUT)
                }
            }
        }
        Some(other) => {
            ctx.warn(
                "spec.sessionAffinity",
                other,
                "supported values: \"ClientIP\", \"None\" (no affinity is programmed)",
            );
            None
        }
    }
}

/// As kube-proxy: only `Local` is Local; an unknown policy is reported and means Cluster.
fn traffic_policy(
    ctx: &Ctx,
    field: &str,
    policy: Option<&str>,
    accept_global: bool,
) -> TrafficPolicy {
    match policy {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        // Pre-1.22 spelling of Cluster for externalTrafficPolicy.
        Some("Global") if accept_global => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            ctx.warn(
                field,
                other,
                "supported values: \"Cluster\", \"Local\" (Cluster is used)",
            );
            TrafficPolicy::Cluster
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::convert::test_util::meta;
    use crate::types::Protocol;
    use k8s_openapi::api::core::v1::{
        ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ServiceStatus,
        SessionAffinityConfig,
    };

    fn port(name: &str, port: i32) -> k8s::ServicePort {
        k8s::ServicePort {
            name: (!name.is_empty()).then(|| name.to_string()),
            port,
            ..Default::default()
        }
    }

    fn svc(spec: k8s::ServiceSpec) -> k8s::Service {
        k8s::Service {
            metadata: meta(Some("ns"), "web"),
            spec: Some(spec),
            status: None,
        }
    }

    fn base() -> k8s::ServiceSpec {
        k8s::ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![port("", 80)]),
            ..Default::default()
        }
    }

    /// Converted without warnings.
    fn ok(spec: k8s::ServiceSpec) -> Service {
        match service_from_k8s(&svc(spec)) {
            Ok(c) if c.warnings.is_empty() => c.object,
            Ok(c) => panic!("unexpected warnings: {:?}", c.warnings),
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    /// Converted, with the fields of its warnings.
    fn warned(spec: k8s::ServiceSpec) -> (Service, Vec<String>) {
        match service_from_k8s(&svc(spec)) {
            Ok(c) => (c.object, c.warnings.into_iter().map(|w| w.field).collect()),
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    fn err(spec: k8s::ServiceSpec) -> InvalidObject {
        match service_from_k8s(&svc(spec)) {
            Ok(s) => panic!("unexpectedly valid: {s:?}"),
            Err(e) => e,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults() {
        let s = ok(base());
        assert_eq!(s.name.to_string(), "ns/web");
        assert_eq!(s.service_type, ServiceType::ClusterIp);
        assert!(!s.headless);
        assert_eq!(s.cluster_ips, vec![ip("10.96.0.10")]);
        assert_eq!(s.ip_families, vec![IpFamily::V4]);
        assert_eq!(
            s.ports,
            vec![ServicePort {
                name: "".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(80),
                node_port: None,
            }]
        );
        assert_eq!(s.session_affinity_timeout, None);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(s.selector, None);
        assert_eq!(s.rare.service_proxy_name, None);
        assert!(!s.publish_not_ready_addresses);
    }

    /// A DNS-1123 label: API servers with RelaxedServiceNameValidation (1.34+) let a
    /// Service name start with a digit. Anything else stays out of rule text.
    #[test]
    fn service_name_is_a_dns1123_label() {
        let mut k = svc(base());
        k.metadata.name = Some("1web".into());
        assert_eq!(&*service_from_k8s(&k).unwrap().object.name.name, "1web");
        for bad in ["web.x", "Web", "-web", "web_x"] {
            k.metadata.name = Some(bad.into());
            let e = service_from_k8s(&k).unwrap_err();
            assert_eq!((e.field.as_str(), e.value.as_str()), ("metadata.name", bad));
        }
    }

    #[test]
    fn service_type_values() {
        for (t, want) in [
            ("ClusterIP", ServiceType::ClusterIp),
            ("NodePort", ServiceType::NodePort),
            ("LoadBalancer", ServiceType::LoadBalancer),
        ] {
            let s = ok(k8s::ServiceSpec {
                type_: Some(t.into()),
                ..base()
            });
            assert_eq!(s.service_type, want);
        }
        let e = err(k8s::ServiceSpec {
            type_: Some("Cluster".into()),
            ..base()
        });
        assert_eq!(e.field, "spec.type");
    }

    #[test]
    fn a_missing_cluster_ip_is_left_to_allocate() {
        for cluster_ip in [None, Some(String::new())] {
            let s = ok(k8s::ServiceSpec {
                cluster_ip,
                ip_family_policy: Some("PreferDualStack".into()),
                ip_families: Some(vec!["IPv6".into()]),
                allocate_load_balancer_node_ports: Some(false),
                ..base()
            });
            assert!(s.needs_cluster_ip());
            assert!(s.cluster_ips.is_empty() && s.ip_families.is_empty());
            assert_eq!(
                s.allocation,
                AllocationRequest {
                    ip_family_policy: IpFamilyPolicy::PreferDualStack,
                    ip_families: vec![IpFamily::V6].into(),
                    no_load_balancer_node_ports: true,
                }
            );
        }
        assert!(!ok(base()).needs_cluster_ip());
    }

    #[test]
    fn headless() {
        let s = ok(k8s::ServiceSpec {
            cluster_ip: Some("None".into()),
            ..base()
        });
        assert!(s.headless);
        assert!(s.cluster_ips.is_empty());
        // Headless needs no ports.
        let s = ok(k8s::ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: None,
            ip_families: Some(vec!["IPv6".into()]),
            ..base()
        });
        assert!(s.ports.is_empty());
        assert_eq!(s.ip_families, vec![IpFamily::V6]);
        let e = err(k8s::ServiceSpec {
            cluster_ip: Some("None".into()),
            type_: Some("NodePort".into()),
            ..base()
        });
        assert_eq!(e.field, "spec.clusterIP");
    }

    #[test]
    fn ports_required_unless_headless_or_external_name() {
        let e = err(k8s::ServiceSpec {
            ports: None,
            ..base()
        });
        assert_eq!(e.field, "spec.ports");
    }

    #[test]
    fn cluster_ip_parses() {
        let e = err(k8s::ServiceSpec {
            cluster_ip: Some("10.96.0.300".into()),
            ..base()
        });
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("spec.clusterIP", "10.96.0.300")
        );
    }

    #[test]
    fn dual_stack() {
        let s = ok(k8s::ServiceSpec {
            cluster_ips: Some(vec!["fd00::10".into(), "10.96.0.10".into()]),
            cluster_ip: Some("fd00::10".into()),
            ip_families: Some(vec!["IPv6".into(), "IPv4".into()]),
            ip_family_policy: Some("RequireDualStack".into()),
            ..base()
        });
        assert_eq!(s.cluster_ips, vec![ip("fd00::10"), ip("10.96.0.10")]);
        assert_eq!(s.ip_families, vec![IpFamily::V6, IpFamily::V4]);

        // Families derived from the IPs when ipFamilies is absent.
        let s = ok(k8s::ServiceSpec {
            cluster_ip: None,
            cluster_ips: Some(vec!["10.96.0.10".into(), "fd00::10".into()]),
            ..base()
        });
        assert_eq!(s.ip_families, vec![IpFamily::V4, IpFamily::V6]);
    }

    #[test]
    fn dual_stack_errors() {
        let e = err(k8s::ServiceSpec {
            cluster_ips: Some(vec!["10.96.0.11".into()]),
            ..base()
        });
        assert_eq!(e.field, "spec.clusterIPs[0]");
        assert!(e.reason.contains("must match spec.clusterIP"));

        let e = err(k8s::ServiceSpec {
            cluster_ip: None,
            cluster_ips: Some(vec!["10.96.0.10".into(), "10.96.0.11".into()]),
            ..base()
        });
        assert_eq!(e.field, "spec.clusterIPs[1]");

        let e = err(k8s::ServiceSpec {
            cluster_ip: None,
            cluster_ips: Some(vec![
                "10.96.0.10".into(),
                "fd00::1".into(),
                "fd00::2".into(),
            ]),
            ..base()
        });
        assert_eq!(e.field, "spec.clusterIPs");

        let e = err(k8s::ServiceSpec {
            ip_families: Some(vec!["IPv6".into()]),
            ..base()
        });
        assert_eq!(e.field, "spec.ipFamilies[0]");

        let e = err(k8s::ServiceSpec {
            ip_families: Some(vec!["ipv4".into()]),
            ..base()
        });
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("spec.ipFamilies[0]", "ipv4")
        );
    }

    /// ipFamilyPolicy is the API server's allocation policy; kube-proxy never reads it.
    /// The cluster IPs there are are programmed, and a contradiction is reported.
    #[test]
    fn ip_family_policy_is_only_reported() {
        // Asking for a second family is the allocator's business, not a warning.
        let (s, warnings) = warned(k8s::ServiceSpec {
            ip_family_policy: Some("RequireDualStack".into()),
            ..base()
        });
        assert!(warnings.is_empty());
        assert_eq!(s.cluster_ips, vec![ip("10.96.0.10")]);
        assert_eq!(
            s.allocation.ip_family_policy,
            IpFamilyPolicy::RequireDualStack
        );

        let (s, warnings) = warned(k8s::ServiceSpec {
            cluster_ip: None,
            cluster_ips: Some(vec!["10.96.0.10".into(), "fd00::1".into()]),
            ip_family_policy: Some("SingleStack".into()),
            ..base()
        });
        assert_eq!(warnings, ["spec.ipFamilyPolicy"]);
        assert_eq!(s.ip_families, vec![IpFamily::V4, IpFamily::V6]);

        let (_, warnings) = warned(k8s::ServiceSpec {
            ip_family_policy: Some("Whatever".into()),
            ..base()
        });
        assert_eq!(warnings, ["spec.ipFamilyPolicy"]);
    }

    #[test]
    fn prefer_dual_stack_with_one_ip_is_single_stack() {
        let s = ok(k8s::ServiceSpec {
            ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
            ip_family_policy: Some("PreferDualStack".into()),
            ..base()
        });
        assert_eq!(s.ip_families, vec![IpFamily::V4]);
    }

    #[test]
    fn port_rules() {
        let e = err(k8s::ServiceSpec {
            ports: Some(vec![port("", 0)]),
            ..base()
        });
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("spec.ports[0].port", "0")
        );

        // Names required and unique with more than one port.
        let e = err(k8s::ServiceSpec {
            ports: Some(vec![port("a", 80), port("", 81)]),
            ..base()
        });
        assert_eq!(e.field, "spec.ports[1].name");
        let e = err(k8s::ServiceSpec {
            ports: Some(vec![port("a", 80), port("a", 81)]),
            ..base()
        });
        assert_eq!(e.field, "spec.ports[1].name");
        assert!(e.reason.contains("duplicate"));
        let e = err(k8s::ServiceSpec {
            ports: Some(vec![port("HTTP", 80)]),
            ..base()
        });
        assert_eq!(e.field, "spec.ports[0].name");

        // (port, protocol) unique; same port on another protocol is fine.
        let e = err(k8s::ServiceSpec {
            ports: Some(vec![port("a", 53), port("b", 53)]),
            ..base()
        });
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("spec.ports[1]", "53/TCP")
        );
        let mut udp = port("b", 53);
        udp.protocol = Some("UDP".into());
        let s = ok(k8s::ServiceSpec {
            ports: Some(vec![port("a", 53), udp]),
            ..base()
        });
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(&*s.ports[1].name, "b");

        let mut bad = port("", 80);
        bad.protocol = Some("ICMP".into());
        let e = err(k8s::ServiceSpec {
            ports: Some(vec![bad]),
            ..base()
        });
        assert_eq!(e.field, "spec.ports[0].protocol");
    }

    #[test]
    fn target_port() {
        let with = |t: IntOrString| {
            let mut p = port("", 80);
            p.target_port = Some(t);
            k8s::ServiceSpec {
                ports: Some(vec![p]),
                ..base()
            }
        };
        assert_eq!(
            ok(with(IntOrString::Int(8080))).ports[0].target_port,
            TargetPort::Number(8080)
        );
        assert_eq!(
            ok(with(IntOrString::Int(0))).ports[0].target_port,
            TargetPort::Number(80)
        );
        assert_eq!(
            ok(with(IntOrString::String("http".into()))).ports[0].target_port,
            TargetPort::Name("http".into())
        );
        let e = err(with(IntOrString::Int(65536)));
        assert_eq!(e.field, "spec.ports[0].targetPort");
        let e = err(with(IntOrString::String("8080".into())));
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("spec.ports[0].targetPort", "8080")
        );
        assert!(
            err(with(IntOrString::String("a-very-long-port-name".into())))
                .field
                .ends_with("targetPort")
        );
    }

    #[test]
    fn node_ports() {
        let with = |t: &str, n: i32| {
            let mut p = port("", 80);
            p.node_port = Some(n);
            k8s::ServiceSpec {
                type_: Some(t.into()),
                ports: Some(vec![p]),
                ..base()
            }
        };
        assert_eq!(ok(with("NodePort", 30080)).ports[0].node_port, Some(30080));
        assert_eq!(
            ok(with("LoadBalancer", 32767)).ports[0].node_port,
            Some(32767)
        );
        // Not for type ClusterIP: ignored, the rest of the Service stays.
        let (s, warnings) = warned(with("ClusterIP", 30080));
        assert_eq!(warnings, ["spec.ports[0].nodePort"]);
        assert_eq!(s.ports[0].node_port, None);
        // Any port: the node-port range is the API server's policy, not kube-proxy's.
        for n in [1, 80, 3001, 29999, 32768, 65535] {
            assert_eq!(ok(with("NodePort", n)).ports[0].node_port, Some(n as u16));
        }
        for n in [-1, 65536, 70000] {
            let e = err(with("NodePort", n));
            assert_eq!(
                (e.field.as_str(), e.value.as_str(), e.reason.as_str()),
                (
                    "spec.ports[0].nodePort",
                    n.to_string().as_str(),
                    "must be between 1 and 65535"
                )
            );
        }

        let mut a = port("a", 80);
        a.node_port = Some(30080);
        let mut b = port("b", 81);
        b.node_port = Some(30080);
        let e = err(k8s::ServiceSpec {
            type_: Some("NodePort".into()),
            ports: Some(vec![a, b]),
            ..base()
        });
        assert_eq!(e.field, "spec.ports[1].nodePort");
    }

    #[test]
    fn external_ips_and_source_ranges() {
        let s = ok(k8s::ServiceSpec {
            external_ips: Some(vec!["192.0.2.1".into(), "2001:db8::1".into()]),
            load_balancer_source_ranges: Some(vec!["10.0.0.1/8".into(), " 2001:db8::/32".into()]),
            ..base()
        });
        assert_eq!(
            s.rare.external_ips,
            vec![ip("192.0.2.1"), ip("2001:db8::1")]
        );
        assert_eq!(
            s.rare.load_balancer_source_ranges,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        // As kube-proxy: an unparsable entry is ignored (an empty externalIP silently),
        // legacy leading zeros are decimal, and the rest of the Service stays.
        let (s, warnings) = warned(k8s::ServiceSpec {
            external_ips: Some(vec![
                "example.com".into(),
                "".into(),
                "192.000.002.001".into(),
            ]),
            load_balancer_source_ranges: Some(vec!["10.0.0.0".into(), "010.0.0.0/8".into()]),
            ..base()
        });
        assert_eq!(
            warnings,
            ["spec.externalIPs[0]", "spec.loadBalancerSourceRanges[0]"]
        );
        assert_eq!(s.rare.external_ips, vec![ip("192.0.2.1")]);
        assert_eq!(
            s.rare.load_balancer_source_ranges,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(s.cluster_ips, vec![ip("10.96.0.10")]);
    }

    /// Source ranges were asked for and none is usable: kube-proxy would open the
    /// LoadBalancer IPs to every source; svcplane leaves them out instead.
    #[test]
    fn unusable_source_ranges_fail_closed() {
        let mut k = svc(k8s::ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_source_ranges: Some(vec!["10.0.0.0/33".into()]),
            ..base()
        });
        k.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("192.0.2.10".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let c = service_from_k8s(&k).unwrap();
        let fields: Vec<&str> = c.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.loadBalancerSourceRanges[0]",
                "status.loadBalancer.ingress"
            ]
        );
        assert!(c.object.rare.load_balancer_ips.is_empty());
        assert!(c.object.rare.load_balancer_source_ranges.is_empty());
        assert_eq!(c.object.cluster_ips, vec![ip("10.96.0.10")]);

        // One usable range is enough: it restricts, the LB IP is programmed.
        k.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(vec!["10.0.0.0/33".into(), "203.0.113.0/24".into()]);
        let c = service_from_k8s(&k).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.object.rare.load_balancer_ips, vec![ip("192.0.2.10")]);
    }

    #[test]
    fn load_balancer_ingress() {
        let entry =
            |ip: Option<&str>, mode: Option<&str>, host: Option<&str>| LoadBalancerIngress {
                ip: ip.map(str::to_string),
                ip_mode: mode.map(str::to_string),
                hostname: host.map(str::to_string),
                ..Default::default()
            };
        let mut k = svc(k8s::ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..base()
        });
        k.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    entry(Some("192.0.2.10"), None, None),
                    entry(Some("192.0.2.11"), Some("Proxy"), None),
                    entry(None, None, Some("lb.example.com")),
                    entry(Some("2001:db8::10"), Some("VIP"), None),
                ]),
            }),
            ..Default::default()
        });
        let s = service_from_k8s(&k).unwrap();
        assert!(s.warnings.is_empty());
        assert_eq!(
            s.object.rare.load_balancer_ips,
            vec![ip("192.0.2.10"), ip("2001:db8::10")]
        );

        // A bad IP or an unknown ipMode costs that entry only (kube-proxy programs only
        // VIP-mode entries whose IP parses).
        k.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    entry(Some("bad"), None, None),
                    entry(Some("192.0.2.12"), Some("Magic"), None),
                    entry(Some("192.0.2.13"), None, None),
                ]),
            }),
            ..Default::default()
        });
        let c = service_from_k8s(&k).unwrap();
        let fields: Vec<&str> = c.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "status.loadBalancer.ingress[0].ip",
                "status.loadBalancer.ingress[1].ipMode"
            ]
        );
        assert_eq!(c.object.rare.load_balancer_ips, vec![ip("192.0.2.13")]);
    }

    #[test]
    fn session_affinity_rules() {
        let with = |affinity: &str, timeout: Option<i32>| k8s::ServiceSpec {
            session_affinity: Some(affinity.into()),
            session_affinity_config: timeout.map(|t| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            }),
            ..base()
        };
        assert_eq!(
            ok(with("ClientIP", None)).session_affinity_timeout,
            Some(10800)
        );
        assert_eq!(
            ok(with("ClientIP", Some(60))).session_affinity_timeout,
            Some(60)
        );
        assert_eq!(
            ok(with("ClientIP", Some(86400))).session_affinity_timeout,
            Some(86400)
        );
        assert_eq!(ok(with("None", Some(60))).session_affinity_timeout, None);
        // A timeout no API server accepts gets the default (nft refuses large ones).
        for t in [0, -5, 86401, i32::MAX] {
            let (s, warnings) = warned(with("ClientIP", Some(t)));
            assert_eq!(
                warnings,
                ["spec.sessionAffinityConfig.clientIP.timeoutSeconds"]
            );
            assert_eq!(s.session_affinity_timeout, Some(10800), "{t}");
        }
        // As kube-proxy: anything but ClientIP is no affinity.
        let (s, warnings) = warned(with("Cookie", None));
        assert_eq!(warnings, ["spec.sessionAffinity"]);
        assert_eq!(s.session_affinity_timeout, None);
    }

    #[test]
    fn traffic_policies() {
        let s = ok(k8s::ServiceSpec {
            type_: Some("LoadBalancer".into()),
            external_traffic_policy: Some("Local".into()),
            internal_traffic_policy: Some("Local".into()),
            health_check_node_port: Some(31000),
            ..base()
        });
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.rare.health_check_node_port, Some(31000));

        let s = ok(k8s::ServiceSpec {
            type_: Some("NodePort".into()),
            external_traffic_policy: Some("Global".into()),
            health_check_node_port: Some(31000),
            ..base()
        });
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(
            s.rare.health_check_node_port, None,
            "meaningless with eTP Cluster"
        );

        // As kube-proxy: only "Local" is Local; anything else is reported and is Cluster.
        let (s, warnings) = warned(k8s::ServiceSpec {
            external_traffic_policy: Some("local".into()),
            internal_traffic_policy: Some("Global".into()),
            ..base()
        });
        assert_eq!(
            warnings,
            ["spec.externalTrafficPolicy", "spec.internalTrafficPolicy"]
        );
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Cluster);
        let (s, warnings) = warned(k8s::ServiceSpec {
            type_: Some("LoadBalancer".into()),
            external_traffic_policy: Some("Local".into()),
            health_check_node_port: Some(70000),
            ..base()
        });
        assert_eq!(warnings, ["spec.healthCheckNodePort"]);
        assert_eq!(s.rare.health_check_node_port, None);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
    }

    #[test]
    fn external_name() {
        let spec = |name: Option<&str>| k8s::ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: name.map(str::to_string),
            cluster_ip: None,
            ports: None,
            ..Default::default()
        };
        let s = ok(spec(Some("db.example.com.")));
        assert_eq!(s.service_type, ServiceType::ExternalName);
        assert_eq!(s.rare.external_name.as_deref(), Some("db.example.com."));
        assert!(s.cluster_ips.is_empty() && s.ip_families.is_empty());
        assert_eq!(err(spec(None)).field, "spec.externalName");
        assert_eq!(err(spec(Some("db_example.com"))).field, "spec.externalName");
        let e = err(k8s::ServiceSpec {
            cluster_ip: Some("10.0.0.1".into()),
            ..spec(Some("db"))
        });
        assert_eq!(e.field, "spec.clusterIP");
    }

    #[test]
    fn selector_and_labels() {
        let s = ok(k8s::ServiceSpec {
            selector: Some(BTreeMap::from([("app".into(), "web".into())])),
            ..base()
        });
        assert_eq!(
            s.selector,
            Some(BTreeMap::from([("app".into(), "web".into())]))
        );
        assert_eq!(
            ok(k8s::ServiceSpec {
                selector: Some(BTreeMap::new()),
                ..base()
            })
            .selector,
            None
        );
        let e = err(k8s::ServiceSpec {
            selector: Some(BTreeMap::from([("app".into(), "we b".into())])),
            ..base()
        });
        assert_eq!(e.field, "spec.selector[app]");

        let mut k = svc(base());
        k.metadata.labels = Some(BTreeMap::from([(
            SERVICE_PROXY_NAME_LABEL.to_string(),
            "other-proxy".to_string(),
        )]));
        let s = service_from_k8s(&k).unwrap().object;
        assert_eq!(s.rare.service_proxy_name.as_deref(), Some("other-proxy"));
        assert!(!s.headless_label);
        k.metadata.labels = Some(BTreeMap::from([(
            HEADLESS_LABEL.to_string(),
            String::new(),
        )]));
        let s = service_from_k8s(&k).unwrap().object;
        assert!(s.headless_label && s.rare.service_proxy_name.is_none());
        // Other labels are validated but not kept: they leave the rare part unallocated.
        k.metadata.labels = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
        let s = service_from_k8s(&k).unwrap().object;
        assert_eq!(s.rare, crate::Rare::default());
    }

    #[test]
    fn publish_not_ready() {
        let s = ok(k8s::ServiceSpec {
            publish_not_ready_addresses: Some(true),
            ..base()
        });
        assert!(s.publish_not_ready_addresses);
    }

    #[test]
    fn ipvs_scheduler_annotation() {
        let with = |value: &str| {
            let mut k = svc(base());
            k.metadata.annotations = Some(BTreeMap::from([(
                IPVS_SCHEDULER_ANNOTATION.to_string(),
                value.to_string(),
            )]));
            service_from_k8s(&k).unwrap()
        };
        assert_eq!(ok(base()).rare.ipvs_scheduler, None);
        for name in IPVS_SCHEDULERS {
            let c = with(name);
            assert!(c.warnings.is_empty(), "{name}: {:?}", c.warnings);
            assert_eq!(c.object.rare.ipvs_scheduler.as_deref(), Some(name));
        }
        assert_eq!(
            with(" lc ").object.rare.ipvs_scheduler.as_deref(),
            Some("lc")
        );
        let empty = with("");
        assert!(empty.warnings.is_empty() && empty.object.rare.ipvs_scheduler.is_none());
        // Unknown: a warning naming the object, the field and the value; the Service is
        // kept, without a scheduler of its own.
        let c = with("fancy");
        assert_eq!(c.object.rare.ipvs_scheduler, None);
        assert_eq!(c.object.ports.len(), 1);
        let [w] = c.warnings.as_slice() else {
            panic!("one warning expected: {:?}", c.warnings)
        };
        assert_eq!(
            w.to_string(),
            "Service ns/web: metadata.annotations[kube-router.io/service.scheduler]: invalid value \"fancy\": \
             unknown IPVS scheduler (expected one of rr, wrr, lc, sh, mh): --ipvs-scheduler's is used"
        );
    }
}
