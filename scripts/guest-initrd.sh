#!/bin/bash
# guest-initrd.sh — builds the test guest's initramfs: the heartbeat /init,
# the NIC's and the disk's (virtio_blk: a module in Debian's kernel) kernel
# modules for the set-up's "new" Debian kernel (the guest's kernel), the real QEMU guest agent with its libraries, and busybox as
# hwclock (qemu-ga's guest-set-time runs it).
#
#   scripts/guest-initrd.sh OUTPUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
CGO_ENABLED=0 go build -o "$tmp/heartbeat" ./cmds/heartbeat
CGO_ENABLED=0 go build -o "$tmp/mkinitrd" ./cmds/mkinitrd
kroot=.cache/kernels/new
kver=$(cat "$kroot/version")
args=()
: >"$tmp/hb-modules"
while read -r kind path _; do
	[ "$kind" = insmod ] || continue
	dst=/lib/modules/$(basename "$path")
	args+=(-file "$dst=$path")
	echo "$dst" >>"$tmp/hb-modules"
done < <(modprobe -S "$kver" -d "$kroot" --show-depends virtio_net)
args+=(-file "/etc/hb-modules=$tmp/hb-modules")
# The disk writer's (hb.disk=) modules, loaded only when it runs.
: >"$tmp/hb-disk-modules"
while read -r kind path _; do
	[ "$kind" = insmod ] || continue
	dst=/lib/modules/$(basename "$path")
	args+=(-file "$dst=$path")
	echo "$dst" >>"$tmp/hb-disk-modules"
done < <(modprobe -S "$kver" -d "$kroot" --show-depends virtio_blk)
args+=(-file "/etc/hb-disk-modules=$tmp/hb-disk-modules")
[ -x /usr/sbin/qemu-ga ] && args+=(-bin /usr/sbin/qemu-ga=/usr/sbin/qemu-ga)
bb=$(command -v busybox || true)
[ -n "$bb" ] && args+=(-file "/sbin/hwclock=$(realpath "$bb")")
"$tmp/mkinitrd" -o "$out" -init "$tmp/heartbeat" "${args[@]}"
