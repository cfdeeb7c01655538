//! Filter chains: traffic to services without endpoints (the no-endpoint maps' drop or
//! reject), to unknown ports of a ClusterIP, and LoadBalancerSourceRanges (the
//! firewall-check chain and each service's firewall chain).

use svcplane_model::IpFamily;
use svcplane_proxy::{EmptyVerdict, ServicePortState};

use super::super::names;
use super::super::rule::{Chain, Rule};
use super::elements::Verdict;
use super::{
    CLUSTER_IPS, CLUSTER_IPS_CHECK, FIREWALL_CHECK, FIREWALL_IPS, NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES, NODEPORT_ENDPOINTS_CHECK, NODEPORT_IPS, REJECT_CHAIN,
    SERVICE_ENDPOINTS_CHECK, family_nets,
};
use svcplane_proxy::DataplaneError;

/// `reject-chain`: the target of a no-endpoint reject (`reject` is not allowed in a
/// verdict map's data).
pub(super) fn reject_chain() -> Chain {
    Chain::new(REJECT_CHAIN, vec![Rule::Reject])
}

pub(super) fn service_endpoints_check(family: IpFamily) -> Chain {
    Chain::new(
        SERVICE_ENDPOINTS_CHECK,
        vec![Rule::AddrPortVmap {
            family,
            map: NO_ENDPOINT_SERVICES,
        }],
    )
}

pub(super) fn nodeport_endpoints_check(family: IpFamily, all_local: bool) -> Chain {
    Chain::new(
        NODEPORT_ENDPOINTS_CHECK,
        vec![Rule::NodePortVmap {
            family,
            daddr_in: (!all_local).then_some(NODEPORT_IPS),
            fib_local: false,
            not_loopback: all_local,
            map: NO_ENDPOINT_NODEPORTS,
        }],
    )
}

pub(super) fn cluster_ips_check(family: IpFamily) -> Chain {
    Chain::new(
        CLUSTER_IPS_CHECK,
        vec![Rule::RejectDaddrIn {
            family,
            set: CLUSTER_IPS,
            comment: "Reject traffic to invalid ports of ClusterIPs",
        }],
    )
}

pub(super) fn firewall_check(family: IpFamily) -> Chain {
    Chain::new(
        FIREWALL_CHECK,
        vec![Rule::AddrPortVmap {
            family,
            map: FIREWALL_IPS,
        }],
    )
}

/// The verdict of a target without endpoints.
pub(super) fn no_endpoint_verdict(v: EmptyVerdict) -> Verdict {
    match v {
        EmptyVerdict::Reject => Verdict::Reject,
        EmptyVerdict::Drop => Verdict::Drop,
    }
}

/// The service's firewall chain (LoadBalancerSourceRanges of this family, as
/// kube-proxy filters them), when it has LoadBalancer IPs and source ranges.
pub(super) fn firewall_chain(
    family: IpFamily,
    svc: &ServicePortState,
    base: &str,
) -> Result<Option<Chain>, DataplaneError> {
    let allowed = family_nets(family, &svc.load_balancer_source_ranges);
    if svc.load_balancer_ips.is_empty() || allowed.is_empty() {
        return Ok(None);
    }
    Ok(Some(Chain::new(
        names::join(names::FIREWALL_PREFIX, base)?,
        vec![Rule::DropUnlessFrom {
            family,
            nets: allowed,
        }],
    )))
}
