#!/bin/bash
# build.sh — builds the host initramfs for one kernel, like update-initramfs:
#
#   initramfs/build.sh KERNEL_VERSION MODULES_ROOT OUTPUT
#
# MODULES_ROOT holds lib/modules/KERNEL_VERSION (e.g. / on a host, or a kernel
# package unpacked with dpkg-deb -x). The archive (gzip) holds: liveupdate as
# /init, u-root's core commands and the gosh shell for rescue (busybox mode),
# and the modules of initramfs/modules.txt with their dependency closure and a
# fresh modules.dep. The u-root builder is pinned in go.mod (go tool u-root).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 KERNEL_VERSION MODULES_ROOT OUTPUT" >&2; exit 2; }
kver=$1 modroot=$(realpath "$2") out=$3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
src=$modroot/lib/modules/$kver
[ -d "$src" ] || { echo "build.sh: no modules for $kver under $modroot" >&2; exit 1; }
[ -f "$src/modules.dep" ] || depmod -b "$modroot" "$kver"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dst=$stage/lib/modules/$kver
mkdir -p "$dst"
cp "$src"/modules.order "$src"/modules.builtin* "$dst"/ 2>/dev/null || true

# The closure of every listed module, from modules.dep (modprobe resolves it).
: >"$stage/load-order"
while read -r name; do
	case $name in ''|'#'*) continue ;; esac
	if ! deps=$(modprobe -S "$kver" -d "$modroot" --show-depends "$name" 2>/dev/null); then
		echo "build.sh: module $name not in $kver (built in or absent): skipped" >&2
		continue
	fi
	while read -r kind path _; do
		[ "$kind" = insmod ] || continue
		rel=${path#"$src"/}
		mkdir -p "$dst/$(dirname "$rel")"
		# Stored uncompressed: the archive is compressed as a whole, and
		# under emulation the kernel's per-module xz is slow at boot.
		case $rel in
		*.xz) [ -e "$dst/${rel%.xz}" ] || xz -dc "$path" >"$dst/${rel%.xz}" ;;
		*.zst) [ -e "$dst/${rel%.zst}" ] || zstd -qdc "$path" >"$dst/${rel%.zst}" ;;
		*.gz) [ -e "$dst/${rel%.gz}" ] || gzip -dc "$path" >"$dst/${rel%.gz}" ;;
		*) cp -n "$path" "$dst/$rel" ;;
		esac
	done <<<"$deps"
	echo "$name" >>"$stage/load-order"
done <"$here/modules.txt"
depmod -b "$stage" "$kver"
mkdir -p "$stage/etc/liveupdate" "$stage/bin"
cp "$stage/load-order" "$stage/etc/liveupdate/modules"
# In busybox mode the program's command name is its directory's, "init";
# `liveupdate …` in the rescue shell runs the same program as the CLI.
printf '#!/bin/gosh\nexec /bbin/init "$@"\n' >"$stage/bin/liveupdate"
chmod 0755 "$stage/bin/liveupdate"
# mkfs.ext4 for lu.format_pmem=1 (first boot only; never on a used device).
mkfs=$(realpath "$(command -v mkfs.ext4 || echo /sbin/mkfs.ext4)")

cmds=()
for c in $(ls "$(go env GOMODCACHE)/github.com/u-root/u-root@$(cd "$repo" && go list -m -f '{{.Version}}' github.com/u-root/u-root)/cmds/core"); do
	case $c in init|sluinit|sshd|scp|gpgv|lockmsrs|msr|rsdp|fusermount|update-rc.d|service|watchdogd|io|man) continue ;; esac
	cmds+=("github.com/u-root/u-root/cmds/core/$c")
done
cpio=$stage/initramfs.cpio
(cd "$repo" && GOFLAGS=-mod=mod go tool u-root -o "$cpio" -initcmd init -defaultsh gosh \
	-files "$stage/lib/modules:lib/modules" -files "$stage/etc/liveupdate:etc/liveupdate" \
	-files "$stage/bin/liveupdate:bin/liveupdate" -files "$mkfs:sbin/mkfs.ext4" \
	./init "${cmds[@]}")
gzip -9 -n -c "$cpio" >"$out.tmp"
mv "$out.tmp" "$out"
echo "build.sh: $out ($(du -h "$out" | cut -f1), $(wc -l <"$stage/load-order") modules listed)" >&2
