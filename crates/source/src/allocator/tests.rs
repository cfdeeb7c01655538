use super::*;
use svcplane_model::{Format, Object, parse_manifest};

/// Services from YAML, as a manifest writes them.
fn services(yaml: &str) -> Vec<Service> {
    let parsed = parse_manifest(yaml, Format::Yaml).unwrap();
    assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
    parsed
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Service(s) => Some(std::sync::Arc::unwrap_or_clone(s)),
            _ => None,
        })
        .collect()
}

/// A Service as `kubectl expose` writes it, with extra spec lines.
fn svc(name: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: lab}}\n\
         spec:\n  selector: {{app: web}}\n  ports: [{{port: 80, targetPort: 8080}}]\n{extra}"
    )
}

fn config(ranges: &str, ports: &str) -> AllocatorConfig {
    AllocatorConfig {
        cluster_ip_ranges: parse_service_cluster_ip_range(ranges).unwrap(),
        node_ports: ports.parse().unwrap(),
    }
}

fn run(config: &AllocatorConfig, svcs: &[Service]) -> BTreeMap<String, Outcome> {
    let refs: Vec<&Service> = svcs.iter().collect();
    allocate(config, &refs)
        .into_iter()
        .map(|(k, v)| (k.name.to_string(), v))
        .collect()
}

fn allocated(outcome: &Outcome) -> &Service {
    match outcome {
        Outcome::Allocated(s, _) | Outcome::Partial(s, _, _) => s,
        Outcome::Failed(e) => panic!("failed: {e}"),
    }
}

fn ips(outcomes: &BTreeMap<String, Outcome>, name: &str) -> Vec<String> {
    allocated(&outcomes[name])
        .cluster_ips
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn deterministic_whatever_the_order_and_inside_the_range() {
    let yaml: String = (0..40).map(|i| svc(&format!("s{i}"), "")).collect();
    let mut svcs = services(&yaml);
    let c = config("10.96.0.0/16", "30000-32767");
    let first = run(&c, &svcs);
    svcs.reverse();
    assert_eq!(run(&c, &svcs), first);
    let net: IpNet = "10.96.0.0/16".parse().unwrap();
    let mut seen = BTreeSet::new();
    for name in first.keys() {
        let s = allocated(&first[name]);
        assert_eq!(s.cluster_ips.len(), 1);
        let ip = s.cluster_ips[0];
        assert!(net.contains(&ip), "{ip}");
        // Dynamic allocations start above the static band (256 addresses here).
        assert!(ip >= "10.96.1.0".parse::<IpAddr>().unwrap(), "{ip}");
        assert!(seen.insert(ip), "{ip} twice");
        assert_eq!(s.ip_families, vec![IpFamily::V4]);
    }
    // Pinned: the hash must not change between versions (restarts after an upgrade).
    assert_eq!(
        ips(&run(&c, &services(&svc("s0", ""))), "s0"),
        ["10.96.220.84"]
    );
}

#[test]
fn explicit_values_are_reserved_first_and_collisions_probe_on() {
    let c = config("10.96.0.0/16", "30000-32767");
    let alone = run(&c, &services(&svc("web", "")));
    let taken = ips(&alone, "web")[0].clone();
    // A Service sorted before it holds that address explicitly: web moves on.
    let yaml = svc("aaa", &format!("  clusterIP: {taken}\n")) + &svc("web", "");
    let both = run(&c, &services(&yaml));
    assert!(!both.contains_key("aaa"), "nothing to allocate for aaa");
    let moved = ips(&both, "web")[0].clone();
    assert_ne!(moved, taken);
}

#[test]
fn exhaustion_names_the_service_and_spares_the_others() {
    // A /29: 8 addresses, less the network, the first and the broadcast: 5.
    let c = config("10.96.0.0/29", "30000-32767");
    let yaml: String = (0..6).map(|i| svc(&format!("s{i}"), "")).collect();
    let out = run(&c, &services(&yaml));
    let mut got = BTreeSet::new();
    for i in 0..5 {
        let ip = ips(&out, &format!("s{i}"))[0].clone();
        assert!(!["10.96.0.0", "10.96.0.1", "10.96.0.7"].contains(&ip.as_str()));
        assert!(got.insert(ip));
    }
    match &out["s5"] {
        Outcome::Failed(e) => {
            let text = e.to_string();
            assert!(
                text.starts_with("Service lab/s5: spec.clusterIP:"),
                "{text}"
            );
            assert!(text.contains("10.96.0.0/29"), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_a_range_a_missing_cluster_ip_is_an_error_naming_the_flag() {
    let c = AllocatorConfig::default();
    let out = run(&c, &services(&svc("web", "")));
    match &out["web"] {
        Outcome::Failed(e) => assert!(e.reason.contains("--service-cluster-ip-range"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Headless and ExternalName need nothing.
    let yaml = svc("headless", "  clusterIP: None\n")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: lab}\n\
           spec: {type: ExternalName, externalName: example.com}\n";
    assert!(run(&c, &services(&yaml)).is_empty());
}

#[test]
fn families_follow_the_policy_as_the_api_server_does() {
    let dual = config("10.96.0.0/16,fd00:96::/108", "30000-32767");
    let single = config("10.96.0.0/16", "30000-32767");
    let v6 = |s: &str| s.contains(':');
    // No policy: SingleStack, the primary range's family.
    let out = run(&dual, &services(&svc("a", "")));
    assert!(ips(&out, "a").len() == 1 && !v6(&ips(&out, "a")[0]));
    // ipFamilies picks the family.
    let out = run(&dual, &services(&svc("a", "  ipFamilies: [IPv6]\n")));
    assert!(ips(&out, "a").len() == 1 && v6(&ips(&out, "a")[0]));
    // PreferDualStack: both, in ipFamilies' order; one on a single-stack cluster.
    let prefer = "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv6, IPv4]\n";
    let out = run(&dual, &services(&svc("a", prefer)));
    let got = ips(&out, "a");
    assert!(got.len() == 2 && v6(&got[0]) && !v6(&got[1]), "{got:?}");
    assert_eq!(
        allocated(&out["a"]).ip_families,
        vec![IpFamily::V6, IpFamily::V4]
    );
    let out = run(
        &single,
        &services(&svc("a", "  ipFamilyPolicy: PreferDualStack\n")),
    );
    assert!(matches!(out["a"], Outcome::Allocated(..)));
    assert_eq!(ips(&out, "a").len(), 1);
    // RequireDualStack on a single-stack cluster: the family there is, reported.
    let out = run(
        &single,
        &services(&svc("a", "  ipFamilyPolicy: RequireDualStack\n")),
    );
    match &out["a"] {
        Outcome::Partial(s, _, e) => {
            assert_eq!(s.cluster_ips.len(), 1);
            assert_eq!(e.field, "spec.ipFamilyPolicy");
        }
        other => panic!("{other:?}"),
    }
    // A given IPv4 ClusterIP with RequireDualStack gets its IPv6 one.
    let out = run(
        &dual,
        &services(&svc(
            "a",
            "  clusterIP: 10.96.5.5\n  ipFamilyPolicy: RequireDualStack\n",
        )),
    );
    let got = ips(&out, "a");
    assert!(got[0] == "10.96.5.5" && v6(&got[1]), "{got:?}");
    // A family the cluster does not have.
    let out = run(&single, &services(&svc("a", "  ipFamilies: [IPv6]\n")));
    match &out["a"] {
        Outcome::Failed(e) => assert_eq!(e.field, "spec.ipFamilies[0]"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn node_ports_as_the_api_server_allocates_them() {
    let c = config("10.96.0.0/16", "30000-32767");
    let two_ports = "---\napiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: lab}\n\
        spec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n\
        \x20 - {name: a, port: 80}\n  - {name: b, port: 81, nodePort: 30081}\n\
        \x20 - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53, protocol: TCP}\n";
    let out = run(&c, &services(two_ports));
    let s = allocated(&out["np"]);
    let n: Vec<u16> = s.ports.iter().map(|p| p.node_port.unwrap()).collect();
    assert_eq!(n[1], 30081, "a given nodePort is kept");
    assert!(n[0] != 30081 && n[0] != n[2]);
    assert_eq!(
        n[2], n[3],
        "the same port over UDP and TCP shares its nodePort"
    );
    for p in [n[0], n[2]] {
        // Above the static band (min(max(16, 2768/32), 128) = 86 ports).
        assert!((30086..=32767).contains(&p), "{p}");
    }
    // LoadBalancer: nodePorts unless allocateLoadBalancerNodePorts is false; eTP Local
    // gets a healthCheckNodePort.
    let lb = svc(
        "lb",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
    ) + &svc(
        "lb-no-np",
        "  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n",
    );
    let out = run(&c, &services(&lb));
    let s = allocated(&out["lb"]);
    assert!(s.ports[0].node_port.is_some());
    let hc = s.rare.health_check_node_port.unwrap();
    assert_ne!(Some(hc), s.ports[0].node_port);
    assert_eq!(allocated(&out["lb-no-np"]).ports[0].node_port, None);
}

#[test]
fn node_port_exhaustion_names_the_service_and_field() {
    let c = config("10.96.0.0/16", "30000-30001");
    let yaml = svc("a", "  type: NodePort\n  clusterIP: 10.96.0.10\n")
        + &svc("b", "  type: NodePort\n  clusterIP: 10.96.0.11\n")
        + &svc("c", "  type: NodePort\n  clusterIP: 10.96.0.12\n");
    let out = run(&c, &services(&yaml));
    let got: BTreeSet<u16> = ["a", "b"]
        .iter()
        .map(|n| allocated(&out[*n]).ports[0].node_port.unwrap())
        .collect();
    assert_eq!(got, BTreeSet::from([30000, 30001]));
    match &out["c"] {
        Outcome::Failed(e) => {
            let text = e.to_string();
            assert!(
                text.starts_with("Service lab/c: spec.ports[0].nodePort:")
                    && text.contains("30000-30001"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn flag_values_parse_as_kube_apiserver_spells_them() {
    assert_eq!(
        "30000-32767".parse::<NodePortRange>(),
        Ok(DEFAULT_NODE_PORT_RANGE)
    );
    assert_eq!(
        "30000+2767".parse::<NodePortRange>(),
        Ok(DEFAULT_NODE_PORT_RANGE)
    );
    assert!("32767-30000".parse::<NodePortRange>().is_err());
    assert!("0-10".parse::<NodePortRange>().is_err());
    assert!("x".parse::<NodePortRange>().is_err());
    assert_eq!(
        parse_service_cluster_ip_range("10.96.0.0/12, fd00::/108")
            .unwrap()
            .len(),
        2
    );
    for bad in [
        "10.96.0.1/12",
        "10.96.0.0/12,10.100.0.0/16",
        "10.0.0.0/31",
        "",
        "x",
    ] {
        assert!(parse_service_cluster_ip_range(bad).is_err(), "{bad}");
    }
}
