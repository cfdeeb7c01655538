#!/usr/bin/env bash
# Installs the Debian packages svcplane's build, tests and lab need, when missing.
# Runs apt-get only as root; otherwise it says what is missing and carries on.
set -euo pipefail

# command -> Debian package
declare -A need=(
  [nft]=nftables
  [iptables]=iptables
  [conntrack]=conntrack
  [ip]=iproute2
  [sysctl]=procps
  [dig]=bind9-dnsutils
  [dnsperf]=dnsperf
  # make test-ipvs: a VM with Debian's stock kernel (scripts/ipvs-vm.sh)
  [qemu-system-x86_64]=qemu-system-x86
  [cpio]=cpio
  [ipvsadm]=ipvsadm
  [depmod]=kmod
  [xz]=xz-utils
  [objcopy]=binutils
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
# The VM's initramfs needs busybox statically linked (Debian's busybox is not).
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi

# eBPF mode: crates/dataplane's build.rs builds the BPF programs with the same toolchain
# (-Z build-std=core needs rust-src) and links them with bpf-linker 0.10.4 (pinned: its
# LLVM must match rustc's; the rust-llvm feature uses rustc's own libLLVM).
BPF_LINKER_VERSION=0.10.4
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if command -v rustup >/dev/null 2>&1 && ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "install-deps: adding the rust-src component (eBPF build)" >&2
  rustup component add rust-src
fi
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  echo "install-deps: installing bpf-linker $BPF_LINKER_VERSION (eBPF build, ~4 min once)" >&2
  cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked --force
fi

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages: ${missing[*]} (run as root to install them; root tests will skip)" >&2
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
