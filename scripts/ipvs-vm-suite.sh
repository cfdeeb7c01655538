#!/usr/bin/env bash
# Runs inside the VM of scripts/test-ipvs.sh (as PID 1's child, root, Debian's kernel):
#   ipvs-vm-suite.sh CLUSTER_TEST_BINARY TRAFFIC_TEST_BINARY TRAFFIC_FILTER [IPVS_TEST_BINARY
#                    [SVCPLANE LAB_MANIFESTS]]
# Prints a result line per step and exits non-zero when any step failed.
set -u
cluster_bin="$1" traffic_bin="$2" filter="$3" ipvs_bin="${4:-}"
svcplane_bin="${5:-}" lab_manifests="${6:-}"
results=()
failed=0
step() { echo; echo "=== ipvs-vm step: $1"; }
record() { # NAME RC
  if [ "$2" -eq 0 ]; then results+=("ok     $1"); else results+=("FAILED $1 (exit $2)"); failed=1; fi
}

step "seed check: IPVS loads and ipvsadm -L -n lists exactly what was programmed"
seed_check() {
  set -e
  modprobe ip_vs
  ip link add ipvs-seed type dummy
  ip addr add 10.96.0.1/32 dev ipvs-seed
  # IPVS refuses a real server it has no route to: give it one.
  ip addr add 10.244.0.1/24 dev ipvs-seed
  ip link set ipvs-seed up
  ipvsadm -A -t 10.96.0.1:80 -s rr
  ipvsadm -a -t 10.96.0.1:80 -r 10.244.0.2:8080 -m -w 1
  ipvsadm -A -u 10.96.0.1:53 -s sh
  local got want
  got="$(ipvsadm -L -n | tail -n +4)"
  want="TCP  10.96.0.1:80 rr
  -> 10.244.0.2:8080              Masq    1      0          0         
UDP  10.96.0.1:53 sh"
  ipvsadm -L -n
  ipvsadm -C
  ip link del ipvs-seed
  [ -z "$(ipvsadm -L -n | tail -n +4)" ] || { echo "ipvsadm -C left virtual servers"; return 1; }
  [ "$got" = "$want" ] || { printf 'ipvsadm -L -n: got\n%s\nwant\n%s\n' "$got" "$want"; return 1; }
}
(seed_check)
record "seed check (ipvsadm -L -n)" $?

step "test kit: $cluster_bin"
"$cluster_bin"
record "test kit's cluster tests" $?

step "traffic tests matching '$filter': $traffic_bin"
"$traffic_bin" "$filter" 2>&1 | tee /tmp/traffic.log
rc=${PIPESTATUS[0]}
# A filter that matches nothing would pass while testing nothing.
if [ "$rc" -eq 0 ] && ! grep -q '^running [1-9]' /tmp/traffic.log; then
  echo "no traffic test matches '$filter'"
  rc=1
fi
record "traffic tests matching '$filter' ($(grep -o '[0-9]* passed; [0-9]* failed' /tmp/traffic.log | tail -1))" "$rc"

if [ -n "$ipvs_bin" ]; then
  step "svcplane's IPVS mode: $ipvs_bin"
  # SKIP lines mean the kernel lacks IPVS: here that is a failure, not a pass.
  "$ipvs_bin" --test-threads=1 2>&1 | tee /tmp/ipvs.log
  rc=${PIPESTATUS[0]}
  if grep -q '^SKIP ipvs/' /tmp/ipvs.log; then rc=1; fi
  record "svcplane --proxy-mode ipvs ($(grep -o '[0-9]* passed; [0-9]* failed' /tmp/ipvs.log | tail -1))" "$rc"
fi

if [ -n "$svcplane_bin" ] && [ -n "$lab_manifests" ]; then
  step "svcplane lab --proxy-mode ipvs: the DNS → VIP → Pod walk"
  # `ip netns exec` bind-mounts a namespace's resolv.conf over this file: it must exist.
  [ -e /etc/resolv.conf ] || : > /etc/resolv.conf
  "$svcplane_bin" lab --manifests "$lab_manifests" --proxy-mode ipvs
  record "svcplane lab --proxy-mode ipvs" $?
fi

echo
echo "=== ipvs-vm results"
printf '%s\n' "${results[@]}"
exit "$failed"
