//! Probes: a scenario's expected outcomes as data. One probe is a connection (from,
//! to, protocol) on a node and what must happen to it: answered by which pods (on which
//! target port, with which source seen), rejected or dropped. The traffic cells send the
//! probes through the kernel ([`Env::check`]); `svcplane trace` is checked against the
//! very same probes without a kernel ([`trace_disagreements`]), so trace and traffic
//! agree on shared data, not on copied values.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use svcplane_testkit::{ClusterPlan, EchoReply, Proto, RequestError};

use crate::env::*;

/// Where a probe goes.
#[derive(Debug, Clone, Copy)]
pub enum To {
    /// A Service address of [`crate::env`] (ClusterIP, externalIP, LoadBalancer IP), port.
    Svc(Dual, u16),
    /// A node's own address, port (a NodePort).
    Node(&'static str, u16),
}

/// The source address the answering pod sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The client's own address (not masqueraded).
    Own,
    /// Masqueraded to the probe's node.
    Node,
    /// Its own, except when the pod reaches itself (hairpin): then not its own.
    OwnUnlessHairpin,
    /// Not checked.
    Any,
}

#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// Every pod in `by` answers (and no other), on `port`, seeing `seen`.
    Answered {
        by: &'static [&'static str],
        port: u16,
        seen: Seen,
    },
    /// One pod of `by` answers, the same one every time (ClientIP affinity).
    Sticky { by: &'static [&'static str] },
    /// Refused (ICMP unreachable / TCP reset).
    Rejected,
    /// No answer at all.
    Dropped,
}

/// One connection and what must happen to it.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The node whose rules decide (the probe's proxy); `node-a` unless a scenario
    /// needs another.
    pub node: &'static str,
    /// A pod, a node (its own namespace), `"client"` (the external client) or
    /// `"client-allowed"` (the client from [`ALLOWED_SRC`]).
    pub from: &'static str,
    pub to: To,
    pub proto: Proto,
    pub expect: Expect,
}

/// A probe on node-a over TCP.
pub const fn tcp(from: &'static str, to: To, expect: Expect) -> Probe {
    Probe {
        node: "node-a",
        from,
        to,
        proto: Proto::Tcp,
        expect,
    }
}

/// A probe on node-a over UDP.
pub const fn udp(from: &'static str, to: To, expect: Expect) -> Probe {
    Probe {
        proto: Proto::Udp,
        ..tcp(from, to, expect)
    }
}

impl Probe {
    /// The same probe decided by `node`'s rules.
    pub const fn on(self, node: &'static str) -> Probe {
        Probe { node, ..self }
    }
}

/// Extra manifests a scenario writes before its probes: `(file, yaml)`.
pub type Setup = fn(&dyn Place) -> Vec<(&'static str, String)>;

/// A scenario's probes and the manifests they need beyond the standard ones.
pub struct Probes {
    pub setup: Option<Setup>,
    pub list: &'static [Probe],
}

/// Addresses in a cell's family, from a live cluster ([`Env`]) or from its plan
/// ([`Planned`]): what a [`Setup`] and the probes are resolved with.
pub trait Place {
    fn family(&self) -> Family;
    fn pod_ip(&self, pod: &str) -> IpAddr;
    fn node_ip(&self, node: &str) -> IpAddr;

    /// The cell's family's address of `dual`.
    fn ip(&self, dual: Dual) -> IpAddr {
        dual.get(self.family())
            .parse()
            .unwrap_or_else(|e| panic!("address {dual:?}: {e}"))
    }

    /// The cell's EndpointSlice `addressType`.
    fn address_type(&self) -> &'static str {
        match self.family() {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The external client's own address.
    fn client_ip(&self) -> IpAddr {
        match self.family() {
            Family::V4 => IpAddr::V4(svcplane_testkit::CLIENT_V4),
            Family::V6 => IpAddr::V6(svcplane_testkit::CLIENT_V6),
        }
    }

    /// Where `to` is.
    fn dst(&self, to: To) -> SocketAddr {
        match to {
            To::Svc(dual, port) => SocketAddr::new(self.ip(dual), port),
            To::Node(node, port) => SocketAddr::new(self.node_ip(node), port),
        }
    }

    /// The address a probe from `from` leaves with.
    fn source_ip(&self, from: &str) -> IpAddr {
        match from {
            "client" => self.client_ip(),
            "client-allowed" => self.ip(ALLOWED_SRC),
            node if node.starts_with("node-") => self.node_ip(node),
            pod => self.pod_ip(pod),
        }
    }
}

/// A cell's addresses from the cluster's plan: no namespaces, no root.
pub struct Planned<'a> {
    pub plan: &'a ClusterPlan,
    pub family: Family,
}

impl Place for Planned<'_> {
    fn family(&self) -> Family {
        self.family
    }
    fn pod_ip(&self, pod: &str) -> IpAddr {
        let pod = self.plan.pod(pod).expect("pod");
        match self.family {
            Family::V4 => IpAddr::V4(pod.v4),
            Family::V6 => IpAddr::V6(pod.v6),
        }
    }
    fn node_ip(&self, node: &str) -> IpAddr {
        let node = self.plan.node(node).expect("node");
        match self.family {
            Family::V4 => IpAddr::V4(node.v4),
            Family::V6 => IpAddr::V6(node.v6),
        }
    }
}

impl Env {
    /// Write the probes' manifests (waiting until each answering probe answers), start a
    /// proxy on every other node a probe names, then send every probe through the kernel
    /// and assert its outcome. Probes expecting silence wait out their timeout together.
    pub fn check_all(&self, probes: &Probes) {
        if let Some(setup) = probes.setup {
            for (file, yaml) in setup(self) {
                self.manifests.write(file, &yaml).expect(file);
            }
            for p in probes.list {
                if matches!(p.expect, Expect::Answered { .. } | Expect::Sticky { .. })
                    && p.proto == Proto::Tcp
                {
                    let dst = self.dst(p.to);
                    assert!(self.wait_answering(p.from, dst), "{dst} not programmed");
                }
            }
        }
        let nodes: BTreeSet<&str> = probes
            .list
            .iter()
            .map(|p| p.node)
            .filter(|n| *n != "node-a")
            .collect();
        let _proxies: Vec<_> = nodes.iter().map(|n| self.run_proxy_on(n)).collect();
        let (silent, loud): (Vec<&Probe>, Vec<&Probe>) = probes
            .list
            .iter()
            .partition(|p| matches!(p.expect, Expect::Dropped));
        for p in loud {
            self.check(p);
        }
        std::thread::scope(|scope| {
            for p in silent {
                scope.spawn(move || self.check(p));
            }
        });
    }

    /// Send `probe` and assert what it expects.
    pub fn check(&self, probe: &Probe) {
        let dst = self.dst(probe.to);
        let what = format!("{} {:?} -> {dst}", probe.from, probe.proto);
        // `times` requests in a row: one forked client in eBPF mode.
        let requests = |p: &Probe, times: usize| self.requests(p.from, p.proto, dst, T, times);
        let request = |p: &Probe| requests(p, 1).pop().expect("one outcome");
        let answers = |p: &Probe, times: usize| -> Vec<EchoReply> {
            requests(p, times)
                .into_iter()
                .enumerate()
                .map(|(i, reply)| {
                    let reply = reply.unwrap_or_else(|e| panic!("{what}, request {i}: {e}"));
                    svcplane_testkit::parse_echo(&reply).expect("echo reply")
                })
                .collect()
        };
        let own = self.source_ip(probe.from);
        match probe.expect {
            Expect::Answered { by, port, seen } => {
                let replies = if by.len() > 1 && probe.proto == Proto::Tcp {
                    self.spread(probe.from, dst, by)
                } else {
                    // One endpoint: every try must reach it.
                    let tries = if by.len() == 1 { STICKY_TRIES } else { 1 };
                    let want: BTreeSet<IpAddr> = by.iter().map(|p| self.pod_ip(p)).collect();
                    let replies = answers(probe, tries);
                    for r in &replies {
                        assert!(want.contains(&r.pod), "{what}: answered by {r:?}");
                    }
                    replies
                };
                for r in replies {
                    assert_eq!(r.port, port, "{what}: {r:?}");
                    match seen {
                        Seen::Own => assert_eq!(r.peer.ip(), own, "{what}: {r:?}"),
                        Seen::Node => {
                            assert_eq!(r.peer.ip(), self.node_ip(probe.node), "{what}: {r:?}")
                        }
                        Seen::OwnUnlessHairpin if r.pod == own => {
                            assert_ne!(r.peer.ip(), own, "{what}: hairpin not masqueraded: {r:?}")
                        }
                        Seen::OwnUnlessHairpin => assert_eq!(r.peer.ip(), own, "{what}: {r:?}"),
                        Seen::Any => {}
                    }
                }
            }
            Expect::Sticky { by } => {
                let want: BTreeSet<IpAddr> = by.iter().map(|p| self.pod_ip(p)).collect();
                let replies = answers(probe, STICKY_TRIES + 1);
                let first = replies[0].pod;
                assert!(want.contains(&first), "{what}: answered by {first}");
                for r in &replies[1..] {
                    assert_eq!(r.pod, first, "{what}: not sticky");
                }
            }
            Expect::Rejected => {
                let got = request(probe);
                assert!(matches!(got, Err(RequestError::Refused)), "{what}: {got:?}");
            }
            Expect::Dropped => {
                let got = request(probe);
                assert!(matches!(got, Err(RequestError::Timeout)), "{what}: {got:?}");
            }
        }
    }
}

/// `svcplane trace --json` on `manifests` for `probe` in `mode`: where it disagrees with
/// the probe's expectation, why.
pub fn trace_disagreement(
    place: &dyn Place,
    manifests: &std::path::Path,
    mode: &str,
    probe: &Probe,
) -> Option<String> {
    let dst = place.dst(probe.to);
    let from = place.source_ip(probe.from);
    let proto = match probe.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let args = [
        "trace".to_string(),
        "--json".into(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--node".into(),
        probe.node.into(),
        "--cluster-cidr".into(),
        svcplane_testkit::CLUSTER_CIDR.into(),
        "--proxy-mode".into(),
        mode.into(),
        "--to".into(),
        dst.to_string(),
        "--from".into(),
        from.to_string(),
        "--proto".into(),
        proto.into(),
    ];
    let what = format!("svcplane {}", args.join(" "));
    // Bounded, so a stuck trace fails the test instead of hanging it.
    let out = match std::process::Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_svcplane"))
        .args(&args)
        .output()
    {
        Ok(out) => out,
        Err(e) => return Some(format!("{what}: {e}")),
    };
    if !out.status.success() {
        return Some(format!(
            "{what}: failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let report: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => return Some(format!("{what}: not JSON: {e}")),
    };
    let t = &report["traces"][0];
    let outcome = t["outcome"].as_str().unwrap_or("?");
    let endpoints: BTreeSet<SocketAddr> = t["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some(SocketAddr::new(
                e["ip"].as_str()?.parse().ok()?,
                u16::try_from(e["port"].as_u64()?).ok()?,
            ))
        })
        .collect();
    let masq = t["masquerade"].as_str().unwrap_or("?");
    let hairpin = t["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["hairpin"] == true);
    let disagree = |why: String| {
        Some(format!(
            "{what}: {why}; the probe: {probe:?}; trace:\n{t:#}"
        ))
    };
    match probe.expect {
        Expect::Answered { by, port, seen } => {
            let want: BTreeSet<SocketAddr> = by
                .iter()
                .map(|p| SocketAddr::new(place.pod_ip(p), port))
                .collect();
            if outcome != "forward" || endpoints != want {
                return disagree(format!("expected {want:?} to answer"));
            }
            let ok = match seen {
                Seen::Own => masq == "no" && !hairpin,
                // The node's own connection keeps the node's address unmasqueraded
                // (eBPF mode connects its socket straight to the endpoint).
                Seen::Node => masq == "yes" || (masq == "no" && t["source"] == "node"),
                Seen::OwnUnlessHairpin => masq == "no" && hairpin,
                Seen::Any => true,
            };
            if !ok {
                return disagree(format!("expected the source seen as {seen:?}"));
            }
        }
        Expect::Sticky { by } => {
            let want: BTreeSet<IpAddr> = by.iter().map(|p| place.pod_ip(p)).collect();
            let got: BTreeSet<IpAddr> = endpoints.iter().map(|e| e.ip()).collect();
            if outcome != "forward" || got != want || t["affinitySeconds"].is_null() {
                return disagree(format!("expected ClientIP affinity over {want:?}"));
            }
        }
        Expect::Rejected if outcome != "reject" => {
            return disagree("expected REJECT".into());
        }
        Expect::Dropped if outcome != "drop" => return disagree("expected DROP".into()),
        Expect::Rejected | Expect::Dropped => {}
    }
    None
}
