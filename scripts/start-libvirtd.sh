#!/usr/bin/env bash
# Starts virtlogd + libvirtd without systemd (PLATFORM-NOTES "libvirt without systemd"); idempotent.
# Records the daemons' PIDs in var/run/ and waits until `virsh version` answers.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
run_dir="$here/var/run"
mkdir -p "$run_dir" /var/log/libvirt /var/lib/libvirt /run/libvirt
uri="${LIBVIRT_URI:-qemu:///system}"

if virsh -c "$uri" version >/dev/null 2>&1; then
  echo "start-libvirtd: libvirtd already answers on $uri"
  exit 0
fi
for tool in /usr/sbin/libvirtd /usr/sbin/virtlogd virsh; do
  command -v "$tool" >/dev/null || { echo "start-libvirtd: $tool is missing (./scripts/install-apt.sh virt)" >&2; exit 1; }
done
# Each of these is required: no libvirt-qemu user -> the QEMU driver fails even with user=root.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
if ! grep -q '^user = "root"' /etc/libvirt/qemu.conf 2>/dev/null; then
  printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
fi

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! pid_alive /run/virtlogd.pid; then
  /usr/sbin/virtlogd -d
fi
if ! pid_alive /run/libvirtd.pid; then
  /usr/sbin/libvirtd -d
fi
for _ in $(seq 1 60); do
  if virsh -c "$uri" version >/dev/null 2>&1; then
    for name in virtlogd libvirtd; do
      [ -s "/run/$name.pid" ] && cp "/run/$name.pid" "$run_dir/$name.pid"
    done
    echo "start-libvirtd: libvirtd answers on $uri (pids: virtlogd $(cat /run/virtlogd.pid 2>/dev/null), libvirtd $(cat /run/libvirtd.pid 2>/dev/null))"
    exit 0
  fi
  sleep 0.5
done
echo "start-libvirtd: libvirtd did not answer on $uri within 30 s (see /var/log/libvirt/)" >&2
exit 1
