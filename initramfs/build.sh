#!/bin/bash
# build.sh — builds the host initramfs for one kernel, like update-initramfs:
#
#   initramfs/build.sh KERNEL_VERSION MODULES_ROOT OUTPUT
#
# MODULES_ROOT holds lib/modules/KERNEL_VERSION (/ on a host, or a kernel
# package unpacked with dpkg-deb -x). OUTPUT is two gzip'd newc archives one
# after the other (the kernel unpacks both):
#   1. the core, the same for every kernel: liveupdate as /init, u-root's
#      core commands and the gosh shell for rescue (u-root busybox mode; the
#      builder is pinned in go.mod: go tool u-root), mkfs.ext4 for first boot.
#      Built once per source tree and cached in .cache/initramfs/.
#   2. this kernel's modules: those of initramfs/modules.txt with their
#      dependency closure (stored uncompressed), a fresh modules.dep, and the
#      load order in /etc/liveupdate/modules. MODULE_LIST=FILE takes another
#      list of the same form (the benchmarks measure a shorter one).
#      A host's initramfs also needs the host's own modules, those
#      `liveupdate host-modules` finds on it: the drivers under its disks and
#      PMEM (NVMe, AHCI and sd_mod, nfit…) and its NICs'. Built on the host
#      for itself (MODULES_ROOT /), build.sh asks for them itself;
#      HOST_MODULES=FILE gives that command's output, saved on the host, to
#      build its initramfs elsewhere. `liveupdate update` refuses an
#      initramfs without them.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 KERNEL_VERSION MODULES_ROOT OUTPUT" >&2; exit 2; }
kver=$1 modroot=$(realpath "$2") out=$3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
src=$modroot/lib/modules/$kver
list_src=$(realpath "${MODULE_LIST:-$here/modules.txt}")
[ -d "$src" ] || { echo "build.sh: no modules for $kver under $modroot" >&2; exit 1; }
[ -f "$src/modules.dep" ] || depmod -b "$modroot" "$kver"
cache=${CACHE:-$repo/.cache}/initramfs
mkdir -p "$cache"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# --- 1. core (cached by the hash of everything that goes into it) ---
hash=$(cd "$repo" && { cat go.mod go.sum "$here/build.sh"; find init pkg kernelconfig internal \( -name '*.go' -o -name '*.config' \) -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -c1-16)
core=$cache/core-$hash.cpio.gz
if [ ! -f "$core" ]; then
	mkdir -p "$stage/core/bin"
	printf '#!/bbin/bb #!/bbin/init\n' >"$stage/core/bin/liveupdate"
	chmod 0755 "$stage/core/bin/liveupdate"
	mkfs=$(realpath "$(command -v mkfs.ext4 || echo /sbin/mkfs.ext4)")
	cmds=()
	for c in $(ls "$(go env GOMODCACHE)/github.com/u-root/u-root@$(cd "$repo" && go list -m -f '{{.Version}}' github.com/u-root/u-root)/cmds/core"); do
		case $c in init|sluinit|sshd|scp|gpgv|lockmsrs|msr|rsdp|fusermount|update-rc.d|service|watchdogd|io|man) continue ;; esac
		cmds+=("github.com/u-root/u-root/cmds/core/$c")
	done
	# In busybox mode the program's command name is its directory's, "init";
	# /bin/liveupdate is a u-root shellbang file that runs it as the CLI.
	(cd "$repo" && GOFLAGS=-mod=mod go tool u-root -o "$stage/core.cpio" -initcmd init -defaultsh gosh \
		-files "$stage/core/bin/liveupdate:bin/liveupdate" -files "$mkfs:sbin/mkfs.ext4" \
		./init "${cmds[@]}") 2>"$stage/u-root.log" || { cat "$stage/u-root.log" >&2; exit 1; }
	gzip -9 -n -c "$stage/core.cpio" >"$core.tmp"
	mv "$core.tmp" "$core"
	# keep the cache small: only the newest few cores
	ls -t "$cache"/core-*.cpio.gz | tail -n +4 | xargs -r rm -f
fi

# --- 2. this kernel's modules ---
dst=$stage/mods/lib/modules/$kver
mkdir -p "$dst" "$stage/mods/etc/liveupdate"
cp "$src"/modules.order "$src"/modules.builtin* "$dst"/ 2>/dev/null || true
# The list keeps modules.txt's groups: a blank line between two (PID 1
# loads groups side by side).
list=$stage/mods/etc/liveupdate/modules
: >"$list"
names=$stage/modules.txt
cp "$list_src" "$names"
own=
if [ -n "${HOST_MODULES:-}" ]; then
	own=$(cat "$HOST_MODULES")
elif [ "$modroot" = / ]; then
	own=$(if command -v liveupdate >/dev/null; then liveupdate host-modules; else cd "$repo" && go run ./init host-modules; fi)
fi
if [ -n "$own" ]; then
	printf '\n%s\n' "$own" >>"$names"
	echo "build.sh: this host's own modules:" $(grep -v '^[#@]' <<<"$own") >&2
fi
group=
while read -r name; do
	case $name in
	'') [ -z "$group" ] || group=ended; continue ;;
	'#'*) continue ;;
	'@'*) # the phase that first needs the group: opens it in the list
		[ "$group" != ended ] || echo >>"$list"
		echo "$name" >>"$list"
		group=open; continue ;;
	esac
	if grep -qx "$name" "$list"; then
		continue # listed already (the host's own list repeats some)
	fi
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
	[ "$group" != ended ] || echo >>"$list"
	echo "$name" >>"$list"
	group=open
done <"$names"
depmod -b "$stage/mods" "$kver"
(cd "$stage/mods" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9 -n >"$stage/mods.cpio.gz"

cat "$core" "$stage/mods.cpio.gz" >"$out.tmp"
mv "$out.tmp" "$out"
echo "build.sh: $out ($(du -h "$out" | cut -f1); core $(du -h "$core" | cut -f1), $(grep -c '^[^@]' "$list") modules listed)" >&2
