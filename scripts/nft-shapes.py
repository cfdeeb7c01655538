#!/usr/bin/env python3
"""Generate nft scripts of N ClusterIP services x 10 endpoints in different rule shapes,
to measure what nft + the kernel pay for each (docs/nftables-scale.md).

  scripts/nft-shapes.py 10000 SHAPE > s.nft
  ip netns add x; time ip netns exec x nft -f s.nft      # first apply
  time ip netns exec x nft -f s.nft                      # replace (flush table + re-add)

SHAPE:
  inline   kube-proxy's: per-endpoint chains, `numgen random mod N vmap { ... }` (anonymous map)
  dispatch per-endpoint chains, one named verdict map keyed by `numgen ... offset B`
  prob     per-endpoint chains, iptables-style `numgen random mod K == 0 goto` rules
  dnatmap  no endpoint chains, one named `numgen -> addr . port` map, `dnat ... offset B map @m`
  named    no endpoint chains, one named dnat map per service
  flat     no endpoint chains, `numgen random mod K == 0 dnat to ep` rules, hairpin via one set
"""
import sys

n, shape, E = int(sys.argv[1]), sys.argv[2], 10
per_endpoint_chains = shape in ("inline", "dispatch", "prob")


def ip(k):
    return "10.%d.%d.%d" % (128 + (k >> 16), (k >> 8) & 255, k & 255)


o = ["add table ip t", "flush table ip t",
     "add map ip t service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }"]
if shape == "dispatch":
    o.append("add map ip t ep-dispatch { typeof numgen random mod 1 : verdict ; }")
if shape == "dnatmap":
    o.append("add map ip t ep-dnat { typeof numgen random mod 1 : ip daddr . tcp dport ; }")
if not per_endpoint_chains:
    o.append("add set ip t hairpin { type ipv4_addr . ipv4_addr ; }")
o.append("table ip t {")
o.append("\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark or 0x4000\n\t}")
if not per_endpoint_chains:
    o.append("\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority 100 ; policy accept ;\n"
             "\t\tct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade\n"
             "\t\tmeta mark & 0x4000 == 0 return\n\t\tmasquerade fully-random\n\t}")
svc_elems, extra, hairpin = [], [], []
for s in range(n):
    eps = [ip(s * E + i) for i in range(E)]
    if shape == "named":
        o.append("\tmap eps-%d {\n\t\ttypeof numgen random mod 1 : ip daddr . tcp dport\n"
                 "\t\telements = { %s }\n\t}" % (s, ", ".join("%d : %s . 8080" % (i, a) for i, a in enumerate(eps))))
    o.append("\tchain service-%d {" % s)
    o.append("\t\tip daddr 10.96.%d.%d tcp dport 80 ip saddr != 10.128.0.0/9 jump mark-for-masquerade" % (s >> 8, s & 255))
    if shape == "inline":
        o.append("\t\tnumgen random mod %d vmap { %s }" % (E, ", ".join("%d : goto ep-%d-%d" % (i, s, i) for i in range(E))))
    elif shape == "dispatch":
        o.append("\t\tnumgen random mod %d offset %d vmap @ep-dispatch" % (E, s * E))
        extra += ["%d : goto ep-%d-%d" % (s * E + i, s, i) for i in range(E)]
    elif shape == "prob":
        o += ["\t\tnumgen random mod %d == 0 goto ep-%d-%d" % (E - i, s, i) for i in range(E - 1)]
        o.append("\t\tgoto ep-%d-%d" % (s, E - 1))
    elif shape == "dnatmap":
        o.append("\t\tmeta l4proto tcp dnat ip to numgen random mod %d offset %d map @ep-dnat" % (E, s * E))
        extra += ["%d : %s . 8080" % (s * E + i, a) for i, a in enumerate(eps)]
    elif shape == "named":
        o.append("\t\tmeta l4proto tcp dnat ip to numgen random mod %d map @eps-%d" % (E, s))
    elif shape == "flat":
        o += ["\t\tnumgen random mod %d == 0 meta l4proto tcp dnat to %s:8080" % (E - i, eps[i]) for i in range(E - 1)]
        o.append("\t\tmeta l4proto tcp dnat to %s:8080" % eps[-1])
    else:
        sys.exit("unknown shape " + shape)
    o.append("\t}")
    if per_endpoint_chains:
        for i, a in enumerate(eps):
            o.append("\tchain ep-%d-%d {\n\t\tip saddr %s jump mark-for-masquerade\n"
                     "\t\tmeta l4proto tcp dnat to %s:8080\n\t}" % (s, i, a, a))
    else:
        hairpin += ["%s . %s" % (a, a) for a in eps]
    svc_elems.append("10.96.%d.%d . tcp . 80 : goto service-%d" % (s >> 8, s & 255, s))
o.append("}")
o.append("add element ip t service-ips { %s }" % ", ".join(svc_elems))
if shape == "dispatch":
    o.append("add element ip t ep-dispatch { %s }" % ", ".join(extra))
if shape == "dnatmap":
    o.append("add element ip t ep-dnat { %s }" % ", ".join(extra))
if hairpin:
    o.append("add element ip t hairpin { %s }" % ", ".join(hairpin))
print("\n".join(o))
