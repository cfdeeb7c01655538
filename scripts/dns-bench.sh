#!/usr/bin/env bash
# dnsperf against `svcplane dns` with N ClusterIP services (default 10000), in-cluster names.
# Usage: scripts/dns-bench.sh [N] [SECONDS]   (needs dnsperf; builds the release binary)
set -euo pipefail
n=${1:-10000}
secs=${2:-15}
port=5353
cd "$(dirname "$0")/.."
command -v dnsperf >/dev/null || { echo "dns-bench: dnsperf is not installed (apt-get install dnsperf)" >&2; exit 1; }
cargo build --release -p svcplane >&2
bin=${CARGO_TARGET_DIR:-target}/release/svcplane
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/manifests"
# N services over 100 namespaces; the query file asks A for each (a tenth AAAA, NXDOMAIN, SRV).
awk -v n="$n" 'BEGIN {
  for (i = 0; i < n; i++) {
    printf "---\napiVersion: v1\nkind: Service\nmetadata: {name: svc-%d, namespace: ns-%d}\nspec:\n  clusterIP: 10.%d.%d.%d\n  ports: [{name: http, port: 80}]\n", i, i % 100, 96 + int(i / 65536), int(i / 256) % 256, i % 256
  }
}' > "$work/manifests/services.yaml"
awk -v n="$n" 'BEGIN {
  for (i = 0; i < n; i++) {
    name = sprintf("svc-%d.ns-%d.svc.cluster.local", i, i % 100)
    if (i % 10 == 1) print name " AAAA"
    else if (i % 10 == 2) print "nope-" name " A"
    else if (i % 10 == 3) print "_http._tcp." name " SRV"
    else print name " A"
  }
}' > "$work/queries"
"$bin" dns --manifests "$work/manifests" --listen 127.0.0.1:$port >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  dig +short @127.0.0.1 -p $port "svc-$((n - 1)).ns-$(((n - 1) % 100)).svc.cluster.local" | grep -q . && break
  sleep 0.1
done
dnsperf -s 127.0.0.1 -p $port -d "$work/queries" -l "$secs" -c 20 -T 2 -q "${DNSPERF_OUTSTANDING:-200}" -S 5
