#!/usr/bin/env bash
# Where the proxy's bytes go after its first full sync (docs/nftables-scale.md, issue 15).
#
#   scripts/proxy-heap.sh [--plain] [SERVICES] [SVCPLANE_BINARY]   (root; heaptrack, curl, gdb)
#
# Writes SERVICES ClusterIP Services × 10 endpoints as one manifests file (the layout of
# `svcplane bench sync`), runs `svcplane proxy --proxy-mode nftables` on it under heaptrack
# in a scratch network namespace, waits for /healthz (= first sync done), prints
# /proc/PID/smaps_rollup, then SIGKILLs the proxy: every allocation heaptrack still holds is
# then what was live after the first sync ("leaked" in heaptrack_print's words). Printed: the
# live bytes and the peak bytes, each summed by the innermost svcplane function that allocated
# them (scripts/heaptrack-by-frame.py).
# --plain: no heaptrack; RSS after the first sync, then again after the proxy was made to call
# malloc_trim(0) (gdb): the difference is heap glibc keeps after the parse's peak was freed;
# and glibc's own totals (malloc_stats) before and after.
set -euo pipefail
plain=
if [[ ${1:-} == --plain ]]; then plain=1; shift; fi
n=${1:-10000}
bin=${2:-${CARGO_TARGET_DIR:-target}/debug/svcplane}
work=$(mktemp -d /tmp/proxy-heap.XXXXXX)
ns=heap-$$
cleanup() {
    [[ -n ${pid:-} ]] && kill -9 "$pid" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work/m"
}
trap cleanup EXIT
mkdir -p "$work/m"
python3 - "$n" "$work/m/services.yaml" <<'PY'
import ipaddress, sys
n, E = int(sys.argv[1]), 10
ip = lambda x: str(ipaddress.IPv4Address(x))
with open(sys.argv[2], "w") as f:
    for i in range(n):
        s = "svc-%d" % i
        f.write("---\napiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: bench}\n"
                "spec: {clusterIP: %s, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}\n"
                % (s, ip(0x0a600001 + i)))
        f.write("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                "metadata: {name: %s-1, namespace: bench, labels: {kubernetes.io/service-name: %s}}\n"
                "addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n" % (s, s))
        for e in range(E):
            f.write('  - {addresses: ["%s"], conditions: {ready: true}}\n' % ip(0x0a800000 + i * E + e))
PY
ip netns add "$ns"
ip -n "$ns" link set lo up
wrap=(heaptrack -o "$work/heap")
[[ -n $plain ]] && wrap=()
ip netns exec "$ns" "${wrap[@]}" "$bin" proxy --proxy-mode nftables \
    --hostname-override heap-node --cluster-cidr 10.128.0.0/9 --min-sync-period 0s \
    --sync-period 1h --metrics-bind-address 127.0.0.1:10249 \
    --healthz-bind-address 127.0.0.1:10256 --manifests "$work/m" >"$work/proxy.log" 2>&1 &
hpid=$!
start=$(date +%s)
# Under heaptrack the proxy is heaptrack's child; bounded wait for it and for its first sync.
for _ in $(seq 1200); do
    pid=$(pgrep -P "$hpid" -x svcplane || true)
    # Without heaptrack, `ip netns exec` execs the proxy itself.
    [[ -n $plain ]] && pid=$hpid
    [[ -n $pid ]] && break
    sleep 0.5
done
[[ -n ${pid:-} ]] || { echo "proxy did not start"; cat "$work/proxy.log"; exit 1; }
for _ in $(seq 1200); do
    ip netns exec "$ns" curl -s -m 1 -o /dev/null -w '%{http_code}' http://127.0.0.1:10256/healthz 2>/dev/null | grep -q 200 && break
    kill -0 "$pid" 2>/dev/null || { echo "proxy exited"; cat "$work/proxy.log"; exit 1; }
    sleep 0.5
done
echo "== first sync done after $(( $(date +%s) - start )) s$([[ -n $plain ]] || echo " (under heaptrack)")"
sleep 2
grep -E '^(Rss|Pss_Anon|Pss_File|Anonymous)' "/proc/$pid/smaps_rollup"
ip netns exec "$ns" curl -s -m 2 http://127.0.0.1:10249/metrics | grep -E '^kubeproxy_sync_full_proxy_rules_duration_seconds_sum' || true
if [[ -n $plain ]]; then
    # malloc_stats() writes to the proxy's stderr (its log): per arena, what glibc holds
    # from the kernel ("system bytes") and what is allocated ("in use bytes", headers
    # included), then the same after the trim.
    timeout 120 gdb -p "$pid" -batch -ex 'call (void) malloc_stats()' \
        -ex 'call (int) malloc_trim(0)' -ex 'call (void) malloc_stats()' >/dev/null 2>&1 ||
        echo "(gdb failed)"
    echo "== after malloc_trim(0):"
    grep -E '^(Rss|Anonymous)' "/proc/$pid/smaps_rollup"
    echo "== glibc's malloc_stats() before and after the trim (totals):"
    grep -E '^(Total \(incl. mmap\):|system bytes|in use bytes|max mmap)' "$work/proxy.log" | grep -A2 '^Total' || true
    echo "== threads: $(ls /proc/$pid/task | wc -l)"
    exit 0
fi
kill -9 "$pid"
wait "$hpid" 2>/dev/null || true
pid=
f=$(ls "$work"/heap*)
echo "== heaptrack data: $f ($(du -h "$f" | cut -f1))"
heaptrack_print -f "$f" -p 0 -a 0 -T 0 2>/dev/null | grep -E '^(calls to|peak heap|total memory leaked)'
here=$(dirname "$0")
for cost in leaked peak; do
    heaptrack_print -f "$f" -p 0 -a 0 -T 0 -F "$work/$cost.stacks" --flamegraph-cost-type "$cost" >/dev/null 2>&1
    what=$([[ $cost == leaked ]] && echo "live after the first sync" || echo "at the heap's peak")
    echo "== bytes $what, by innermost svcplane function:"
    python3 "$here/heaptrack-by-frame.py" "$work/$cost.stacks" 15
    rm -f "$work/$cost.stacks"
done
echo "== (heaptrack data kept in $f for heaptrack_gui/heaptrack_print; delete it when done)"
