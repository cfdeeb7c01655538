#!/usr/bin/env bash
# `make lab`: `svcplane lab` on examples/lab (a Deployment and the Services `kubectl expose`
# makes of it) in every proxy mode this kernel runs: builds the test kit's two-node virtual
# cluster, runs `svcplane proxy` on node-a, walks DNS → ClusterIP → rules → Pod, a NodePort,
# a scale-down, prints a side-by-side table, and tears everything down (also on Ctrl-C or
# an error). Arguments go to `svcplane lab` (e.g. `make lab ARGS="--proxy-mode nftables"`,
# or `scripts/lab.sh --manifests examples/cluster` for that example's probes).
# No `-q`: on a fresh machine the first build takes minutes, and cargo shows its progress.
set -euo pipefail
cd "$(dirname "$0")/.."
# exec: Ctrl-C reaches svcplane itself, which tears the cluster down.
exec cargo run -p svcplane -- lab "$@"
