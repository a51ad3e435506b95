#!/bin/bash
# hostroot.sh — builds the nested test host's root filesystem image without
# root mounts (mkfs.ext4 -d): QEMU 10 with its libraries and firmware,
# liveupdate and the tests' helpers (liveupdate-fault, qmpsend), both Debian
# kernels (6.1 "old", 6.12 "new") with their configs and this project's
# initramfs for each, the inner guest's kernel and initramfs, and the
# first-boot host configuration.
#
#   [LUO_KERNEL=DIR] scripts/hostroot.sh HOST_JSON OUTPUT_IMAGE [FSTAB]
#
# FSTAB, if given, becomes the host's /etc/fstab (PID 1 mounts its local
# filesystems under the host root before the guests start).
set -euo pipefail
cd "$(dirname "$0")/.."
hostjson=$(realpath "$1") out=$2 fstab=${3:-}
cache=.cache/hostroot
mkdir -p "$cache"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT

for k in old new; do
	kver=$(cat .cache/kernels/$k/version)
	ir=$cache/initramfs-$kver.img
	initramfs/build.sh "$kver" .cache/kernels/$k "$ir" 2>&1 | grep -v '^$' | tail -1 >&2
	install -D -m 0644 .cache/kernels/$k/boot/vmlinuz-$kver "$tree/boot/vmlinuz-$kver"
	install -D -m 0644 .cache/kernels/$k/boot/config-$kver "$tree/boot/config-$kver"
	install -D -m 0644 "$ir" "$tree/boot/initramfs-$kver.img"
done
# The LUO test kernel too, when asked (LUO_KERNEL: scripts/luo-kernel.sh's
# output directory): its modules are built in, its initramfs lists none.
if [ -n "${LUO_KERNEL:-}" ]; then
	kver=$(cat "$LUO_KERNEL/version")
	ir=$cache/initramfs-$kver.img
	initramfs/build.sh "$kver" "$LUO_KERNEL" "$ir" 2>&1 | grep -v '^$' | tail -1 >&2
	install -D -m 0644 "$LUO_KERNEL/bzImage" "$tree/boot/vmlinuz-$kver"
	install -D -m 0644 "$LUO_KERNEL/config" "$tree/boot/config-$kver"
	install -D -m 0644 "$ir" "$tree/boot/initramfs-$kver.img"
fi
CGO_ENABLED=0 go build -o "$tree/usr/sbin/liveupdate" ./init
# The same program with fault injection compiled in, for the nested fault tests.
CGO_ENABLED=0 go build -tags faultinject -o "$tree/usr/sbin/liveupdate-fault" ./init
# A QMP client for the tests' commands on the host (pause, query, continue a guest).
CGO_ENABLED=0 go build -o "$tree/usr/sbin/qmpsend" ./cmds/qmpsend
scripts/guest-initrd.sh "$cache/guest.cpio.gz"
install -D -m 0644 "$cache/guest.cpio.gz" "$tree/srv/guest/guest.cpio.gz"
install -D -m 0644 .cache/kernels/new/boot/vmlinuz-"$(cat .cache/kernels/new/version)" "$tree/srv/guest/vmlinuz"

# QEMU and what it loads at run time.
qemu=$(command -v qemu-system-x86_64)
for f in "$qemu" $(ldd "$qemu" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}'); do
	mkdir -p "$tree$(dirname "$f")"
	cp -L "$f" "$tree$f"
done
for d in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu /usr/lib/x86_64-linux-gnu/qemu; do
	[ -d "$d" ] && { mkdir -p "$tree$(dirname "$d")"; cp -a "$d" "$tree$d"; }
done
# /lib64 → the interpreter path on Debian
[ -e "$tree/lib64/ld-linux-x86-64.so.2" ] || { mkdir -p "$tree/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$tree/lib64/"; }

install -D -m 0644 "$hostjson" "$tree/etc/liveupdate/host.json"
[ -z "$fstab" ] || install -D -m 0644 "$fstab" "$tree/etc/fstab"
for d in dev proc sys run tmp mnt/pmem var/lib/liveupdate var/log sbin bin; do mkdir -p "$tree/$d"; done
rm -f "$out"
size=$(( $(du -sm "$tree" | cut -f1) + 128 ))M
mkfs.ext4 -q -F -L lu-hostroot -d "$tree" "$out" "$size"
echo "hostroot.sh: $out ($size)" >&2
