//! v1 Node → [`Node`].

use k8s_openapi::api::core::v1 as k8s;

use super::{NameRule, cluster_scoped};
use crate::error::{Converted, InvalidObject};
use crate::types::{Kind, Node};

/// Label with the Node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Validate and convert a Node: its name, labels and the InternalIP addresses
/// followed by the ExternalIP ones (Hostname and other types are skipped). An
/// address that is not an IP is ignored with a warning: the Node's zone and its
/// other addresses stay usable.
pub fn node_from_k8s(n: &k8s::Node) -> Result<Converted<Node>, InvalidObject> {
    let (name, ctx) = cluster_scoped(Kind::Node, &n.metadata, NameRule::Dns1123Subdomain)?;
    let labels = ctx.labels("metadata.labels", n.metadata.labels.as_ref())?;
    let node_addresses: &[k8s::NodeAddress] = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for wanted in ["InternalIP", "ExternalIP"] {
        for (i, a) in node_addresses.iter().enumerate() {
            if a.type_ == wanted {
                addresses
                    .extend(ctx.ip_or_warn(format!("status.addresses[{i}].address"), &a.address));
            }
        }
    }
    let zone = labels.get(ZONE_LABEL).cloned();
    Ok(ctx.finish(Node {
        name,
        zone,
        addresses,
        labels,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::convert::test_util::meta;

    fn node(addresses: &[(&str, &str)]) -> k8s::Node {
        k8s::Node {
            metadata: meta(None, "node-1"),
            spec: None,
            status: Some(k8s::NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| k8s::NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn internal_then_external_skipping_hostnames() {
        let n = node_from_k8s(&node(&[
            ("ExternalIP", "203.0.113.5"),
            ("Hostname", "node-1"),
            ("InternalIP", "192.168.1.10"),
            ("InternalIP", "fd00::10"),
        ]))
        .unwrap();
        assert!(n.warnings.is_empty());
        let n = n.object;
        assert_eq!(n.name, "node-1");
        let want: Vec<std::net::IpAddr> = ["192.168.1.10", "fd00::10", "203.0.113.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(n.addresses, want);
        assert_eq!(n.zone, None);
    }

    /// A bad address costs only itself: the Node's zone and other addresses stay.
    #[test]
    fn bad_address_is_ignored() {
        let n = node_from_k8s(&node(&[
            ("Hostname", "x"),
            ("InternalIP", "node-1"),
            ("InternalIP", "192.168.001.010"),
        ]))
        .unwrap();
        assert_eq!(
            n.object.addresses,
            vec!["192.168.1.10".parse::<std::net::IpAddr>().unwrap()]
        );
        let warnings: Vec<String> = n.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "Node node-1: status.addresses[1].address: invalid value \"node-1\": must be a valid IP address"
            ]
        );
    }

    #[test]
    fn zone_and_name() {
        let mut k = node(&[]);
        k.metadata.labels = Some(BTreeMap::from([(ZONE_LABEL.into(), "zone-a".into())]));
        let n = node_from_k8s(&k).unwrap().object;
        assert_eq!(n.zone.as_deref(), Some("zone-a"));
        assert!(n.addresses.is_empty());
        k.metadata.name = Some("Node-1".into());
        assert_eq!(node_from_k8s(&k).unwrap_err().field, "metadata.name");
    }
}
