#!/usr/bin/env python3
"""Issue 15: what each candidate endpoint-selection shape costs nft 1.0.6 and the kernel, at full
load and per endpoint change (docs/nftables-scale.md, "Endpoint selection shapes").

  scripts/nft-endpoint-shapes.py [--services 1000,10000] [--rounds 3] [--changes 5] [SHAPE...]

(root; needs nft, strace, ip). Per round, per N, per shape (interleaved, so a loaded machine
hits every shape alike): a fresh network namespace, one `nft -f` of the full table (timed, and
traced with `strace -f -T -e sendmsg`: the time inside sendmsg is the kernel's, as nfnetlink
processes a batch synchronously), then CHANGES one-endpoint changes of different services, each
one `nft -f` of a tiny script, timed the same way:
  swap  one endpoint replaced by another (the endpoint count stays 10)
  grow  one endpoint added (10 -> 11: the modulus changes)
Printed: medians over rounds (full) and over rounds × changes (swap/grow), wall and kernel.

SHAPE (N ClusterIP services × 10 endpoints; every set and map named, hairpin masquerade via one
`saddr . daddr` set where there are no endpoint chains):
  flat    today's: `numgen random mod (k-i) == 0 dnat to ep` rules in the service chain
  vmap    kube-proxy's: endpoint chains, `numgen random mod N vmap @svc-eps-S` (one named
          verdict map per service; kube-proxy inlines it anonymously, see `vmapanon`)
  vmapanon kube-proxy's exact shape, anonymous `vmap { ... }` (slow at 10k: 1k only by default)
  svcmap  one named data map per service: `dnat ip to numgen random mod N map @svc-eps-S`
  concat  one map for all services (kubernetes PR #140362): `dnat ip addr . port to
          ip daddr . tcp dport . numgen random mod N map @endpoints-tcp`
  concatk concat, but the dnat rule lives once per endpoint count N in a shared chain
          `endpoints-mod-N` and a service chain ends in `goto endpoints-mod-N`: the map is
          bound by a handful of rules instead of one per service
  concatpre concat with the map's elements added before the rules that bind it
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

E = 10
SHAPES = ["flat", "vmap", "vmapanon", "svcmap", "concat", "concatk", "concatpre"]
MAX_K = 16  # concatk: shared endpoints-mod-N chains for N = 1..MAX_K
ENDPOINT_CHAINS = ("vmap", "vmapanon")
TIMEOUT = 900  # seconds for any one nft run: nothing here waits without a deadline


def ip(k):
    return "10.%d.%d.%d" % (128 + (k >> 16), (k >> 8) & 255, k & 255)


def vip(s):
    return "10.96.%d.%d" % (s >> 8, s & 255)


def endpoints(s):
    return [ip(s * E + i) for i in range(E)]


def new_endpoint(s, j):
    # Above every service's own addresses (10.128.0.0/9 holds 50k × 10 from 10.128.0.0).
    return ip(0x70_0000 + s * 16 + j)


def svc_rules(shape, s, eps):
    """The service chain's rules after its masquerade rule (as `add rule` bodies)."""
    n = len(eps)
    if shape == "flat":
        out = ["numgen random mod %d == 0 meta l4proto tcp dnat to %s:8080" % (n - i, a)
               for i, a in enumerate(eps[:-1])]
        return out + ["meta l4proto tcp dnat to %s:8080" % eps[-1]]
    if shape == "vmap":
        return ["numgen random mod %d vmap @svc-eps-%d" % (n, s)]
    if shape == "vmapanon":
        return ["numgen random mod %d vmap { %s }" % (
            n, ", ".join("%d : goto ep-%d-%s" % (i, s, a.replace(".", "-")) for i, a in enumerate(eps)))]
    if shape == "svcmap":
        return ["meta l4proto tcp dnat ip to numgen random mod %d map @svc-eps-%d" % (n, s)]
    if shape in ("concat", "concatpre"):
        return [concat_rule(n)]
    if shape == "concatk":
        return ["goto endpoints-mod-%d" % n]
    raise SystemExit("unknown shape " + shape)


def concat_rule(n):
    return ("meta l4proto tcp dnat ip addr . port to ip daddr . tcp dport . numgen random mod %d "
            "map @endpoints-tcp" % n)


def ep_chain(s, a):
    c = "ep-%d-%s" % (s, a.replace(".", "-"))
    return c, ["add chain ip t %s" % c,
               "add rule ip t %s ip saddr %s jump mark-for-masquerade" % (c, a),
               "add rule ip t %s meta l4proto tcp dnat to %s:8080" % (c, a)]


def elements(shape, s, eps, idx=None):
    """(map, element) pairs that select `eps` (only the ones at positions `idx`)."""
    idx = range(len(eps)) if idx is None else idx
    if shape == "vmap":
        return [("svc-eps-%d" % s, "%d : goto %s" % (i, ep_chain(s, eps[i])[0])) for i in idx]
    if shape == "svcmap":
        return [("svc-eps-%d" % s, "%d : %s . 8080" % (i, eps[i])) for i in idx]
    if shape.startswith("concat"):
        return [("endpoints-tcp", "%s . 80 . %d : %s . 8080" % (vip(s), i, eps[i])) for i in idx]
    return []


def add_elements(pairs, verb="add"):
    by_map = {}
    for m, e in pairs:
        by_map.setdefault(m, []).append(e)
    return ["%s element ip t %s { %s }" % (verb, m, ", ".join(es)) for m, es in by_map.items()]


def full_script(shape, n):
    o = ["add table ip t",
         "add map ip t service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }",
         "add chain ip t mark-for-masquerade",
         "add rule ip t mark-for-masquerade meta mark set meta mark or 0x4000",
         "add chain ip t services { type nat hook prerouting priority -100 ; }",
         "add rule ip t services ip daddr . meta l4proto . th dport vmap @service-ips",
         "add chain ip t nat-postrouting { type nat hook postrouting priority 100 ; }"]
    if shape not in ENDPOINT_CHAINS:
        o += ["add set ip t hairpin { type ipv4_addr . ipv4_addr ; }",
              "add rule ip t nat-postrouting ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade"]
    o += ["add rule ip t nat-postrouting meta mark & 0x4000 == 0 return",
          "add rule ip t nat-postrouting masquerade fully-random"]
    if shape.startswith("concat"):
        o.append("add map ip t endpoints-tcp { typeof ip daddr . tcp dport . numgen random mod 1 : "
                 "ip daddr . tcp dport ; }")
    if shape == "concatk":
        for k in range(1, MAX_K + 1):
            o += ["add chain ip t endpoints-mod-%d" % k, "add rule ip t endpoints-mod-%d %s" % (k, concat_rule(k))]
    if shape == "concatpre":
        o += add_elements([e for s in range(n) for e in elements(shape, s, endpoints(s))])
    elems, svc_elems, hairpin = [], [], []
    for s in range(n):
        eps = endpoints(s)
        if shape == "vmap":
            o.append("add map ip t svc-eps-%d { typeof numgen random mod 1 : verdict ; }" % s)
        if shape == "svcmap":
            o.append("add map ip t svc-eps-%d { typeof numgen random mod 1 : ip daddr . tcp dport ; }" % s)
        if shape in ENDPOINT_CHAINS:
            for a in eps:
                o += ep_chain(s, a)[1]
        else:
            hairpin += ["%s . %s" % (a, a) for a in eps]
        elems += elements(shape, s, eps)
        o.append("add chain ip t service-%d" % s)
        o.append("add rule ip t service-%d ip daddr %s tcp dport 80 ip saddr != 10.128.0.0/9 "
                 "jump mark-for-masquerade" % (s, vip(s)))
        o += ["add rule ip t service-%d %s" % (s, r) for r in svc_rules(shape, s, eps)]
        svc_elems.append("%s . tcp . 80 : goto service-%d" % (vip(s), s))
    # Elements after every rule that references their map, as a render would order them
    # (concatpre: before, above).
    if shape != "concatpre":
        o += add_elements(elems)
    o.append("add element ip t service-ips { %s }" % ", ".join(svc_elems))
    if hairpin:
        o.append("add element ip t hairpin { %s }" % ", ".join(hairpin))
    return "\n".join(o) + "\n"


def rewrite_service_chain(shape, s, eps):
    return (["flush chain ip t service-%d" % s,
             "add rule ip t service-%d ip daddr %s tcp dport 80 ip saddr != 10.128.0.0/9 "
             "jump mark-for-masquerade" % (s, vip(s))]
            + ["add rule ip t service-%d %s" % (s, r) for r in svc_rules(shape, s, eps)])


def change_script(shape, s, kind):
    """The smallest transaction that moves service s from its 10 endpoints to the new set."""
    old = endpoints(s)
    if kind == "swap":  # endpoint 3 replaced
        new = old[:3] + [new_endpoint(s, 0)] + old[4:]
    else:  # one endpoint added
        new = old + [new_endpoint(s, 1)]
    gone = [a for a in old if a not in new]
    came = [a for a in new if a not in old]
    o = []
    if shape not in ENDPOINT_CHAINS:
        if gone:
            o.append("delete element ip t hairpin { %s }" % ", ".join("%s . %s" % (a, a) for a in gone))
        o.append("add element ip t hairpin { %s }" % ", ".join("%s . %s" % (a, a) for a in came))
    else:
        for a in came:
            o += ep_chain(s, a)[1]
    changed = [i for i in range(len(new)) if i >= len(old) or new[i] != old[i]]
    if shape in ("vmap", "svcmap") or shape.startswith("concat"):
        if kind == "swap":
            o += add_elements(elements(shape, s, old, changed), "delete")
        o += add_elements(elements(shape, s, new, changed))
        if len(new) != len(old):  # the modulus lives in the rule
            o += rewrite_service_chain(shape, s, new)
    else:  # flat, vmapanon: the service chain is the selection
        o += rewrite_service_chain(shape, s, new)
    if shape in ENDPOINT_CHAINS:
        o += ["delete chain ip t %s" % ep_chain(s, a)[0] for a in gone]
    return "\n".join(o) + "\n"


def run_nft(ns, path):
    """Wall seconds and seconds inside sendmsg (the kernel's batch processing)."""
    trace = path + ".strace"
    t0 = time.monotonic()
    p = subprocess.run(["ip", "netns", "exec", ns, "strace", "-f", "--seccomp-bpf", "-T", "-e", "trace=sendmsg",
                        "-o", trace, "nft", "-f", path], capture_output=True, text=True, timeout=TIMEOUT)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError("nft -f %s failed: %s" % (path, p.stderr[-2000:]))
    kernel = 0.0
    with open(trace) as f:
        for line in f:
            m = re.search(r"<(\d+\.\d+)>\s*$", line)
            if m:
                kernel += float(m.group(1))
    os.unlink(trace)
    return wall, kernel


def measure(shape, n, changes, tmp):
    ns = "nftshape-%d-%s-%d" % (os.getpid(), shape, n)
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        path = os.path.join(tmp, "full.nft")
        with open(path, "w") as f:
            f.write(full_script(shape, n))
        res = {"full": run_nft(ns, path), "swap": [], "grow": []}
        os.unlink(path)
        # Different services spread over the table, each changed once.
        for c in range(changes):
            for kind, off in (("swap", 0), ("grow", 1)):
                s = (n * (2 * c + off)) // (2 * changes + 1) + 1
                path = os.path.join(tmp, "change.nft")
                with open(path, "w") as f:
                    f.write(change_script(shape, s, kind))
                res[kind].append(run_nft(ns, path))
                os.unlink(path)
        return res
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=60)


def fmt(v):
    return "%.3f s" % v if v >= 1 else "%.1f ms" % (v * 1000)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", default="1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--vmapanon-max", type=int, default=1000,
                    help="largest N for vmapanon (kube-proxy's anonymous maps: 179 s at 10k)")
    ap.add_argument("shapes", nargs="*", default=SHAPES)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    sizes = [int(x) for x in a.services.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for n in sizes:
                for shape in a.shapes:
                    if shape == "vmapanon" and n > a.vmapanon_max:
                        continue
                    res = measure(shape, n, a.changes, tmp)
                    results.setdefault((n, shape), []).append(res)
                    print("round %d %6d %-8s full %s (kernel %s) | swap %s | grow %s" % (
                        r + 1, n, shape, fmt(res["full"][0]), fmt(res["full"][1]),
                        " ".join(fmt(w) + "/" + fmt(k) for w, k in res["swap"]),
                        " ".join(fmt(w) + "/" + fmt(k) for w, k in res["grow"])), flush=True)
    print("\nmedians (wall / kernel = time inside sendmsg):")
    print("%6s %-8s %22s %22s %22s" % ("N", "shape", "full", "swap one endpoint", "add one endpoint"))
    for (n, shape), rs in sorted(results.items()):
        def med(key, i):
            vals = [r[key][i] for r in rs] if key == "full" else [x[i] for r in rs for x in r[key]]
            return statistics.median(vals)
        print("%6d %-8s %22s %22s %22s" % (n, shape, *("%s / %s" % (fmt(med(k, 0)), fmt(med(k, 1)))
                                                      for k in ("full", "swap", "grow"))))


if __name__ == "__main__":
    main()
