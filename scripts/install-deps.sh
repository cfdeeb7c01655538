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
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages: ${missing[*]} (run as root to install them; root tests will skip)" >&2
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
