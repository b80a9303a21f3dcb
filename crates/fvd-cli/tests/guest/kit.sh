#!/usr/bin/env bash
# Build the Linux guest kit of the tests and benchmarks, once, and print its
# directory. Everything comes from Debian packages, downloaded with
# `apt-get download` and unpacked with `dpkg -x` (nothing is installed):
#   vmlinuz      the cloud kernel (linux-image-*-cloud-amd64)
#   initrd.img   busybox-static + the virtio modules + /init, which loads
#                them, mounts /dev/vda1 (ext4, read-only) and switch_roots
#                to it: the guest boots from the disk under test (whose
#                second partition is the tests' scratch area)
#   rootfs/      a root file system tree (busybox and its applets, /sbin/
#                fvd-init); a test copies it, adds /test.sh and makes an
#                ext4 image of it with `mke2fs -d`
#   busybox      the static busybox, for the host side (cpio)
# The kit lives in $FVD_GUEST_KIT_ROOT (default: target/guest-kit of this
# workspace) under a name made of the package versions and of this script's
# hash, so a new kernel or recipe builds a new kit and an unchanged one is
# reused.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=${FVD_GUEST_KIT_ROOT:-$here/../../../../target/guest-kit}
mkdir -p "$root"
root=$(cd "$root" && pwd)
exec 9>"$root/.lock"
flock 9

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'; }
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
kernel_ver=$(candidate "${kernel_pkg:-none}" || true)
busybox_ver=$(candidate busybox-static || true)
if [ -z "$kernel_pkg" ] || [ -z "$kernel_ver" ] || [ "$kernel_ver" = "(none)" ] ||
  [ -z "$busybox_ver" ] || [ "$busybox_ver" = "(none)" ]; then
  # No package lists (offline, or apt-get update never ran): use the newest
  # kit built before, if any.
  kit=$(ls -1dt "$root"/kit-*/ 2>/dev/null | head -n1 || true)
  if [ -n "$kit" ] && [ -f "$kit/ready" ]; then
    echo "${kit%/}"
    exit 0
  fi
  echo "kit.sh: apt cannot tell the versions of linux-image-cloud-amd64 and busybox-static (run apt-get update)" >&2
  exit 1
fi
# The name also carries a hash of this script: a changed recipe builds anew.
recipe=$(sha256sum "$0" | cut -c1-12)
key=$(printf 'kit-%s_%s-busybox_%s-%s' "$kernel_pkg" "$kernel_ver" "$busybox_ver" "$recipe" | tr -c 'A-Za-z0-9._+-' '_')
kit="$root/$key"
if [ -f "$kit/ready" ]; then
  echo "$kit"
  exit 0
fi

work=$(mktemp -d "$root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" >/dev/null 2>&1) || {
  echo "kit.sh: apt-get download $kernel_pkg busybox-static failed" >&2
  exit 1
}
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
dpkg -x "$work"/busybox-static_*.deb "$work/bb"
bb="$work/bb/bin/busybox"
kver=${kernel_pkg#linux-image-}
mods="$work/kernel/lib/modules/$kver/kernel/drivers"

out="$work/kit"
mkdir -p "$out"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$bb" "$out/busybox"

# The initramfs: load virtio (in dependency order), find the disk, boot it.
ir="$work/initramfs"
mkdir -p "$ir/bin" "$ir/lib/modules" "$ir/dev" "$ir/proc" "$ir/sys" "$ir/newroot"
cp "$bb" "$ir/bin/busybox"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
  virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk; do
  cp "$mods/$m.ko" "$ir/lib/modules/"
done
cat >"$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko || echo "FVD-GUEST: insmod $m failed"
done
i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if mount -t ext4 -o ro,noload /dev/vda1 /newroot; then
  umount /proc /sys
  mount --move /dev /newroot/dev 2>/dev/null || umount /dev
  exec switch_root /newroot /sbin/fvd-init
fi
echo "FVD-GUEST: no root file system on /dev/vda1"
poweroff -f
INIT
chmod 755 "$ir/init"
(cd "$ir" && find . | "$bb" cpio -o -H newc 2>/dev/null) | gzip -1 >"$out/initrd.img"

# The root file system template: busybox applets as symlinks, and the init
# that runs /test.sh and powers off. Markers on the console tell the host
# when init started and how the test ended.
rf="$out/rootfs"
mkdir -p "$rf/bin" "$rf/sbin" "$rf/dev" "$rf/proc" "$rf/sys" "$rf/tmp"
cp "$bb" "$rf/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rf/bin/$applet"
done
cat >"$rf/sbin/fvd-init" <<'INIT'
#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
echo "FVD-GUEST-INIT $(cut -d' ' -f1 /proc/uptime)"
if sh -e /test.sh; then
  echo "FVD-GUEST-RESULT ok"
else
  echo "FVD-GUEST-RESULT failed $?"
fi
poweroff -f
INIT
chmod 755 "$rf/sbin/fvd-init"

touch "$out/ready"
rm -rf "$kit"
mv "$out" "$kit"
echo "$kit"
