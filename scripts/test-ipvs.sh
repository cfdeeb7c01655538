#!/usr/bin/env bash
# `make test-ipvs`: builds svcplane and its test binaries, then runs in one VM with
# Debian's stock kernel (scripts/ipvs-vm.sh) the checks this machine's kernel cannot
# host: the seed's IPVS check, the test kit's own tests, the traffic tests that
# match IPVS_VM_TESTS (a `cargo test` filter; a filter matching no test fails), and
# `svcplane lab --proxy-mode ipvs` on examples/lab.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
CARGO="${CARGO:-cargo}"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
filter="${IPVS_VM_TESTS:-ipvs::}"

if [ "$(id -u)" -ne 0 ]; then
  echo "SKIP test-ipvs: needs root (the VM's tests build network namespaces as root inside it; CI runs as root)" >&2
  exit 0
fi

# The test binary of `cargo test -p PKG --test NAME` (built, not run).
test_binary() {
  local out
  out="$("$CARGO" test --color never -p "$1" --test "$2" --no-run 2>&1)" || { echo "$out" >&2; return 1; }
  local path
  path="$(echo "$out" | sed -n "s|^ *Executable tests/$2.rs (\(.*\))$|\1|p" | sed -n 1p)"
  [ -n "$path" ] || { echo "test-ipvs: no test binary for $1 --test $2 in:" >&2; echo "$out" >&2; return 1; }
  realpath "$path"
}
"$CARGO" build -p svcplane --bin svcplane
svcplane="$target/debug/svcplane" # what the tests' env!("CARGO_BIN_EXE_svcplane") says
cluster="$(test_binary svcplane-testkit cluster)"
traffic="$(test_binary svcplane traffic)"
ipvs="$(test_binary svcplane ipvs)"

# The lab's manifests, and the tools it runs besides the test kit's (dig in the client pod).
lab_files=()
for f in "$root"/examples/lab/*.yaml; do lab_files+=(--file "$f"); done

# 2 vCPUs, so 2 cells at a time (libtest's default). 4 was tried: on a loaded host a
# dozen cells then failed. The timeout only bounds a hang: all 52 cells took 27 min on
# this 2-core host while 4 other VMs and builds ran (load 15-19).
exec scripts/ipvs-vm.sh --smp "${IPVS_VM_SMP:-2}" --mem 2G --timeout "${IPVS_VM_TIMEOUT:-2700}" \
  --bin "$svcplane" --bin "$cluster" --bin "$traffic" --bin "$ipvs" --file "$root/scripts/ipvs-vm-suite.sh" \
  --bin "$(command -v dig)" --bin "$(command -v timeout)" "${lab_files[@]}" \
  --cwd "$root/crates/svcplane" \
  -- bash "$root/scripts/ipvs-vm-suite.sh" "$cluster" "$traffic" "$filter" "$ipvs" \
  "$svcplane" "$root/examples/lab"
