#!/usr/bin/env bash
# Installs, idempotently and as root, every Debian package vMatrix needs on a fresh Debian 12
# machine, then checks that each tool is really there. Safe to run again: it does nothing when
# everything is present.
#
# Why the two steps for QEMU: a new machine may carry qemu-utils 10.0 from backports, which
# Breaks Debian 12's qemu-system-x86 7.2. Installing qemu-system-x86 removes that qemu-utils,
# so qemu-utils is installed again afterwards (it then resolves to 7.2) and the result checked.
set -euo pipefail

packages=(qemu-system-x86 busybox-static linux-image-amd64 syslinux syslinux-common syslinux-efi
          mtools dosfstools fdisk cpio kmod zstd curl iproute2 nftables util-linux e2fsprogs ovmf
          mmdebstrap openssh-client etcd-server python3-venv)
tools=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd busybox mcopy mmd mkfs.fat syslinux sfdisk cpio depmod curl
       ip bridge nft nsenter mke2fs mmdebstrap ssh ssh-keygen etcd)

missing_tools() {
  local t
  for t in "${tools[@]}"; do command -v "$t" >/dev/null 2>&1 || echo "$t"; done
  ls /boot/vmlinuz-* >/dev/null 2>&1 || echo "kernel(/boot/vmlinuz-*)"
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || echo "python3-venv(scripts/api-fuzz)"
  [ -f /usr/lib/syslinux/mbr/mbr.bin ] || echo "syslinux-mbr"
  [ -f /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi ] || echo "syslinux-efi"
  [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || echo "ovmf"
}

missing_packages() {
  local p
  for p in "${packages[@]}" qemu-utils; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

# The unprivileged user each VM's QEMU becomes once it has opened its files (the agent's
# --qemu-user); it owns nothing and cannot log in.
qemu_user=vmatrix-qemu
if ! id -u "$qemu_user" >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: user $qemu_user is missing: run this script as root to create it" >&2
    exit 1
  fi
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$qemu_user"
  echo "install-deps: created user $qemu_user"
fi

if [ -z "$(missing_tools)" ] && [ -z "$(missing_packages)" ]; then
  echo "install-deps: everything present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing: $(missing_tools | tr '\n' ' ')$(missing_packages | tr '\n' ' ')" >&2
  echo "install-deps: run this script as root to install them" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing: $(missing_packages | tr '\n' ' ')"
apt-get update -q >/dev/null
# Without qemu-utils here: see the note at the top.
apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
apt-get install -y -q --no-install-recommends qemu-utils >/dev/null

still=$(missing_tools)
if [ -n "$still" ]; then
  echo "install-deps: still missing after install: $still" >&2
  exit 1
fi
echo "install-deps: done ($(qemu-system-x86_64 --version | head -1); $(qemu-img --version | head -1))"
