//! kube-proxy's flags that svcplane does not act on, so that a kube-proxy command
//! line (or a DaemonSet's args) works unchanged: each is accepted and warned about at
//! startup by name, mapped when svcplane has the equivalent, or refused when ignoring
//! it would silently change what the node does.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use svcplane_dataplane::ProxyMode;

use crate::config::check_detect_local_mode;
use crate::duration::parse_go_duration;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Treatment {
    /// Accepted; a warning says it is ignored, and why.
    Ignored(&'static str),
    /// Refused at startup, with the reason.
    Rejected(&'static str),
    /// kube-proxy's per-mode sync periods: used as --sync-period / --min-sync-period
    /// under kube-proxy's rule (iptables-* unless the mode is ipvs, ipvs-* in ipvs mode).
    SyncPeriod { min: bool, ipvs: bool },
    /// ClusterCIDR is what svcplane does; other modes are refused.
    DetectLocalMode,
}

use Treatment::*;

struct Flag {
    name: &'static str,
    /// `--flag`, `--flag=false`: a boolean with an optional value, as pflag's.
    boolean: bool,
    treatment: Treatment,
}

const fn flag(name: &'static str, treatment: Treatment) -> Flag {
    Flag {
        name,
        boolean: false,
        treatment,
    }
}

const fn bool_flag(name: &'static str, treatment: Treatment) -> Flag {
    Flag {
        name,
        boolean: true,
        treatment,
    }
}

const CONNTRACK: Treatment =
    Ignored("svcplane leaves the node's conntrack sysctls as they are; set them on the node");

const FLAGS: &[Flag] = &[
    flag(
        "bind-address",
        Ignored("svcplane takes the node's IPs from its Node object"),
    ),
    bool_flag(
        "bind-address-hard-fail",
        Ignored("svcplane always fails when it cannot bind"),
    ),
    flag(
        "config-sync-period",
        Ignored("svcplane's sources push changes as they happen"),
    ),
    flag("conntrack-max-per-core", CONNTRACK),
    flag("conntrack-min", CONNTRACK),
    flag("conntrack-tcp-timeout-established", CONNTRACK),
    flag("conntrack-tcp-timeout-close-wait", CONNTRACK),
    bool_flag("conntrack-tcp-be-liberal", CONNTRACK),
    flag("conntrack-udp-timeout", CONNTRACK),
    flag("conntrack-udp-timeout-stream", CONNTRACK),
    flag("detect-local-mode", DetectLocalMode),
    flag(
        "pod-bridge-interface",
        Ignored("only used by --detect-local-mode BridgeInterface"),
    ),
    flag(
        "pod-interface-name-prefix",
        Ignored("only used by --detect-local-mode InterfaceNamePrefix"),
    ),
    flag(
        "feature-gates",
        Ignored("svcplane has no kube-proxy feature gates"),
    ),
    flag(
        "iptables-masquerade-bit",
        Ignored("svcplane's nftables mode uses its own mark"),
    ),
    bool_flag(
        "iptables-localhost-nodeports",
        Ignored("svcplane never serves NodePorts on localhost"),
    ),
    flag(
        "iptables-sync-period",
        SyncPeriod {
            min: false,
            ipvs: false,
        },
    ),
    flag(
        "iptables-min-sync-period",
        SyncPeriod {
            min: true,
            ipvs: false,
        },
    ),
    flag(
        "ipvs-sync-period",
        SyncPeriod {
            min: false,
            ipvs: true,
        },
    ),
    flag(
        "ipvs-min-sync-period",
        SyncPeriod {
            min: true,
            ipvs: true,
        },
    ),
    flag(
        "oom-score-adj",
        Ignored("give the pod a priority class instead, e.g. system-node-critical"),
    ),
    bool_flag("profiling", Ignored("svcplane serves no /debug/pprof")),
    flag(
        "proxy-port-range",
        Ignored("unused since kube-proxy's userspace mode was removed"),
    ),
    flag(
        "show-hidden-metrics-for-version",
        Ignored("svcplane has no hidden metrics"),
    ),
    flag(
        "kube-api-content-type",
        Ignored("svcplane's API client chooses its content type"),
    ),
    flag(
        "logging-format",
        Ignored("svcplane logs text to stderr; -v sets the level"),
    ),
    flag(
        "log-flush-frequency",
        Ignored("svcplane writes log lines unbuffered"),
    ),
    flag("vmodule", Ignored("use RUST_LOG for per-module levels")),
    bool_flag(
        "init-only",
        Rejected(
            "svcplane has no separate privileged initialisation step; ignoring it would start the proxy instead of exiting",
        ),
    ),
    flag(
        "write-config-to",
        Rejected(
            "svcplane cannot write kube-proxy's default configuration; ignoring it would start the proxy instead",
        ),
    ),
    flag(
        "healthz-port",
        Rejected("deprecated in kube-proxy; use --healthz-bind-address IP:PORT"),
    ),
    flag(
        "metrics-port",
        Rejected("deprecated in kube-proxy; use --metrics-bind-address IP:PORT"),
    ),
];

/// The kube-proxy compatibility flags given on the command line, in table order.
#[derive(Debug, Clone, Default)]
pub struct KubeProxyFlags {
    given: Vec<(&'static str, String)>,
}

/// What the compatibility flags amount to.
#[derive(Debug, Default, PartialEq)]
pub struct Resolved {
    pub warnings: Vec<String>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
}

impl KubeProxyFlags {
    /// Applies kube-proxy's rules for `mode`; errors name the flag.
    pub fn resolve(&self, mode: ProxyMode) -> Result<Resolved> {
        let mut out = Resolved::default();
        for (name, value) in &self.given {
            let Some(flag) = FLAGS.iter().find(|f| f.name == *name) else {
                continue;
            };
            match flag.treatment {
                Ignored(why) => out.warnings.push(format!(
                    "--{name}: kube-proxy flag accepted but ignored by svcplane ({why})"
                )),
                Rejected(why) => bail!("--{name}: not supported by svcplane: {why}"),
                DetectLocalMode => {
                    check_detect_local_mode(value).with_context(|| format!("--{name}"))?
                }
                SyncPeriod { min, ipvs } => {
                    let d = parse_go_duration(value)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("--{name}"))?;
                    if ipvs != (mode == ProxyMode::Ipvs) {
                        out.warnings.push(format!(
                            "--{name}: ignored in {mode} mode, as kube-proxy ignores it"
                        ));
                    } else if min {
                        out.min_sync_period = Some(d);
                    } else {
                        out.sync_period = Some(d);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl FromArgMatches for KubeProxyFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = KubeProxyFlags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for flag in FLAGS {
            if let Some(value) = matches.get_one::<String>(flag.name) {
                self.given.retain(|(n, _)| *n != flag.name);
                self.given.push((flag.name, value.clone()));
            }
        }
        Ok(())
    }
}

impl Args for KubeProxyFlags {
    fn augment_args(cmd: Command) -> Command {
        let args = FLAGS.iter().map(|flag| {
            let help = match flag.treatment {
                Ignored(why) => format!("kube-proxy's; ignored with a warning: {why}"),
                Rejected(why) => format!("kube-proxy's; refused: {why}"),
                SyncPeriod { min: true, .. } => {
                    "kube-proxy's; --min-sync-period when the mode matches".into()
                }
                SyncPeriod { min: false, .. } => {
                    "kube-proxy's; --sync-period when the mode matches".into()
                }
                DetectLocalMode => "kube-proxy's; only ClusterCIDR is supported".into(),
            };
            let arg = Arg::new(flag.name)
                .long(flag.name)
                .help(help)
                .hide_short_help(true)
                .help_heading("kube-proxy compatibility");
            if flag.boolean {
                arg.value_name("BOOL")
                    .num_args(0..=1)
                    .default_missing_value("true")
            } else {
                arg.value_name("VALUE")
                    .num_args(1)
                    .allow_negative_numbers(true)
            }
        });
        cmd.args(args)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        flags: KubeProxyFlags,
    }

    fn resolve(args: &[&str], mode: ProxyMode) -> Result<Resolved> {
        let parsed = T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))?;
        parsed.flags.resolve(mode)
    }

    #[test]
    fn ignored_flags_warn_by_name() {
        let r = resolve(
            &[
                "--conntrack-max-per-core=0",
                "--oom-score-adj",
                "-999",
                "--profiling",
                "--feature-gates=A=true",
            ],
            ProxyMode::Nftables,
        )
        .unwrap();
        let names: Vec<&str> = r
            .warnings
            .iter()
            .filter_map(|w| w.split(':').next())
            .collect();
        assert_eq!(
            names,
            [
                "--conntrack-max-per-core",
                "--feature-gates",
                "--oom-score-adj",
                "--profiling"
            ]
        );
        assert!(r.warnings.iter().all(|w| w.contains("ignored")));
    }

    #[test]
    fn sync_periods_follow_kube_proxys_mode_rule() {
        let r = resolve(
            &[
                "--iptables-sync-period=45s",
                "--iptables-min-sync-period=2s",
                "--ipvs-sync-period=5s",
            ],
            ProxyMode::Nftables,
        )
        .unwrap();
        assert_eq!(r.sync_period, Some(Duration::from_secs(45)));
        assert_eq!(r.min_sync_period, Some(Duration::from_secs(2)));
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].starts_with("--ipvs-sync-period: ignored in nftables mode"));
        let ipvs = resolve(&["--ipvs-sync-period=5s"], ProxyMode::Ipvs).unwrap();
        assert_eq!(ipvs.sync_period, Some(Duration::from_secs(5)));
        let bad = resolve(&["--iptables-sync-period=soon"], ProxyMode::Nftables).unwrap_err();
        assert!(format!("{bad:#}").contains("--iptables-sync-period"));
    }

    #[test]
    fn flags_that_would_change_behaviour_are_refused() {
        for args in [
            &["--init-only"][..],
            &["--write-config-to", "/tmp/x"],
            &["--healthz-port=10256"],
            &["--detect-local-mode=NodeCIDR"],
        ] {
            let err = resolve(args, ProxyMode::Nftables).expect_err("refused");
            let name = args[0].split('=').next().unwrap_or_default();
            assert!(format!("{err:#}").contains(name), "{err:#}");
        }
        let ok = resolve(&["--detect-local-mode", "ClusterCIDR"], ProxyMode::Nftables).unwrap();
        assert!(ok.warnings.is_empty());
    }

    #[test]
    fn boolean_flags_take_an_optional_value() {
        let r = resolve(
            &["--iptables-localhost-nodeports=false", "--profiling"],
            ProxyMode::Nftables,
        )
        .unwrap();
        assert_eq!(r.warnings.len(), 2);
    }
}
