//! The netlink encoder against nft itself (root, scratch namespaces): every construct
//! the full render uses is applied as nft text in one namespace and as a netlink batch
//! in another, and `nft list table` must print exactly the same in both.

use std::net::IpAddr;

use ipnet::IpNet;
use svcplane_model::Protocol;
use svcplane_testkit::{Netns, run_checked, skip_unless_root};

use super::netlink::{
    Batch, Elem, Expr, Field, Hook, Key, Op, SetData, SetSpec, Socket, Verdict, exprs, family_code,
    intervals,
};

/// One transaction: the nft script and the same as operations.
struct Step {
    text: String,
    ops: Vec<Op>,
}

/// A table built in one or more transactions.
struct Case {
    name: &'static str,
    v6: bool,
    steps: Vec<Step>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test network")
}

fn nft(ns: &Netns, args: &[&str]) -> String {
    let out = run_checked(&mut ns.command("nft", args)).expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds a case's text and operations side by side.
struct Writer {
    v6: bool,
    family: u8,
    /// `<family> <table>`.
    t: String,
    text: String,
    ops: Vec<Op>,
}

impl Writer {
    fn new(v6: bool, table: &str) -> Writer {
        let fam = if v6 { "ip6" } else { "ip" };
        Writer {
            v6,
            family: family_code(v6),
            t: format!("{fam} {table}"),
            text: String::new(),
            ops: Vec::new(),
        }
    }

    /// `x`: `ip` or `ip6`, in templates.
    fn x(&self) -> &'static str {
        if self.v6 { "ip6" } else { "ip" }
    }

    fn line(&mut self, text: &str, op: Op) {
        self.text.push_str(text);
        self.text.push('\n');
        self.ops.push(op);
    }

    fn set(&mut self, text: &str, spec: SetSpec) {
        let word = if spec.data.is_some() { "map" } else { "set" };
        let t = format!("add {word} {} {} {{ {text} }}", self.t, spec.name);
        let family = self.family;
        self.line(&t, Op::AddSet { family, spec });
    }

    fn elements(&mut self, set: &str, text: &str, elems: Vec<Elem>) {
        let t = format!("add element {} {set} {{ {text} }}", self.t);
        let family = self.family;
        self.line(
            &t,
            Op::AddElements {
                family,
                set: set.to_owned(),
                elems,
            },
        );
    }

    fn chain(&mut self, name: &str) {
        let t = format!("add chain {} {name}", self.t);
        let family = self.family;
        self.line(
            &t,
            Op::AddChain {
                family,
                chain: name.to_owned(),
            },
        );
    }

    fn rule(&mut self, chain: &str, text: &str, exprs: Vec<Expr>) {
        let t = format!("add rule {} {chain} {text}", self.t);
        let family = self.family;
        self.line(
            &t,
            Op::AddRule {
                family,
                chain: chain.to_owned(),
                exprs,
            },
        );
    }

    fn commented(&mut self, chain: &str, text: &str, exprs: Vec<Expr>, comment: &str) {
        let t = format!("add rule {} {chain} {text} comment \"{comment}\"", self.t);
        let family = self.family;
        self.line(
            &t,
            Op::AddCommentedRule {
                family,
                chain: chain.to_owned(),
                exprs,
                comment: comment.to_owned(),
            },
        );
    }

    fn step(&mut self) -> Step {
        Step {
            text: std::mem::take(&mut self.text),
            ops: std::mem::take(&mut self.ops),
        }
    }
}

fn cat<const N: usize>(parts: [Vec<Expr>; N]) -> Vec<Expr> {
    parts.into_iter().flatten().collect()
}

fn v(e: impl IntoIterator<Item = Expr>) -> Vec<Expr> {
    e.into_iter().collect()
}

fn table_case(v6: bool) -> Case {
    let mut w = Writer::new(v6, "o-table");
    let family = w.family;
    let t = w.t.clone();
    w.line(
        &format!("add table {t} {{ comment \"rules for svcplane\" ; }}"),
        Op::AddTable {
            family,
            comment: Some("rules for svcplane".into()),
        },
    );
    let hooks = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", 0),
        ("filter-forward", "filter", "forward", 0),
        ("filter-output", "filter", "output", 0),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    for (name, kind, hook, priority) in hooks {
        w.line(
            &format!(
                "add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; policy accept ; }}"
            ),
            Op::AddBaseChain {
                family,
                chain: name.to_owned(),
                kind,
                hook: Hook::named(hook).expect("hook"),
                priority,
            },
        );
    }
    w.chain("services");
    w.chain("services-x");
    let first = w.step();
    // A second transaction over the first, as a full sync replaces a table: the
    // table again (no comment change), flush it, flush a set, re-add.
    w.set(
        "type ipv4_addr ; comment \"x\" ;",
        SetSpec {
            comment: Some("x".into()),
            ..SetSpec::new("s", vec![Field::Addr { v6: false }])
        },
    );
    w.elements("s", "10.0.0.1, 10.0.0.2", {
        let k = |a: &str| Elem::key(Key::default().ip(&ip(a)));
        vec![k("10.0.0.1"), k("10.0.0.2")]
    });
    w.rule("services", "return", vec![exprs::verdict(Verdict::Return)]);
    let second = w.step();
    w.line(
        &format!("add table {t} {{ comment \"rules for svcplane\" ; }}"),
        Op::AddTable {
            family,
            comment: Some("rules for svcplane".into()),
        },
    );
    w.line(&format!("flush table {t}"), Op::FlushTable { family });
    w.line(
        &format!("flush set {t} s"),
        Op::FlushSet {
            family,
            set: "s".into(),
        },
    );
    w.elements(
        "s",
        "10.0.0.3",
        vec![Elem::key(Key::default().ip(&ip("10.0.0.3")))],
    );
    w.rule(
        "services",
        "jump services-x",
        vec![exprs::verdict(Verdict::Jump("services-x".into()))],
    );
    let third = w.step();
    Case {
        name: "table, base chains, flush table/set",
        v6,
        steps: vec![first, second, third],
    }
}

fn sets_case(v6: bool) -> Case {
    let mut w = Writer::new(v6, "o-sets");
    let family = w.family;
    let t = w.t.clone();
    w.line(
        &format!("add table {t}"),
        Op::AddTable {
            family,
            comment: None,
        },
    );
    let at = if v6 { "ipv6_addr" } else { "ipv4_addr" };
    let x = w.x();
    let a = |v4: &str, v6s: &str| if v6 { ip(v6s) } else { ip(v4) };
    let n = |v4: &str, v6s: &str| if v6 { net(v6s) } else { net(v4) };
    let addr = Field::Addr { v6 };
    w.chain("target");

    w.set(
        &format!("type {at} ; comment \"Active ClusterIPs\" ;"),
        SetSpec {
            comment: Some("Active ClusterIPs".into()),
            ..SetSpec::new("cluster-ips", vec![addr])
        },
    );
    let (c1, c2) = (a("10.96.0.1", "fd00:96::1"), a("10.96.0.2", "fd00:96::2"));
    w.elements("cluster-ips", &format!("{c1}, {c2}"), {
        vec![
            Elem::key(Key::default().ip(&c1)),
            Elem::key(Key::default().ip(&c2)),
        ]
    });

    w.set(
        &format!("type {at} ; flags interval ; comment \"IPs that accept NodePort traffic\" ;"),
        SetSpec {
            interval: true,
            comment: Some("IPs that accept NodePort traffic".into()),
            ..SetSpec::new("nodeport-ips", vec![addr])
        },
    );
    // Adjacent ranges that do not merge into one prefix, a host, the last range.
    let nets = [
        n("10.0.1.0/24", "fd00:1::/64"),
        n("10.0.2.0/24", "fd00:2::/64"),
        n("192.168.1.1/32", "fd01::1/128"),
        n("224.0.0.0/3", "ff00::/8"),
    ];
    let text = nets.map(|n| n.to_string()).join(", ");
    w.elements("nodeport-ips", &text, intervals(&nets, false));

    w.set(
        &format!("type {at} . {at} ; comment \"endpoint . itself, for hairpin masquerade\" ;"),
        SetSpec {
            comment: Some("endpoint . itself, for hairpin masquerade".into()),
            ..SetSpec::new("hairpin", vec![addr, addr])
        },
    );
    let e1 = a("10.244.0.1", "fd00:244::1");
    w.elements(
        "hairpin",
        &format!("{e1} . {e1}"),
        vec![Elem::key(Key::default().ip(&e1).ip(&e1))],
    );

    w.set(
        &format!(
            "type {at} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ;"
        ),
        SetSpec {
            data: Some(SetData::Verdict),
            comment: Some("ClusterIP, ExternalIP and LoadBalancer IP traffic".into()),
            ..SetSpec::new("service-ips", vec![addr, Field::Proto, Field::Service])
        },
    );
    w.elements(
        "service-ips",
        &format!(
            "{c1} . tcp . 80 : goto target, {c2} . udp . 53 : drop, {c2} . sctp . 9 : jump target"
        ),
        vec![
            Elem::verdict(
                Key::default().ip(&c1).proto(Protocol::Tcp).port(80),
                Verdict::Goto("target".into()),
            ),
            Elem::verdict(
                Key::default().ip(&c2).proto(Protocol::Udp).port(53),
                Verdict::Drop,
            ),
            Elem::verdict(
                Key::default().ip(&c2).proto(Protocol::Sctp).port(9),
                Verdict::Jump("target".into()),
            ),
        ],
    );

    w.set(
        "type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ;",
        SetSpec {
            data: Some(SetData::Verdict),
            comment: Some("NodePort traffic".into()),
            ..SetSpec::new("service-nodeports", vec![Field::Proto, Field::Service])
        },
    );
    w.elements(
        "service-nodeports",
        "tcp . 30000 : goto target",
        vec![Elem::verdict(
            Key::default().proto(Protocol::Tcp).port(30000),
            Verdict::Goto("target".into()),
        )],
    );

    // The concatenated endpoint maps (`typeof`), one per transport protocol.
    for (p, word) in [
        (Some(Protocol::Tcp), "tcp"),
        (Some(Protocol::Udp), "udp"),
        (Some(Protocol::Sctp), "sctp"),
        (None, "th"),
    ] {
        let daddr = Field::TypeofAddr { v6, source: false };
        let name = format!("endpoints-{word}");
        let comment = (word == "th").then(|| "any transport".to_owned());
        let ctext = comment
            .as_ref()
            .map(|c| format!(" comment \"{c}\" ;"))
            .unwrap_or_default();
        w.set(
            &format!(
                "typeof {x} daddr . {word} dport . numgen random mod 1 : {x} daddr . {word} dport ;{ctext}"
            ),
            SetSpec {
                data: Some(SetData::Fields(vec![daddr, Field::TypeofDport(p)])),
                comment,
                ..SetSpec::new(
                    &name,
                    vec![daddr, Field::TypeofDport(p), Field::TypeofNumgen],
                )
            },
        );
        let (e2, e3) = (
            a("10.244.0.2", "fd00:244::2"),
            a("10.244.0.3", "fd00:244::3"),
        );
        w.elements(
            &name,
            &format!("{c1} . 80 . 0 : {e2} . 8080, {c1} . 80 . 1 : {e3} . 8080"),
            vec![
                Elem::value(
                    Key::default().ip(&c1).port(80).bucket(0),
                    Key::default().ip(&e2).port(8080),
                ),
                Elem::value(
                    Key::default().ip(&c1).port(80).bucket(1),
                    Key::default().ip(&e3).port(8080),
                ),
            ],
        );
    }

    // A NodePort's endpoint maps: keyed by the port alone.
    for (p, word) in [
        (Some(Protocol::Tcp), "tcp"),
        (Some(Protocol::Udp), "udp"),
        (Some(Protocol::Sctp), "sctp"),
    ] {
        let daddr = Field::TypeofAddr { v6, source: false };
        let name = format!("nodeport-endpoints-{word}");
        w.set(
            &format!(
                "typeof {word} dport . numgen random mod 1 : {x} daddr . {word} dport ; comment \"node port . bucket : endpoint\" ;"
            ),
            SetSpec {
                data: Some(SetData::Fields(vec![daddr, Field::TypeofDport(p)])),
                comment: Some("node port . bucket : endpoint".to_owned()),
                ..SetSpec::new(&name, vec![Field::TypeofDport(p), Field::TypeofNumgen])
            },
        );
        let (e2, e3) = (
            a("10.244.0.2", "fd00:244::2"),
            a("10.244.0.3", "fd00:244::3"),
        );
        w.elements(
            &name,
            &format!("30080 . 0 : {e2} . 8080, 30080 . 1 : {e3} . 9090"),
            vec![
                Elem::value(
                    Key::default().port(30080).bucket(0),
                    Key::default().ip(&e2).port(8080),
                ),
                Elem::value(
                    Key::default().port(30080).bucket(1),
                    Key::default().ip(&e3).port(9090),
                ),
            ],
        );
    }

    w.set(
        &format!("type {at} ; flags dynamic,timeout ; timeout 600s ;"),
        SetSpec {
            timeout_secs: Some(600),
            ..SetSpec::new("affinity-a", vec![addr])
        },
    );
    w.set(
        &format!("typeof {x} saddr ; flags dynamic,timeout ; timeout 10800s ;"),
        SetSpec {
            timeout_secs: Some(10800),
            ..SetSpec::new("affinity-b", vec![Field::TypeofAddr { v6, source: true }])
        },
    );
    Case {
        name: "sets, maps and elements",
        v6,
        steps: vec![w.step()],
    }
}

fn rules_case(v6: bool) -> Case {
    let mut w = Writer::new(v6, "o-rules");
    let family = w.family;
    let t = w.t.clone();
    w.line(
        &format!("add table {t}"),
        Op::AddTable {
            family,
            comment: None,
        },
    );
    let x = w.x();
    let at = if v6 { "ipv6_addr" } else { "ipv4_addr" };
    let a = |v4: &str, v6s: &str| if v6 { ip(v6s) } else { ip(v4) };
    let n = |v4: &str, v6s: &str| if v6 { net(v6s) } else { net(v4) };
    let addr = Field::Addr { v6 };
    for name in ["c", "t"] {
        w.chain(name);
    }
    // The sets the rules name.
    w.set(
        &format!("type {at} ;"),
        SetSpec::new("cluster-ips", vec![addr]),
    );
    w.set(
        &format!("type {at} ; flags interval ;"),
        SetSpec {
            interval: true,
            ..SetSpec::new("nodeport-ips", vec![addr])
        },
    );
    w.set(
        &format!("type {at} . {at} ;"),
        SetSpec::new("hairpin", vec![addr, addr]),
    );
    w.set(
        &format!("type {at} . inet_proto . inet_service : verdict ;"),
        SetSpec {
            data: Some(SetData::Verdict),
            ..SetSpec::new("service-ips", vec![addr, Field::Proto, Field::Service])
        },
    );
    w.set(
        "type inet_proto . inet_service : verdict ;",
        SetSpec {
            data: Some(SetData::Verdict),
            ..SetSpec::new("service-nodeports", vec![Field::Proto, Field::Service])
        },
    );
    w.set(
        &format!("type {at} ; flags dynamic,timeout ; timeout 600s ;"),
        SetSpec {
            timeout_secs: Some(600),
            ..SetSpec::new("affinity", vec![addr])
        },
    );
    for (p, word) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
        let daddr = Field::TypeofAddr { v6, source: false };
        let dport = Field::TypeofDport(Some(p));
        w.set(
            &format!(
                "typeof {x} daddr . {word} dport . numgen random mod 1 : {x} daddr . {word} dport ;"
            ),
            SetSpec {
                data: Some(SetData::Fields(vec![daddr, dport])),
                ..SetSpec::new(
                    format!("endpoints-{word}"),
                    vec![daddr, dport, Field::TypeofNumgen],
                )
            },
        );
        w.set(
            &format!("typeof {word} dport . numgen random mod 1 : {x} daddr . {word} dport ;"),
            SetSpec {
                data: Some(SetData::Fields(vec![daddr, dport])),
                ..SetSpec::new(
                    format!("nodeport-endpoints-{word}"),
                    vec![dport, Field::TypeofNumgen],
                )
            },
        );
    }
    let jump = |c: &str| vec![exprs::verdict(Verdict::Jump(c.into()))];
    let goto = |c: &str| vec![exprs::verdict(Verdict::Goto(c.into()))];
    let loopback = if v6 {
        net("::1/128")
    } else {
        net("127.0.0.0/8")
    };

    w.rule(
        "c",
        "ct state new jump t",
        cat([v(exprs::ct_state_new()), jump("t")]),
    );
    w.rule(
        "c",
        &format!("{x} daddr . meta l4proto . th dport vmap @service-ips"),
        exprs::service_vmap(v6, true, "service-ips"),
    );
    w.rule(
        "c",
        &format!(
            "fib daddr type local {x} daddr != {loopback} meta l4proto . th dport vmap @service-nodeports"
        ),
        cat([
            v(exprs::fib_local(false)),
            exprs::net_match(false, &loopback, true).expect("prefix"),
            exprs::service_vmap(v6, false, "service-nodeports"),
        ]),
    );
    w.rule(
        "c",
        &format!(
            "{x} daddr @nodeport-ips fib daddr type local {x} daddr != {loopback} meta l4proto . th dport vmap @service-nodeports"
        ),
        cat([
            v(exprs::addr_in_set(false, v6, "nodeport-ips", false)),
            v(exprs::fib_local(false)),
            exprs::net_match(false, &loopback, true).expect("prefix"),
            exprs::service_vmap(v6, false, "service-nodeports"),
        ]),
    );
    w.rule(
        "c",
        "meta mark set meta mark or 0x00004000",
        v(exprs::mark_set(0x4000, false)),
    );
    w.rule(
        "c",
        &format!("ct status dnat {x} saddr . {x} daddr @hairpin jump t"),
        cat([
            v(exprs::ct_status_dnat()),
            v(exprs::saddr_daddr_in_set(v6, "hairpin")),
            jump("t"),
        ]),
    );
    w.rule(
        "c",
        "meta mark & 0x00004000 == 0 return",
        cat([
            v(exprs::mark_clear(0x4000)),
            vec![exprs::verdict(Verdict::Return)],
        ]),
    );
    w.rule(
        "c",
        "meta mark set meta mark xor 0x00004000",
        v(exprs::mark_set(0x4000, true)),
    );
    w.rule(
        "c",
        "masquerade fully-random",
        vec![Expr::Masquerade { fully_random: true }],
    );
    w.rule(
        "c",
        "masquerade",
        vec![Expr::Masquerade {
            fully_random: false,
        }],
    );
    w.rule("c", "reject", vec![exprs::reject(v6)]);
    let icmp = if v6 { "icmpv6" } else { "icmp" };
    w.rule(
        "c",
        &format!("reject with {icmp} type admin-prohibited"),
        vec![Expr::Reject {
            code: if v6 { 1 } else { 13 },
        }],
    );
    w.commented(
        "c",
        &format!("{x} daddr @cluster-ips reject"),
        cat([
            v(exprs::addr_in_set(false, v6, "cluster-ips", false)),
            vec![exprs::reject(v6)],
        ]),
        "Reject traffic to invalid ports of ClusterIPs",
    );
    w.rule(
        "c",
        &format!("{x} daddr != @cluster-ips return"),
        cat([
            v(exprs::addr_in_set(false, v6, "cluster-ips", true)),
            vec![exprs::verdict(Verdict::Return)],
        ]),
    );
    w.rule(
        "c",
        &format!("update @affinity {{ {x} saddr }}"),
        v(exprs::update_saddr(v6, "affinity")),
    );
    w.rule(
        "c",
        &format!("{x} saddr @affinity goto t"),
        cat([
            v(exprs::addr_in_set(true, v6, "affinity", false)),
            goto("t"),
        ]),
    );
    let ep = a("10.244.0.1", "fd00:244::1");
    let ep_text = if v6 {
        format!("[{ep}]:8080")
    } else {
        format!("{ep}:8080")
    };
    w.rule(
        "c",
        &format!("meta l4proto tcp dnat to {ep_text}"),
        cat([
            v(exprs::l4proto(Protocol::Tcp)),
            v(exprs::dnat_to(&ep, 8080)),
        ]),
    );
    w.rule(
        "c",
        "numgen random mod 3 vmap { 0 : goto t, 1 : jump t, 2 : drop }",
        v(exprs::numgen_vmap(vec![
            Verdict::Goto("t".into()),
            Verdict::Jump("t".into()),
            Verdict::Drop,
        ])),
    );
    for (p, word) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
        w.rule(
            "c",
            &format!(
                "meta l4proto {word} dnat {x} to {x} daddr . th dport . numgen random mod 3 map @endpoints-{word}"
            ),
            exprs::dnat_map(v6, true, Some(p), 3, &format!("endpoints-{word}")),
        );
    }
    // As the render writes it: `tcp dport` brings the `meta l4proto tcp` dependency.
    w.rule(
        "c",
        &format!("dnat {x} to {x} daddr . tcp dport . numgen random mod 16 map @endpoints-tcp"),
        exprs::dnat_map(v6, true, Some(Protocol::Tcp), 16, "endpoints-tcp"),
    );
    // A NodePort's: keyed by the port alone.
    for (p, word) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
        w.rule(
            "c",
            &format!(
                "dnat {x} to {word} dport . numgen random mod 5 map @nodeport-endpoints-{word}"
            ),
            exprs::dnat_map(v6, false, Some(p), 5, &format!("nodeport-endpoints-{word}")),
        );
    }
    let pods = [n("10.244.0.0/16", "fd00:244::/48")];
    let two = [
        n("10.0.0.0/8", "fd00::/64"),
        n("192.168.0.0/16", "fd01::/64"),
    ];
    let nets_text = |nets: &[IpNet]| {
        let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        if nets.len() == 1 {
            list.join("")
        } else {
            format!("{{ {} }}", list.join(", "))
        }
    };
    for nets in [&pods[..], &two[..]] {
        w.commented(
            "c",
            &format!("{x} saddr {} goto t", nets_text(nets)),
            cat([
                exprs::nets_match(true, v6, nets, false).expect("nets"),
                goto("t"),
            ]),
            "short-circuit pod traffic",
        );
        w.rule(
            "c",
            &format!("{x} saddr != {} drop", nets_text(nets)),
            cat([
                exprs::nets_match(true, v6, nets, true).expect("nets"),
                vec![exprs::verdict(Verdict::Drop)],
            ]),
        );
    }
    w.commented(
        "c",
        "fib saddr type local jump t",
        cat([v(exprs::fib_local(true)), jump("t")]),
        "masquerade local traffic",
    );
    w.commented(
        "c",
        "fib saddr type local drop",
        cat([
            v(exprs::fib_local(true)),
            vec![exprs::verdict(Verdict::Drop)],
        ]),
        "short-circuit local traffic",
    );
    let cip = a("10.96.0.1", "fd00:96::1");
    for (p, word, from) in [
        (Protocol::Tcp, "tcp", n("10.244.0.0/16", "fd00:244::/48")),
        (Protocol::Udp, "udp", n("10.128.0.0/9", "fd00:240::/44")),
    ] {
        w.rule(
            "c",
            &format!("{x} daddr {cip} {word} dport 53 {x} saddr != {from} jump t"),
            cat([
                v(exprs::addr_eq(false, &cip)),
                v(exprs::dport(p, 53)),
                exprs::net_match(true, &from, true).expect("prefix"),
                jump("t"),
            ]),
        );
    }
    w.rule("c", "jump t", jump("t"));
    w.rule("c", "goto t", goto("t"));
    w.rule("c", "drop", vec![exprs::verdict(Verdict::Drop)]);
    Case {
        name: "rules",
        v6,
        steps: vec![w.step()],
    }
}

/// Apply one step through netlink in `ns`.
fn commit(socket: &mut Socket, table: &str, ops: &[Op]) -> Result<(), String> {
    let mut batch: Batch = socket.batch();
    for op in ops {
        batch.op(table, op);
    }
    socket.commit(batch).map_err(|e| e.to_string())
}

fn table_of(case: &Case) -> &'static str {
    match case.name {
        "rules" => "o-rules",
        "sets, maps and elements" => "o-sets",
        _ => "o-table",
    }
}

#[test]
fn netlink_batches_list_as_the_same_nft_text() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let text_ns = Netns::new("nlo-text").expect("netns");
    let nl_ns = Netns::new("nlo-nl").expect("netns");
    let mut socket = Socket::open(Some(nl_ns.name())).expect("netlink socket");
    let mut failures = Vec::new();
    for v6 in [false, true] {
        for case in [table_case(v6), sets_case(v6), rules_case(v6)] {
            let table = table_of(&case);
            let fam = if case.v6 { "ip6" } else { "ip" };
            for (i, step) in case.steps.iter().enumerate() {
                let out = text_ns
                    .run_with_input("nft", &["-f", "-"], &step.text)
                    .expect("nft");
                assert!(
                    out.status.success(),
                    "{fam} {}: nft refused step {i}: {}\n{}",
                    case.name,
                    String::from_utf8_lossy(&out.stderr),
                    step.text
                );
                if let Err(e) = commit(&mut socket, table, &step.ops) {
                    failures.push(format!("{fam} {}: step {i} refused: {e}", case.name));
                    socket = Socket::open(Some(nl_ns.name())).expect("netlink socket");
                }
            }
            let want = nft(&text_ns, &["list", "table", fam, table]);
            let got = run_checked(&mut nl_ns.command("nft", &["list", "table", fam, table]))
                .map_or_else(
                    |e| e.to_string(),
                    |o| String::from_utf8_lossy(&o.stdout).into_owned(),
                );
            if want != got {
                let diff: Vec<String> = want
                    .lines()
                    .zip(got.lines().chain(std::iter::repeat("<missing>")))
                    .filter(|(w, g)| w != g)
                    .map(|(w, g)| format!("  nft:     {w}\n  netlink: {g}"))
                    .collect();
                failures.push(format!(
                    "{fam} {}: listings differ ({} vs {} lines)\n{}",
                    case.name,
                    want.lines().count(),
                    got.lines().count(),
                    diff.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_refused_batch_is_an_error_and_changes_nothing() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nlo-refused").expect("netns");
    let mut socket = Socket::open(Some(ns.name())).expect("netlink socket");
    let family = family_code(false);
    let ok = [
        Op::AddTable {
            family,
            comment: None,
        },
        Op::AddChain {
            family,
            chain: "c".into(),
        },
    ];
    commit(&mut socket, "t", &ok).expect("valid batch");
    // A rule jumping to a chain that does not exist fails the whole batch.
    let bad = [
        Op::AddChain {
            family,
            chain: "d".into(),
        },
        Op::AddRule {
            family,
            chain: "c".into(),
            exprs: vec![exprs::verdict(Verdict::Jump("missing".into()))],
        },
        Op::AddChain {
            family,
            chain: "e".into(),
        },
    ];
    let err = commit(&mut socket, "t", &bad).expect_err("refused");
    assert!(err.contains("refused"), "{err}");
    let listing = nft(&ns, &["list", "table", "ip", "t"]);
    assert!(!listing.contains("chain d"), "{listing}");
    // The socket stays usable after a refusal.
    commit(
        &mut socket,
        "t",
        &[Op::AddChain {
            family,
            chain: "f".into(),
        }],
    )
    .expect("valid batch after a refused one");
    assert!(nft(&ns, &["list", "table", "ip", "t"]).contains("chain f"));
}

/// A listing with each `elements = { … }` list sorted: a hash set lists its elements
/// in an order of its own (seeded per set), the only thing two equal tables may print
/// differently.
fn canonical(listing: &str) -> String {
    let mut out = String::new();
    let mut lines = listing.lines();
    while let Some(line) = lines.next() {
        let Some((head, rest)) = line.split_once("elements = { ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let mut body = rest.to_owned();
        while !body.trim_end().ends_with('}') {
            let Some(next) = lines.next() else { break };
            body.push(' ');
            body.push_str(next.trim());
        }
        let body = body.trim_end().trim_end_matches('}').trim_end();
        let mut items: Vec<&str> = body.split(',').map(str::trim).collect();
        items.sort_unstable();
        out.push_str(&format!("{head}elements = {{ {} }}\n", items.join(", ")));
    }
    out
}

#[test]
fn canonical_listings_sort_elements_only() {
    let a =
        "\tset s {\n\t\telements = { b, a,\n\t\t\t     c }\n\t}\n\tchain x {\n\t\tb\n\t\ta\n\t}\n";
    assert_eq!(
        canonical(a),
        "\tset s {\n\t\telements = { a, b, c }\n\t}\n\tchain x {\n\t\tb\n\t\ta\n\t}\n"
    );
}

/// Full syncs through the backend: one over netlink, one through nft, state after
/// state (every service kind, both families, both layouts, a table replaced in place);
/// both namespaces must list the same tables after each.
#[test]
fn full_syncs_over_netlink_list_as_the_text_full_sync() {
    use std::sync::Arc;

    use svcplane_proxy::{ClusterIpMasquerade, Dataplane, Diff};

    use super::NftablesBackend;
    use super::golden::fixture;
    use super::render::Layout;

    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let mut masq_all = fixture(0);
    masq_all.v4.cluster_ip_masquerade = ClusterIpMasquerade::All;
    masq_all.v6.cluster_ip_masquerade = ClusterIpMasquerade::None;
    let states = [fixture(0), fixture(1), fixture(2), masq_all, fixture(0)];
    let mut failures = Vec::new();
    for layout in [Layout::FULL, Layout::NORTH_SOUTH] {
        let nl_ns = Netns::new("nlo-full-nl").expect("netns");
        let text_ns = Netns::new("nlo-full-text").expect("netns");
        let mut nl = NftablesBackend::in_netns(nl_ns.name()).with_layout(layout);
        let mut text = NftablesBackend::in_netns(text_ns.name())
            .with_layout(layout)
            .with_netlink(false);
        for (i, st) in states.iter().enumerate() {
            let st = Arc::new(st.clone());
            let diff = Diff::between(None, &st, true);
            let a = nl.sync(&st, &diff).expect("netlink full sync");
            let b = text.sync(&st, &diff).expect("text full sync");
            assert!(a.full && b.full);
            for fam in ["ip", "ip6"] {
                let want = canonical(&nft(&text_ns, &["list", "table", fam, layout.table]));
                let got = canonical(&nft(&nl_ns, &["list", "table", fam, layout.table]));
                if want != got {
                    let diff: Vec<String> = want
                        .lines()
                        .zip(got.lines().chain(std::iter::repeat("<missing>")))
                        .filter(|(w, g)| w != g)
                        .take(10)
                        .map(|(w, g)| format!("  nft:     {w}\n  netlink: {g}"))
                        .collect();
                    failures.push(format!(
                        "{} state {i} {fam}: listings differ\n{}",
                        layout.table,
                        diff.join("\n")
                    ));
                }
            }
        }
        assert_eq!(
            nl.netlink_fulls(),
            states.len() as u64,
            "every full sync went over netlink"
        );
        assert_eq!(text.netlink_fulls(), 0);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
