#!/usr/bin/env python3
"""Issue 15: is the extra first-packet cost of a 1000-endpoint Service the rules', or the
server's? `svcplane bench datapath --target-endpoints 1000` puts the endpoints on one pod as
1000 ports, so the ClusterIP path reaches 1000 listening sockets while "straight to the pod"
always reaches the first one. This measures four paths side by side:

  one      straight to the server's first port (the bench's direct path)
  spread   straight to a random one of its K ports (what the ClusterIP path reaches)
  via-1    through a ClusterIP with 1 endpoint (the concatk rule shape)
  via-K    through a ClusterIP with K endpoints (the concatk rule shape, `mod-K`)

  scripts/nft-endpoint-ports.py [--endpoints 1000] [--requests 3000] [--rounds 3]

(root). Two scratch network namespaces joined by a veth: the client's holds the rules (a nat
output chain with svcplane's selection: `dnat ip to ip daddr . tcp dport . numgen random mod
K map @endpoints-tcp`), the server's one epoll loop over K listening sockets. Connect +
1-byte request + 1-byte reply + close (RST), paths alternating in blocks of 100, p50 per path
and round. Then via-K − spread is what the rules cost at K endpoints, via-1 − one at 1.
"""
import argparse
import ctypes
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import time

SERVER, CLIENT = "10.77.0.2", "10.77.0.1"
VIP1, VIPK = "10.96.0.1", "10.96.0.2"
BASE = 8080


def sh(*args, inp=None):
    subprocess.run(args, check=True, input=inp, text=True, timeout=120)


def ruleset(k):
    elems = ["%s . 80 . 0 : %s . %d" % (VIP1, SERVER, BASE)]
    elems += ["%s . 80 . %d : %s . %d" % (VIPK, b, SERVER, BASE + b) for b in range(k)]
    return "\n".join([
        "flush ruleset",
        "table ip t {",
        " map service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }",
        " map endpoints-tcp { typeof ip daddr . tcp dport . numgen random mod 1 :"
        " ip daddr . tcp dport ; }",
        " chain endpoints-tcp-mod-1 {",
        "  dnat ip to ip daddr . tcp dport . numgen random mod 1 map @endpoints-tcp ; }",
        " chain endpoints-tcp-mod-%d {" % k,
        "  dnat ip to ip daddr . tcp dport . numgen random mod %d map @endpoints-tcp ; }" % k,
        " chain service-1 { goto endpoints-tcp-mod-1 ; }",
        " chain service-k { goto endpoints-tcp-mod-%d ; }" % k,
        " chain out { type nat hook output priority -100 ;",
        "  ip daddr . meta l4proto . th dport vmap @service-ips ; }",
        "}",
        "add element ip t service-ips { %s . tcp . 80 : goto service-1, "
        "%s . tcp . 80 : goto service-k }" % (VIP1, VIPK),
        "add element ip t endpoints-tcp { %s }" % ", ".join(elems),
    ]) + "\n"


LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    if LIBC.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns " + path)
    os.close(fd)


def serve(k, ready_w):
    setns("/run/netns/eppsrv")
    ep = select.epoll()
    socks = {}
    for b in range(k):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((SERVER, BASE + b))
        s.listen(1024)
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        socks[s.fileno()] = s
    os.write(ready_w, b"r")
    while True:
        for fd, _ in ep.poll():
            while True:
                try:
                    c, _ = socks[fd].accept()
                except BlockingIOError:
                    break
                c.setblocking(True)
                if c.recv(1):
                    c.send(b"x")
                c.close()


LINGER0 = struct.pack("ii", 1, 0)


def one(addr):
    t = time.perf_counter_ns()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    s.connect(addr)
    s.send(b"x")
    s.recv(1)
    s.close()
    return time.perf_counter_ns() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    k = a.endpoints
    for ns in ("eppsrv", "eppcli"):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", "eppc", "netns", "eppcli", "type", "veth",
           "peer", "name", "epps", "netns", "eppsrv")
        for ns, dev, addr in (("eppcli", "eppc", CLIENT), ("eppsrv", "epps", SERVER)):
            sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", "eppcli", "route", "add", "10.96.0.0/16", "dev", "eppc")
        sh("ip", "netns", "exec", "eppcli", "nft", "-f", "-", inp=ruleset(k))
        # The server in a process of its own: no GIL between it and the client.
        ready_r, ready_w = os.pipe()
        server = os.fork()
        if server == 0:
            serve(k, ready_w)
            os._exit(0)
        os.read(ready_r, 1)
        setns("/run/netns/eppcli")
        rng = random.Random(1)
        # Every path draws a port, so they all pay the same Python.
        paths = {
            "one": lambda: (SERVER, BASE + 0 * rng.randrange(k)),
            "spread": lambda: (SERVER, BASE + rng.randrange(k)),
            "via-1": lambda: (VIP1, 80 + 0 * rng.randrange(k)),
            "via-K": lambda: (VIPK, 80 + 0 * rng.randrange(k)),
        }
        for _ in range(200):  # warm up every path
            for f in paths.values():
                one(f())
        per_round = {p: [] for p in paths}
        for r in range(a.rounds):
            samples = {p: [] for p in paths}
            for _ in range(a.requests // 100):
                for p, f in paths.items():
                    samples[p] += [one(f()) for _ in range(100)]
            for p in paths:
                per_round[p].append(statistics.median(samples[p]) / 1000)
            print("round %d: " % r + ", ".join(
                "%s p50 %.1f µs" % (p, per_round[p][-1]) for p in paths), flush=True)
        med = {p: statistics.median(v) for p, v in per_round.items()}
        print("K=%d, median of %d round p50s: %s" % (
            k, a.rounds, ", ".join("%s %.1f µs" % (p, v) for p, v in med.items())))
        print("rules at 1 endpoint  (via-1 − one):    %+.1f µs" % (med["via-1"] - med["one"]))
        print("rules at K endpoints (via-K − spread): %+.1f µs" % (med["via-K"] - med["spread"]))
        print("server's K sockets   (spread − one):   %+.1f µs" % (med["spread"] - med["one"]))
        print("ratio as the bench computes it (via-K ÷ one): %.3f; via-K ÷ spread: %.3f" % (
            med["via-K"] / med["one"], med["via-K"] / med["spread"]))
    finally:
        if server:
            os.kill(server, 9)
            os.waitpid(server, 0)
        for ns in ("eppsrv", "eppcli"):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
