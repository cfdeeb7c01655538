#!/usr/bin/env bash
# `make lab`: the main job on the bundled example.
# For now: render the example's nftables rules as node-a would program them, show the
# invalid object being reported, and (as root) have the kernel check the script in a
# scratch network namespace. The nftables-mode issue turns this into a live virtual cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/debug/svcplane
cargo build -q -p svcplane
out=$(mktemp -d)
trap 'rm -rf "$out"; [ -n "${ns:-}" ] && ip netns del "$ns" 2>/dev/null || true' EXIT

echo "== svcplane render --proxy-mode nftables (node-a) on examples/cluster"
"$bin" render --proxy-mode nftables --manifests examples/cluster \
  --hostname-override node-a --cluster-cidr 10.244.0.0/16,fd00:244::/32 \
  >"$out/rules.nft" 2>"$out/stderr"
echo "-- reported on stderr:"
sed 's/^/   /' "$out/stderr"
echo "-- script: $(wc -l <"$out/rules.nft") lines. How a packet to a ClusterIP is dispatched (IPv4):"
awk '/^add element ip svcplane service-ips/,/^}/' "$out/rules.nft" | sed 's/^/   /'
echo "-- and the demo/web service: pick an endpoint at random, DNAT to it:"
awk '/chain .*demo\/web\/tcp\/http/{p=1} p{print} p&&/^\t}/{p=0}' "$out/rules.nft" | head -16 | sed 's/^/   /'
echo "   (the whole script: $bin render --manifests examples/cluster --hostname-override node-a ...)"

if [ "$(id -u)" -eq 0 ] && command -v nft >/dev/null; then
  ns="svcplane-lab-$$"
  ip netns add "$ns"
  if ip netns exec "$ns" nft -c -f - <"$out/rules.nft"; then
    echo "== the kernel accepts the script (nft -c -f - in scratch netns $ns)"
  else
    echo "== the kernel REJECTED the script" >&2
    exit 1
  fi
else
  echo "== (not root or no nft: skipping the kernel check)"
fi
