#!/usr/bin/env python3
"""Issue 15: first-packet cost of each endpoint-selection shape (scripts/nft-endpoint-shapes.py)
with one Service of K endpoints: connect + 1-byte request + 1-byte reply + close (RST), through
the ClusterIP vs straight to one endpoint, p50 over R connections per path.

  scripts/nft-endpoint-latency.py [--endpoints 1000] [--requests 3000] [--rounds 3] [SHAPE...]

(root). Two scratch network namespaces joined by a veth: the client's namespace holds the
rules (a nat output chain, so the client's own connect is DNATed, as in a pod's namespace the
node's prerouting would); the server's holds all K endpoint addresses on one listening socket.
Paths alternate in blocks of 100 connections, so load on the machine hits both alike.
"""
import argparse
import importlib.util
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("shapes", os.path.join(here, "nft-endpoint-shapes.py"))
shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shapes)

VIP = "10.96.0.1"


def sh(*args, inp=None):
    subprocess.run(args, check=True, input=inp, text=True, timeout=120)


def ruleset(shape, k):
    eps = [shapes.ip(i) for i in range(k)]
    o = ["flush ruleset", "add table ip t",
         "add chain ip t mark-for-masquerade",
         "add rule ip t mark-for-masquerade meta mark set meta mark or 0x4000",
         "add map ip t service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }",
         "add chain ip t out { type nat hook output priority -100 ; }",
         "add rule ip t out ip daddr . meta l4proto . th dport vmap @service-ips",
         "add set ip t hairpin { type ipv4_addr . ipv4_addr ; }"]
    if shape.startswith("concat"):
        o.append("add map ip t endpoints-tcp { typeof ip daddr . tcp dport . numgen random mod 1 : "
                 "ip daddr . tcp dport ; }")
    if shape in ("vmap", "svcmap"):
        o.append("add map ip t svc-eps-0 { typeof numgen random mod 1 : %s ; }"
                 % ("verdict" if shape == "vmap" else "ip daddr . tcp dport"))
    if shape in shapes.ENDPOINT_CHAINS:
        for a in eps:
            o += shapes.ep_chain(0, a)[1]
    if shape == "concatk":
        o += ["add chain ip t endpoints-mod-%d" % k, "add rule ip t endpoints-mod-%d %s" % (k, shapes.concat_rule(k))]
    o.append("add chain ip t service-0")
    o += ["add rule ip t service-0 %s" % r for r in shapes.svc_rules(shape, 0, eps)]
    o += shapes.add_elements(shapes.elements(shape, 0, eps))
    o.append("add element ip t service-ips { %s . tcp . 80 : goto service-0 }" % VIP)
    # svc_rules speaks of 10.96.0.0 (service 0's VIP in the shapes script): keep the concat key right.
    return "\n".join(o).replace("10.96.0.0 . 80", VIP + " . 80") + "\n"


def serve(ns_fd, stop):
    setns(ns_fd)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen(512)
    srv.settimeout(0.5)
    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        c.settimeout(2)
        try:
            if c.recv(1):
                c.sendall(b"y")
        except OSError:
            pass
        c.close()


def setns(fd):
    libc = __import__("ctypes").CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError("setns failed")


def one(addr):
    s = socket.socket()
    s.settimeout(2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    t0 = time.perf_counter_ns()
    s.connect(addr)
    s.sendall(b"x")
    s.recv(1)
    t1 = time.perf_counter_ns()
    s.close()
    return (t1 - t0) / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("shapes", nargs="*", default=["flat", "vmap", "svcmap", "concat", "concatk"])
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    tag = "%d" % os.getpid()
    cli, srv = "lat-c-" + tag, "lat-s-" + tag
    k = a.endpoints
    stop = threading.Event()
    try:
        sh("ip", "netns", "add", cli)
        sh("ip", "netns", "add", srv)
        sh("ip", "link", "add", "lc" + tag, "netns", cli, "type", "veth", "peer", "ls" + tag, "netns", srv)
        sh("ip", "-n", cli, "link", "set", "lo", "up")
        sh("ip", "-n", srv, "link", "set", "lo", "up")
        sh("ip", "-n", cli, "addr", "add", "10.0.0.1/24", "dev", "lc" + tag)
        sh("ip", "-n", srv, "addr", "add", "10.0.0.2/24", "dev", "ls" + tag)
        sh("ip", "-n", cli, "link", "set", "lc" + tag, "up")
        sh("ip", "-n", srv, "link", "set", "ls" + tag, "up")
        # A route for the ClusterIP too: connect() routes before the output hook DNATs.
        sh("ip", "-n", cli, "route", "add", "default", "via", "10.0.0.2")
        sh("ip", "-n", srv, "-b", "-", inp="".join(
            "addr add %s/32 dev ls%s\n" % (shapes.ip(i), tag) for i in range(k)))
        srv_fd = os.open("/run/netns/" + srv, os.O_RDONLY)
        th = threading.Thread(target=serve, args=(srv_fd, stop), daemon=True)
        th.start()
        time.sleep(0.5)
        setns(os.open("/run/netns/" + cli, os.O_RDONLY))
        res = {}
        for r in range(a.rounds):
            for shape in a.shapes:
                sh("ip", "netns", "exec", cli, "nft", "-f", "-", inp=ruleset(shape, k))
                via, direct = [], []
                for blk in range(a.requests // 100):
                    for _ in range(100):
                        via.append(one((VIP, 80)))
                    for _ in range(100):
                        direct.append(one((shapes.ip(k - 1), 8080)))
                mv, md = statistics.median(via), statistics.median(direct)
                res.setdefault(shape, []).append((mv, md))
                print("round %d %-7s %d endpoints: via ClusterIP p50 %.0f µs, direct p50 %.0f µs, ratio %.3f"
                      % (r + 1, shape, k, mv, md, mv / md), flush=True)
        print("\nmedian over rounds of (via ÷ direct):")
        for shape, v in res.items():
            print("  %-7s %.3f" % (shape, statistics.median(m / d for m, d in v)))
    finally:
        stop.set()
        subprocess.run(["ip", "netns", "del", cli], timeout=60)
        subprocess.run(["ip", "netns", "del", srv], timeout=60)


if __name__ == "__main__":
    main()
