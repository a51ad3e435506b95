#!/bin/bash
# debian-host.sh — builds the nested test host: a real Debian bookworm system
# (systemd, udev, sshd, QEMU 10 and libvirt 11.3 from bookworm-backports),
# both test kernels under /boot with this project's initramfs for each, and
# liveupdate installed from the .deb the project builds (make deb).
#
#   scripts/debian-host.sh        → prints the cache directory holding
#       root.img     the root filesystem (ext4, LABEL=lu-debian-root)
#       images.img   the guest-image filesystem (ext4, LABEL=lu-images),
#                    mounted on /var/lib/libvirt/images by the host's fstab,
#                    holding the autostarted guest's disk heartbeat.qcow2
#       boot/        each kernel and its initramfs, as in the image's /boot
#       cmdline      the kernel command line the host boots with
#       machine-args the outer VM's memory: two NUMA nodes, a PMEM region each
#       id_ed25519   the key root logs in with (made for this cache)
#       known_hosts  the host's key, under the name lu-debian-host
#       kernels      "old=KVER new=KVER"
#
# Two layers, each cached under .cache/debian-host/ by the hash of what goes
# into it:
#   base-HASH.tar  mmdebstrap's bookworm root with the packages of
#                  scripts/debian-host/packages{,-backports} and the units
#                  masked or enabled; HASH covers the package lists and the
#                  build_base function's own text. Slow (downloads), rare.
#   img-HASH/      the images: base + kernels + initramfs + liveupdate's .deb
#                  + scripts/debian-host/rootfs/ (fstab, networkd, libvirt's
#                  qemu.conf, sshd) + per-cache keys; HASH covers the base's
#                  hash, this script, the overlay, the kernels and the Go
#                  sources (tests excluded) and initramfs inputs. Rebuilt
#                  after any code change, without downloading anything.
# Users of the images must not write to them: boot a copy or an overlay
# (qemu-img create -b root.img -F raw).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
repo=$PWD
cache=$repo/.cache/debian-host
here=$repo/scripts/debian-host
mkdir -p "$cache"
log() { echo "debian-host.sh: $*" >&2; }
tree=""
trap '[ -z "$tree" ] || rm -rf "$tree" "$tree-images"' EXIT

# The kernel command line of the host's first boot: this project's PID 1
# mounts PMEM (formatting it when it is empty) and the root, then hands over
# to systemd (README: "The nested test host"). Two PMEM regions, one in each
# of the outer VM's two NUMA nodes (1.5 GiB each): pmem0 at 1 GiB (node 0,
# lu.pmem, libvirt's memory_backing_dir) and pmem1 at 2 GiB (node 1, in the
# host's fstab; PID 1 mounts and first formats it from there).
# The outer VM's memory to match (in the cache as machine-args).
MACHINE_ARGS='-m 3G -object memory-backend-ram,id=node0,size=1536M -object memory-backend-ram,id=node1,size=1536M -numa node,nodeid=0,cpus=0,memdev=node0 -numa node,nodeid=1,cpus=1,memdev=node1'
CMDLINE='console=ttyS0 memmap=512M!1G memmap=512M!2G lu.pmem=/dev/pmem0 lu.format_pmem=1 lu.root=LABEL=lu-debian-root lu.handover=1'

# Units a small KVM host under test does not need, masked so that systemd's
# boot under emulation spends no time on them: apt's and dpkg's timers and
# e2scrub (they would download or scan during a test), the VT gettys (the
# VM has no display; the serial getty stays), fstrim (no discard under test).
MASK='apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service
fstrim.timer man-db.timer getty@tty1.service systemd-firstboot.service'
# Enabled: the NIC configuration (scripts/debian-host/rootfs/etc/systemd/network).
ENABLE='systemd-networkd.service'

pkglist() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$1" | tr -s ' \n' ' '; }

# build_base OUT.tar: mmdebstrap's bookworm root. As root it runs in root
# mode; otherwise unshare mode (no root mounts, subuids needed).
build_base() {
	local out=$1 uri sec mode=unshare
	uri=$(debian_uris) sec=$(debian_uris security)
	[ -n "$uri" ] || { log "cannot find the machine's Debian source entry to copy"; exit 1; }
	[ "$(id -u)" -eq 0 ] && mode=root
	local mirrors=("deb $uri bookworm main" "deb $uri bookworm-updates main" "deb $uri bookworm-backports main")
	[ -n "$sec" ] && mirrors+=("deb $sec bookworm-security main")
	local bpo; bpo=$(pkglist "$here/packages-backports")
	# systemctl in the chroot edits the unit links offline.
	mmdebstrap --mode=$mode --variant=minbase --format=tar \
		--aptopt='APT::Install-Recommends "false"' \
		--include="$(pkglist "$here/packages" | tr ' ' ',' | sed 's/,$//')" \
		--customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports $bpo" \
		--customize-hook="chroot \"\$1\" systemctl mask $(echo $MASK)" \
		--customize-hook="chroot \"\$1\" systemctl enable $ENABLE" \
		--customize-hook='rm -f "$1"/etc/libvirt/qemu/networks/autostart/default.xml' \
		--customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
		bookworm "$out.tmp" "${mirrors[@]}"
	mv "$out.tmp" "$out"
}

# sources_hash: the Go sources that make the binary and the initramfs core
# (tests excluded: they go into neither), the initramfs' inputs, and the
# systemd units the package installs.
sources_hash() {
	{
		cat go.mod go.sum Makefile initramfs/build.sh initramfs/modules.txt scripts/guest-initrd.sh systemd/*
		find init pkg cmds internal kernelconfig \( -name '*.go' ! -name '*_test.go' -o -name '*.config' \) -print0 | sort -z | xargs -0 cat
	} | sha256sum | cut -c1-16
}

kernels_hash() {
	for k in old new; do
		local v; v=$(cat .cache/kernels/$k/version)
		echo "$k $v"
		sha256sum ".cache/kernels/$k/boot/vmlinuz-$v" | cut -d' ' -f1
	done | sha256sum | cut -c1-16
}

overlay_hash() {
	(cd "$here/rootfs" && find . -print0 | LC_ALL=C sort -z | xargs -0 -n1 sh -c 'echo "$0"; [ -f "$0" ] && cat "$0"; stat -c %a "$0"') | sha256sum | cut -c1-16
}

# build_image BASE.tar DIR: the images and their keys.
build_image() {
	local base=$1 dir=$2
	tree=$(mktemp -d "$cache/tree.XXXXXX")
	tar -C "$tree" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
	mkdir -p "$dir/boot"

	# Both kernels as a kernel package installs them, with this project's
	# initramfs for each (initramfs/build.sh, as update-initramfs would).
	local kvers=()
	for k in old new; do
		local v src=.cache/kernels/$k
		v=$(cat $src/version)
		kvers+=("$k=$v")
		for f in vmlinuz config System.map; do
			install -D -m 0644 "$src/boot/$f-$v" "$tree/boot/$f-$v"
		done
		mkdir -p "$tree/usr/lib/modules"
		cp -a "$src/lib/modules/$v" "$tree/usr/lib/modules/"
		initramfs/build.sh "$v" "$src" "$tree/boot/initramfs-$v.img" 2>&1 | grep -v '^$' | tail -1 >&2
		cp "$tree/boot/vmlinuz-$v" "$tree/boot/initramfs-$v.img" "$dir/boot/"
	done

	# liveupdate, the way an operator installs it: the project's .deb.
	local deb
	deb=$(make -s deb DEB_DIR="$dir/deb")
	cp "$deb" "$tree/tmp/"
	chroot "$tree" dpkg -i "/tmp/$(basename "$deb")" >&2
	rm -f "$tree/tmp/$(basename "$deb")"

	# The host's own configuration, with libvirt's guest autostarted.
	cp -a "$here/rootfs/." "$tree/"
	mkdir -p "$tree/etc/libvirt/qemu/autostart"
	ln -sf /etc/libvirt/qemu/heartbeat.xml "$tree/etc/libvirt/qemu/autostart/heartbeat.xml"
	# That guest's kernel and initramfs (the set-up's "new" kernel, as the
	# other tests' guests), and its disk on the guest-image filesystem.
	local gb=$tree/var/lib/libvirt/boot/heartbeat images=$tree-images
	install -D -m 0644 .cache/kernels/new/vmlinuz "$gb/vmlinuz"
	scripts/guest-initrd.sh "$gb/initrd.cpio.gz"
	rm -rf "$images" && mkdir -p "$images"
	qemu-img create -q -f qcow2 "$images/heartbeat.qcow2" 64M
	mkdir -p "$tree/mnt/pmem"
	echo "$CMDLINE" >"$tree/etc/kernel/cmdline"
	echo "$CMDLINE" >"$dir/cmdline"
	echo "$MACHINE_ARGS" >"$dir/machine-args"
	echo "${kvers[*]}" >"$dir/kernels"
	# Identity made for this cache: machine id, SSH host keys, root's key.
	od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$tree/etc/machine-id"
	echo >>"$tree/etc/machine-id"
	ssh-keygen -q -A -f "$tree"
	ssh-keygen -q -t ed25519 -N '' -C lu-debian-host-test -f "$dir/id_ed25519"
	install -d -m 0700 "$tree/root/.ssh"
	install -m 0600 "$dir/id_ed25519.pub" "$tree/root/.ssh/authorized_keys"
	echo "lu-debian-host $(cut -d' ' -f1,2 "$tree/etc/ssh/ssh_host_ed25519_key.pub")" >"$dir/known_hosts"

	# /etc and /var are as new as /usr: systemd's ConditionNeedsUpdate units
	# (ldconfig, a few seconds under emulation) have nothing to do at boot.
	touch "$tree/etc/.updated" "$tree/var/.updated"

	# Room to grow on the root (logs, packages); guests' disks go to images.img.
	local size=$(( $(du -sm "$tree" | cut -f1) + 768 ))M
	mkfs.ext4 -q -F -L lu-debian-root -d "$tree" "$dir/root.img" "$size"
	mkfs.ext4 -q -F -L lu-images -d "$images" "$dir/images.img" 4G
	rm -rf "$images"
	log "root.img $size, images.img 4G (sparse), kernels ${kvers[*]}"
}

command -v mmdebstrap >/dev/null || { log "installing mmdebstrap"; apt-get install -y -qq --no-install-recommends mmdebstrap >&2; }

# One build at a time (the set-up and a test run may both ask).
exec 9>"$cache/.lock"
flock 9

base_hash=$( { declare -f build_base; echo "$MASK $ENABLE"; cat "$here/packages" "$here/packages-backports"; } | sha256sum | cut -c1-16)
base=$cache/base-$base_hash.tar
if [ ! -f "$base" ]; then
	log "building the bookworm root (mmdebstrap; downloads the packages)"
	t0=$SECONDS
	build_base "$base"
	log "base-$base_hash.tar in $((SECONDS - t0)) s"
	ls -t "$cache"/base-*.tar | tail -n +3 | xargs -r rm -f
fi

img_hash=$( { echo "$base_hash"; cat "$0"; overlay_hash; kernels_hash; sources_hash; } | sha256sum | cut -c1-16)
dir=$cache/img-$img_hash
if [ ! -f "$dir/.done" ]; then
	log "building the host images into $dir"
	t0=$SECONDS
	rm -rf "$dir"
	mkdir -p "$dir"
	build_image "$base" "$dir" >&2
	touch "$dir/.done"
	log "images in $((SECONDS - t0)) s"
	# keep the cache small: the newest two image sets
	ls -dt "$cache"/img-*/ | tail -n +3 | xargs -r rm -rf
fi
echo "$dir"
