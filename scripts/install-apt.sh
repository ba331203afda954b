#!/usr/bin/env bash
# Installs the Debian packages the test suite and the lab need, only those missing, and only when
# we are root on Debian (elsewhere it says what is missing and carries on: tests that need them
# skip locally and fail under CI).
set -euo pipefail
groups="${*:-all}"
declare -A PKGS
PKGS[network]="nftables iptables iproute2 bird2 iperf3 curl tcpdump ethtool libnetfilter-queue-dev build-essential ipvsadm"
PKGS[virt]="qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config ovmf"
PKGS[standin]="openssh-server openssh-client sudo busybox-static kmod cpio fdisk extlinux syslinux syslinux-common dosfstools mtools grub-efi-amd64-bin grub-common e2fsprogs smartmontools"
# A real Debian guest as the P2V source (tests/realguest): built with debootstrap; XFS/LVM roots.
PKGS[realguest]="debootstrap xfsprogs lvm2 bubblewrap"
PKGS[services]="postgresql redis-server"
PKGS[browser]="chromium chromium-driver"
PKGS[binding]="libvirt-dev pkg-config gcc"
# A P2V worker on a hypervisor (make p2v-worker): libvirt client, OpenSSH client for the copy,
# e2fsprogs/util-linux/iproute2 for adjust and the isolated verify network (all in "all" already).
PKGS[p2vworker]="libvirt-clients openssh-client e2fsprogs util-linux iproute2"
if [ "$groups" = all ]; then groups="network virt standin realguest services browser binding"; fi
wanted=""
for g in $groups; do wanted="$wanted ${PKGS[$g]}"; done
missing=""
for p in $wanted; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-apt: not root on Debian; missing:$missing" >&2
  exit 0
fi
echo "install-apt: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
