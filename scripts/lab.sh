#!/usr/bin/env bash
# `make lab`: the bundled example (examples/cluster), live. `svcplane lab` renders it as
# node-a would program it; then, as root, builds the test kit's virtual cluster (a bridge,
# node-a and node-b, the example's pods as network namespaces with echo servers, an
# external client), runs `svcplane proxy --proxy-mode nftables` on node-a, sends traffic
# down each Service path, prints what answered, and tears everything down (also on
# Ctrl-C or an error). Without root it does the render only.
set -euo pipefail
cd "$(dirname "$0")/.."
# exec: Ctrl-C reaches svcplane itself, which tears the cluster down.
exec cargo run -q -p svcplane -- lab "$@"
