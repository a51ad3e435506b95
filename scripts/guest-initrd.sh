#!/bin/bash
# guest-initrd.sh — builds the test guest's initramfs: the heartbeat /init;
# the kernel modules of the NIC, the disk (virtio_blk) and the ACPI power
# button (button, evdev) — all modules in Debian's kernel — for the set-up's
# "new" Debian kernel (the guest's kernel); the real QEMU guest agent with
# its libraries; and busybox as hwclock (qemu-ga's guest-set-time runs it).
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
# modlist LIST MODULE…: the modules with their dependencies, in load order,
# into the initramfs and named in /etc/LIST.
modlist() {
	local list=$1 kind path dst
	shift
	: >"$tmp/$list"
	for m in "$@"; do
		while read -r kind path _; do
			[ "$kind" = insmod ] || continue
			dst=/lib/modules/$(basename "$path")
			args+=(-file "$dst=$path")
			grep -qxF "$dst" "$tmp/$list" || echo "$dst" >>"$tmp/$list"
		done < <(modprobe -S "$kver" -d "$kroot" --show-depends "$m")
	done
	args+=(-file "/etc/$list=$tmp/$list")
}
modlist hb-modules virtio_net
# The disk writer's (hb.disk=) modules, loaded only when it runs.
modlist hb-disk-modules virtio_blk
# The ACPI power button as an input device (cmds/heartbeat/power.go).
modlist hb-button-modules button evdev
[ -x /usr/sbin/qemu-ga ] && args+=(-bin /usr/sbin/qemu-ga=/usr/sbin/qemu-ga)
bb=$(command -v busybox || true)
[ -n "$bb" ] && args+=(-file "/sbin/hwclock=$(realpath "$bb")")
"$tmp/mkinitrd" -o "$out" -init "$tmp/heartbeat" "${args[@]}"
