#!/bin/sh
# Builds the tiny Linux guest of the QEMU backend's guest-freeze tests into OUT:
#   OUT/vmlinuz    Debian's cloud kernel (ext4 built in; virtio as modules)
#   OUT/initrd.gz  busybox, the virtio modules, Debian's qemu-guest-agent and its libraries,
#                  and an init that mounts /dev/vda (ext4) on /mnt and runs the agent on the
#                  virtio-serial port named org.qemu.guest_agent.0 (a disk that does not
#                  mount stops the boot there: no agent answers)
# Everything comes from the machine's own Debian archive (apt-get download, dpkg-deb -x);
# the guest's libraries are the host's (same Debian release). Built once, then cached by the
# test helper (agent/tests/common/linux_guest.rs).
set -eu
out=$1
work="$out.work.$$"
rm -rf "$work"
mkdir -p "$work/debs" "$work/root" "$work/initrd" "$work/out"
trap 'rm -rf "$work"' EXIT

kernel=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1)
[ -n "$kernel" ] || { echo "build-guest: no linux-image-cloud-amd64 in the apt lists (run apt-get update)" >&2; exit 1; }
# _apt cannot write into a root-owned temporary directory; downloading as root is fine here.
chmod 0777 "$work/debs"
(cd "$work/debs" && apt-get download -q "$kernel" busybox-static qemu-guest-agent >/dev/null)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

r="$work/root"
i="$work/initrd"
kver=$(ls "$r/lib/modules")
mkdir -p "$i/bin" "$i/lib/modules" "$i/proc" "$i/sys" "$i/dev" "$i/mnt" "$i/run" "$i/tmp" "$i/var/run"
cp "$r/bin/busybox" "$i/bin/busybox"
# Load order: each module after the ones it needs.
modules="virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk char/virtio_console"
for m in $modules; do
    cp "$r/lib/modules/$kver/kernel/drivers/$m.ko" "$i/lib/modules/"
done
cp "$r/usr/sbin/qemu-ga" "$i/bin/qemu-ga"
if ldd "$r/usr/sbin/qemu-ga" | grep -q "not found"; then
    echo "build-guest: qemu-ga needs libraries this host lacks:" >&2
    ldd "$r/usr/sbin/qemu-ga" | grep "not found" >&2
    exit 1
fi
for lib in $(ldd "$r/usr/sbin/qemu-ga" | grep -o '/lib[^ ]*'); do
    mkdir -p "$i$(dirname "$lib")"
    cp -L "$lib" "$i$lib"
done

cat > "$i/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console; do
    insmod /lib/modules/$m.ko || echo "BULWARK-GUEST-FAILED insmod $m"
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
# A system that cannot mount its disk does not come up: no guest agent answers.
if ! mount -t ext4 /dev/vda /mnt; then
    echo "BULWARK-GUEST-FAILED mount /dev/vda"
    while true; do sleep 3600; done
fi
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
[ -n "$port" ] || echo "BULWARK-GUEST-FAILED no guest agent port"
qemu-ga -m virtio-serial -p "$port" &
echo BULWARK-GUEST-READY
while true; do sleep 3600; done
INIT
chmod 0755 "$i/init"

(cd "$i" && find . | "$i/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 > "$work/out/initrd.gz")
cp "$r/boot/vmlinuz-$kver" "$work/out/vmlinuz"
echo "$kernel" > "$work/out/kernel"
rm -rf "$out"
mv "$work/out" "$out"
