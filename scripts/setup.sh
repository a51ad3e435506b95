#!/bin/bash
# setup.sh — installs what the project needs on a Debian 12 (bookworm) machine:
# QEMU 10 and libvirt 11 from bookworm-backports, the host tools the tests use,
# and the Debian kernels (old 6.1, new 6.12) unpacked into the ignored cache folder .cache/.
#
# The backports suite is added by copying the machine's own Debian source entry
# (its URIs line) and changing the suite, so no mirror host name is written here.
# Also the LUO test kernel (scripts/luo-kernel.sh: Debian's linux-source-7.3
# fetched through a private apt configuration, never the machine's sources).
# Idempotent: running it twice changes nothing the second time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
CACHE=${CACHE:-$PWD/.cache}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

log() { echo "setup: $*" >&2; }

add_backports() {
	local dst=/etc/apt/sources.list.d/liveupdate-backports.sources
	[ -f "$dst" ] && return 0
	local uris
	uris=$(debian_uris)
	[ -n "$uris" ] || { log "cannot find the machine's Debian source entry to copy"; exit 1; }
	log "adding bookworm-backports from the machine's own Debian source"
	$SUDO tee "$dst" >/dev/null <<EOT
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
	$SUDO apt-get update -qq
}

install_packages() {
	local need=()
	if ! qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.'; then
		need+=(qemu-system-x86 qemu-utils)
	fi
	# libvirt (the libvirt tests, qemu-tests/libvirt_test.go, run its daemons
	# themselves: no systemd needed).
	if ! libvirtd --version 2>/dev/null | grep -q ' 11\.'; then
		need+=(libvirt-daemon-driver-qemu libvirt-clients libvirt-daemon)
	fi
	local base=(iproute2 e2fsprogs cpio xz-utils kmod ovmf qemu-guest-agent busybox-static mmdebstrap openssh-client ansible-core
		flex bison bc libelf-dev libssl-dev)  # the last five build the LUO test kernel (scripts/luo-kernel.sh)
	local missing=()
	for p in "${base[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
	if [ ${#need[@]} -gt 0 ] || [ ${#missing[@]} -gt 0 ]; then
		[ ${#missing[@]} -gt 0 ] && { $SUDO apt-get update -qq; $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
		[ ${#need[@]} -gt 0 ] && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports "${need[@]}"
	fi
	qemu-system-x86_64 --version | head -1 >&2
	libvirtd --version >&2
}

# fetch_kernel SUITE PATTERN NAME: downloads the newest linux-image package of
# SUITE matching PATTERN, unpacks it into $CACHE/kernels/NAME and runs depmod.
fetch_kernel() {
	local suite=$1 pattern=$2 name=$3 dir=$CACHE/kernels/$3
	[ -f "$dir/.done" ] && return 0
	local pkg
	pkg=$(apt-cache search --names-only "^linux-image-${pattern}-amd64-unsigned\$" | awk '{print $1}' | sort -V | tail -1)
	if [ -z "$pkg" ]; then
		pkg=$(apt-cache search --names-only "^linux-image-${pattern}-amd64\$" | awk '{print $1}' | sort -V | tail -1)
	fi
	[ -n "$pkg" ] || { log "no kernel package matching $pattern in $suite"; exit 1; }
	log "fetching $pkg"
	rm -rf "$dir" && mkdir -p "$dir"
	local tmp; tmp=$(mktemp -d)
	(cd "$tmp" && apt-get download -qq -t "$suite" "$pkg")
	dpkg-deb -x "$tmp"/*.deb "$dir"
	rm -rf "$tmp"
	local ver; ver=$(ls "$dir/lib/modules" | head -1)
	depmod -b "$dir" "$ver"
	ln -sf "boot/vmlinuz-$ver" "$dir/vmlinuz"
	echo "$ver" >"$dir/version"
	touch "$dir/.done"
}

add_backports
install_packages
mkdir -p "$CACHE/kernels"
fetch_kernel bookworm-backports '6\.12\.[0-9.+~a-z]*' new
fetch_kernel bookworm '6\.1\.0-[0-9]*' old
log "kernels: old=$(cat "$CACHE/kernels/old/version") new=$(cat "$CACHE/kernels/new/version")"
# The LUO test kernel (Debian's linux-source-7.3 through a private apt
# configuration; cached by the hash of its inputs, about 10 minutes to build).
log "LUO test kernel: $(cat "$(scripts/luo-kernel.sh)/version")"
