#!/usr/bin/env python3
"""Sum a heaptrack flame-graph stack file (heaptrack_print -F FILE --flamegraph-cost-type
leaked|peak) by the innermost svcplane function on each stack: which of our functions
allocated the bytes (scripts/proxy-heap.sh).

  scripts/heaptrack-by-frame.py STACKS [TOP]
"""
import re, sys, collections
f = sys.argv[1]
by = collections.Counter(); by2 = collections.Counter(); tot = 0
def clean(fr):
    fr = re.sub(r" \(.*\)$", "", fr)
    fr = re.sub(r"::h[0-9a-f]{16}$", "", fr)
    fr = fr.replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ").replace("$C$", ",").replace("..", "::").replace("$RF$", "&").replace("$u7b$", "{").replace("$u7d$", "}")
    return fr
for line in open(f):
    line = line.rstrip("\n")
    i = line.rfind(" ")
    try: cost = int(line[i+1:])
    except ValueError: continue
    frames = [clean(x) for x in line[:i].split(";")]
    tot += cost
    idx = [k for k, fr in enumerate(frames) if "svcplane_" in fr and "closure" not in fr]
    if not idx:
        by["(outside svcplane: " + frames[min(2, len(frames)-1)][:80] + ")"] += cost; continue
    k = idx[-1]
    by[frames[k]] += cost
    outer = frames[idx[-2]] if len(idx) > 1 else ""
    by2[(outer, frames[k])] += cost
print("total %.1f MB" % (tot / 1e6))
for key, c in by.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 20):
    print("%7.1f MB  %s" % (c / 1e6, key[:160]))
print("-- with caller")
for (o, k), c in by2.most_common(15):
    print("%7.1f MB  %s  <-  %s" % (c / 1e6, k[:110], o[:110]))
