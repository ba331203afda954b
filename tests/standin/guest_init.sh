#!/bin/busybox sh
# /init of the stand-in's initramfs: bring up virtio devices, mount the root filesystem read-only,
# apply the root's interface-name rules (what udev would do), then print ONE parseable line that
# describes the hardware this guest sees, and power off. The P2V verify stage reads that line from
# the serial console; nothing here writes to the disk.
/bin/busybox mkdir -p /proc /sys /dev /mnt/root /tmp /bin /sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "p2v-standin: init started"

# Order matters (PLATFORM-NOTES): virtio_ring before virtio, then the PCI transports, then devices.
for module in $(cat /etc/modules-order); do
  insmod "/lib/modules/$module.ko" 2>/dev/null
done

root_spec=""
for word in $(cat /proc/cmdline); do
  case "$word" in root=*) root_spec="${word#root=}" ;; esac
done

root_dev=""
i=0
while [ $i -lt 100 ]; do
  root_dev=$(findfs "$root_spec" 2>/dev/null)
  [ -n "$root_dev" ] && break
  sleep 0.1
  i=$((i + 1))
done

root_mounted=false
marker=""
fstab_uuid=0
fstab_device=0
if [ -n "$root_dev" ] && mount -o ro -t ext4 "$root_dev" /mnt/root; then
  root_mounted=true
  marker=$(cat /mnt/root/etc/p2v-standin/marker 2>/dev/null)
  fstab_uuid=$(grep -c '^UUID=' /mnt/root/etc/fstab 2>/dev/null)
  fstab_device=$(grep -c '^/dev/' /mnt/root/etc/fstab 2>/dev/null)
  # Interface names pinned by MAC: honour `ATTR{address}=="<mac>" ... NAME="<name>"` rules.
  for rules in /mnt/root/etc/udev/rules.d/*.rules; do
    [ -f "$rules" ] || continue
    sed -n 's/.*ATTR{address}=="\([0-9a-f:]*\)".*NAME="\([^"]*\)".*/\1 \2/p' "$rules" |
    while read -r mac name; do
      for dev in /sys/class/net/*; do
        [ "$(cat "$dev/address")" = "$mac" ] || continue
        [ "${dev##*/}" = "$name" ] || ip link set dev "${dev##*/}" name "$name"
      done
    done
  done
fi

vcpus=$(grep -c '^processor' /proc/cpuinfo)
memory_bytes=$(awk '/^MemTotal:/ {printf "%d", $2 * 1024}' /proc/meminfo)
if [ -d /sys/firmware/efi ]; then firmware=uefi; else firmware=bios; fi

disks=""
for dev in /sys/block/*; do
  name=${dev##*/}
  case "$name" in loop*|ram*|zram*|sr*|fd*) continue ;; esac
  size=$(awk '{printf "%d", $1 * 512}' "$dev/size")
  disks="$disks${disks:+,}{\"name\":\"$name\",\"size_bytes\":$size}"
done
nics=""
for dev in /sys/class/net/*; do
  name=${dev##*/}
  [ "$name" = lo ] && continue
  nics="$nics${nics:+,}{\"name\":\"$name\",\"mac\":\"$(cat "$dev/address")\"}"
done

echo "P2V-REPORT {\"vcpus\":$vcpus,\"memory_bytes\":$memory_bytes,\"firmware\":\"$firmware\",\"disks\":[$disks],\"nics\":[$nics],\"root_mounted\":$root_mounted,\"root_device\":\"$root_dev\",\"marker\":\"$marker\",\"fstab_uuid_entries\":${fstab_uuid:-0},\"fstab_device_entries\":${fstab_device:-0}}"
sync
poweroff -f
