#!/usr/bin/env bash
# Run one command as root inside a VM booted with Debian's stock kernel, which has IPVS
# (this machine's kernel does not): `make test-ipvs` uses it for svcplane's IPVS tests.
#
#   scripts/ipvs-vm.sh [--bin HOSTPATH]... [--file HOSTPATH]... [--cwd DIR]
#                      [--smp N] [--mem SIZE] [--timeout SECONDS] -- COMMAND [ARGS...]
#
# Defaults: 2 CPUs, 1G, 1800 s, --cwd / (created in the VM). --file carries a data file
# (e.g. a script) to its host path.
#
# The VM: Debian's linux-image-*-amd64 (fetched with `apt-get download`, never installed
# on the host; cached in $SVCPLANE_VM_CACHE, default ~/.cache/svcplane/ipvs-vm), booted
# with qemu-system-x86_64 under TCG (`-accel tcg`: KVM here is nested and cannot boot
# it) by PVH direct boot of the extracted vmlinux, no network device. The initramfs has
# busybox, iproute2, nft, conntrack, procps' sysctl, kmod, ipvsadm (inspection only),
# iptables/ipset when the host has them, the netfilter/IPVS/dummy/veth/bridge modules
# with their dependencies (the rest autoload through modprobe), and every --bin and
# COMMAND (when it is a host path) with its shared libraries, each at its host path:
# `env!("CARGO_BIN_EXE_svcplane")` is an absolute path baked into test binaries.
#
# COMMAND runs under bash with PATH=/usr/sbin:/usr/bin, so programs started by name (the
# test kit runs `ip`, `nft`, `sysctl`) are the real tools, not busybox applets (busybox's
# own sh prefers its applets: in a `sh -c` script `ip` is busybox's; use `bash -c`). Its
# exit status is this script's (through QEMU's isa-debug-exit device); a VM that stops
# without a verdict (kernel panic, timeout) exits 125.
set -euo pipefail

die() { echo "ipvs-vm: $*" >&2; exit 125; }
log() { echo "ipvs-vm: $*" >&2; }

bins=() files=() cwd=/ smp=2 mem=1G vm_timeout=1800
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bins+=("$(realpath -s "$2")"); shift 2 ;;
    --file) files+=("$(realpath -s "$2")"); shift 2 ;;
    --cwd) cwd="$2"; shift 2 ;;
    --smp) smp="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --timeout) vm_timeout="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (COMMAND goes after --)" ;;
  esac
done
[ $# -gt 0 ] || die "no command given (usage: $0 [options] -- COMMAND [ARGS...])"
# A command given as a host path is carried into the VM like --bin.
case "$1" in /*) [ -x "$1" ] && bins+=("$1") ;; esac

for tool in qemu-system-x86_64 busybox cpio dpkg-deb depmod modprobe ldd xz apt-get; do
  command -v "$tool" >/dev/null || die "\`$tool\` is missing (scripts/install-deps.sh installs it)"
done
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  die "/bin/busybox is not the static busybox (Debian package busybox-static)"
fi

# ---- 1. The kernel: Debian's current linux-image-*-amd64, cached between runs. ----
cache="${SVCPLANE_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/svcplane/ipvs-vm}"
mkdir -p "$cache"
# Runs sharing the cache (other worktrees, parallel jobs) take turns downloading/extracting.
exec 9>"$cache/.lock"
flock 9

# The versioned package the linux-image-amd64 metapackage depends on.
resolve_kernel() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | sed -n 1p
}
# The cached package, else `apt-get download` it; after a failure, refresh apt's lists
# (as root) and try once more: stale lists name a version the mirror has dropped.
cached_deb() { ls -t "$cache/$1"_*_amd64.deb 2>/dev/null | sed -n 1p || true; }
deb=""
for attempt in 1 2; do
  if [ "$attempt" -eq 2 ]; then
    [ "$(id -u)" -eq 0 ] || break
    log "running apt-get update"
    timeout 300 apt-get update -qq || { log "apt-get update failed (no network?)"; break; }
  fi
  pkg="$(resolve_kernel)"
  [ -n "$pkg" ] || { log "apt knows no linux-image-amd64"; continue; }
  deb="$(cached_deb "$pkg")"
  [ -z "$deb" ] || break
  log "downloading $pkg (apt-get download) into $cache"
  # apt's own retries can take minutes without a network: bound them.
  (cd "$cache" && timeout 600 apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed as root' >&2) || true
  deb="$(cached_deb "$pkg")"
  [ -z "$deb" ] || break
  log "could not download $pkg (no network or no apt source?)"
done
if [ -z "$deb" ]; then
  # Offline, or apt knows no kernel: any kernel downloaded earlier will do.
  deb="$(ls -t "$cache"/linux-image-*-amd64_*_amd64.deb 2>/dev/null | sed -n 1p || true)"
  [ -n "$deb" ] || die "no Debian kernel package: \`apt-get download linux-image-amd64\`'s dependency failed and $cache has none (network needed once)"
  log "using the cached $(basename "$deb")"
fi

kdir="${deb%.deb}"
if [ ! -e "$kdir/.ready" ]; then
  log "extracting $(basename "$deb")"
  rm -rf "$kdir" && mkdir -p "$kdir"
  dpkg-deb -x "$deb" "$kdir/root"
  kver="$(basename "$(ls -d "$kdir"/root/lib/modules/*)")"
  depmod -b "$kdir/root" "$kver"
  # PVH direct boot needs the ELF vmlinux, which is xz-compressed inside the bzImage.
  vmlinuz="$kdir/root/boot/vmlinuz-$kver"
  off="$(LC_ALL=C grep -abo $'\xfd7zXZ' "$vmlinuz" | sed -n 1p | cut -d: -f1)"
  [ -n "$off" ] || die "$vmlinuz: no xz payload found"
  tail -c +$((off + 1)) "$vmlinuz" >"$kdir/vmlinux.xz"
  xz -dc --single-stream "$kdir/vmlinux.xz" >"$kdir/vmlinux" && rm "$kdir/vmlinux.xz"
  echo "$kver" >"$kdir/.ready"
  # One kernel in the cache: drop those Debian has since replaced (~450 MB each).
  for old in "$cache"/linux-image-*; do
    [ "$old" = "$deb" ] || [ "$old" = "$kdir" ] || rm -rf "$old"
  done
fi
flock -u 9
kver="$(cat "$kdir/.ready")"
kroot="$kdir/root"

# ---- 2. The initramfs: rebuilt every run (binaries change), ~1 s. ----
work="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/ipvs-vm"
stage="$work/initramfs"
rm -rf "$stage" && mkdir -p "$work" "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,run,tmp,root}
ln -s usr/bin "$stage/bin" && ln -s usr/sbin "$stage/sbin" && ln -s usr/lib "$stage/lib"
ln -s usr/lib64 "$stage/lib64"

# Copy a host file to the same path, following symlinks (each link kept as a link).
copy_path() {
  local p="$1" dst
  while :; do
    dst="$stage$p"
    [ -e "$dst" ] || [ -L "$dst" ] && return 0
    mkdir -p "$(dirname "$dst")"
    if [ -L "$p" ]; then
      local t; t="$(readlink "$p")"
      ln -s "$t" "$dst"
      case "$t" in /*) p="$t" ;; *) p="$(dirname "$p")/$t" ;; esac
    else
      cp "$p" "$dst"
      return 0
    fi
  done
}
# Copy an executable or library and every shared library it loads.
copy_elf() {
  copy_path "$1"
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true); do copy_path "$lib"; done
}
# Big debug binaries: copy without debug info (same path) to keep the initramfs small.
copy_bin() {
  local p; p="$(readlink -f "$1")"
  [ -x "$p" ] || die "--bin $1: not an executable file"
  mkdir -p "$(dirname "$stage$1")"
  if [ "$p" != "$1" ]; then copy_path "$1"; fi
  objcopy --strip-debug "$p" "$stage$p" 2>/dev/null || cp "$p" "$stage$p"
  local lib
  for lib in $(ldd "$p" 2>/dev/null | grep -o '/[^ ]*' || true); do copy_path "$lib"; done
}

# Tools, at their host paths (usr-merged: /usr/sbin/ip -> /usr/bin/ip).
provided=()
add_tool() {
  local name="$1" required="$2" p
  p="$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$name" || true)"
  if [ -z "$p" ]; then
    [ "$required" = yes ] && die "\`$name\` is missing on the host (scripts/install-deps.sh installs it)"
    return 0
  fi
  copy_path "$p"
  copy_elf "$(readlink -f "$p")"
  provided+=("$name")
}
for t in bash ip nft conntrack sysctl ipvsadm modprobe; do add_tool "$t" yes; done
for t in lsmod iptables ip6tables iptables-save ip6tables-save iptables-restore \
  ip6tables-restore ipset; do add_tool "$t" no; done
# iptables' matches and targets are dlopen()ed, so ldd does not list them.
if [ -d /usr/lib/x86_64-linux-gnu/xtables ]; then
  for so in /usr/lib/x86_64-linux-gnu/xtables/*.so; do copy_elf "$so"; done
fi
for f in /etc/protocols /etc/services /etc/ethertypes /etc/passwd /etc/group; do
  [ -e "$f" ] && copy_path "$f"
done

# Busybox applets for everything else (sh, mount, kill, ...), never shadowing a real tool.
cp /bin/busybox "$stage/usr/bin/busybox"
for applet in $(/bin/busybox --list); do
  case " ${provided[*]} " in *" $applet "*) continue ;; esac
  [ -e "$stage/usr/bin/$applet" ] || [ -e "$stage/usr/sbin/$applet" ] \
    || ln -s busybox "$stage/usr/bin/$applet"
done

# Modules: these load at boot; the other netfilter modules autoload through modprobe.
boot_modules="dummy veth bridge nf_conntrack nf_conntrack_netlink nf_nat nf_tables
  nft_ct nft_nat nft_masq nft_chain_nat nft_reject_inet nft_fib_inet nft_numgen nft_limit
  nfnetlink_queue ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh"
read -r -a mods <<<"$(echo $boot_modules)"
while read -r m; do mods+=("$(basename "$m" .ko)"); done < <(
  cd "$kroot/lib/modules/$kver" &&
  find kernel/net/netfilter kernel/net/ipv4/netfilter kernel/net/ipv6/netfilter \
    kernel/net/bridge kernel/net/sched -name '*.ko')
for m in "${mods[@]}"; do
  modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null \
    | awk '$1 == "insmod" { print $2 }'
done | sort -u | while read -r ko; do
  rel="${ko#"$kroot"}"
  mkdir -p "$stage$(dirname "$rel")" && cp "$ko" "$stage$rel"
done
for f in "$kroot/lib/modules/$kver"/modules.*; do cp "$f" "$stage/lib/modules/$kver/"; done
# The copied subset gets its own modules.dep (and aliases for autoloading).
depmod -b "$stage" "$kver"
echo "$boot_modules" >"$stage/etc/boot-modules"

for b in "${bins[@]}"; do copy_bin "$b"; done
for f in "${files[@]}"; do
  [ -e "$f" ] || die "--file $f: no such file"
  mkdir -p "$stage$(dirname "$f")" && cp -a "$f" "$stage$f"
done

mkdir -p "$stage$cwd"

# The command, quoted for bash.
{
  printf 'cd %s || exit 126\nexec' "'${cwd//\'/\'\\\'\'}'"
  for a in "$@"; do printf " '%s'" "${a//\'/\'\\\'\'}"; done
  echo
} >"$stage/etc/vm-command"

cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
# PID 1 in the VM: mount, load modules, run /etc/vm-command, report its exit status
# through QEMU's isa-debug-exit device (I/O port 0xf4).
export PATH=/usr/sbin:/usr/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 NO_COLOR=1 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# /run and /tmp stay on the initramfs (tmpfs already), so --file paths under them survive.
chmod 1777 /tmp
echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe
verdict() {
  rc=$1
  [ "$rc" -gt 127 ] && rc=127
  echo "ipvs-vm: exit status $1"
  # QEMU exits with (value << 1) | 1.
  printf "\\$(printf %o "$rc")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
  poweroff -f
}
echo "ipvs-vm: kernel up after $(cut -d" " -f1 /proc/uptime) s; loading modules"
/usr/sbin/modprobe -a $(cat /etc/boot-modules) || { echo "ipvs-vm: modprobe failed"; verdict 124; }
/usr/sbin/ip link set lo up
ulimit -n 65536
echo "ipvs-vm: booted in $(cut -d' ' -f1 /proc/uptime) s (kernel $(uname -r), $(nproc) CPUs); running: $(tail -n1 /etc/vm-command | cut -c6-)"
/usr/bin/bash /etc/vm-command </dev/null
verdict $?
EOF
chmod +x "$stage/init"

initrd="$work/initramfs.cpio"
(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) >"$initrd"
log "initramfs $(du -h "$initrd" | cut -f1), kernel $kver; booting (TCG, $smp CPUs, $mem)"

# ---- 3. Boot. ----
set +e
started=$SECONDS
timeout --foreground -k 10 "$vm_timeout" qemu-system-x86_64 \
  -accel tcg -cpu max -smp "$smp" -m "$mem" -nic none -no-reboot \
  -display none -monitor none -serial stdio \
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
  -kernel "$kdir/vmlinux" -initrd "$initrd" \
  -append "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init" </dev/null \
  | tr -d '\r' # the serial console ends lines with CR LF
qrc=${PIPESTATUS[0]}
set -e
# timeout(1) says 124, or 137 when QEMU needed a KILL (which a verdict of 68 also gives).
if [ "$qrc" -eq 124 ] || { [ "$qrc" -eq 137 ] && [ $((SECONDS - started)) -ge "$vm_timeout" ]; }; then
  die "the VM did not finish within ${vm_timeout} s"
fi
# isa-debug-exit: QEMU exits with (verdict << 1) | 1; anything else is no verdict.
[ $((qrc & 1)) -eq 1 ] || die "the VM stopped without a verdict (QEMU exit $qrc: kernel panic or poweroff)"
exit $((qrc >> 1))
