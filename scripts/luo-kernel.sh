#!/bin/bash
# luo-kernel.sh — builds the kernel the LUO tests boot: Debian's
# linux-source-7.3 (trixie-backports) with `make tinyconfig` and
# scripts/luo-kernel.config merged on top (KHO, LUO, memfd
# preservation, and what a test host needs, built in).
#
#   scripts/luo-kernel.sh        → prints the directory holding
#       bzImage      the kernel
#       config       its .config
#       version      its release (uname -r)
#       lib/modules/VERSION/   modules.builtin etc., for initramfs/build.sh
#
# The source package is fetched with `apt-get download` through a private apt
# configuration under .cache/luo-kernel/apt (its own sources list, lists and
# cache), so the machine's sources never see the newer suite (adding it would
# replace the C library). The sources line copies the machine's own Debian
# URI (scripts/lib.sh), naming no mirror. The build is cached under
# .cache/luo-kernel/out-HASH, HASH covering the source package's version, the
# config fragment and this script; a missing or changed one is rebuilt
# (about 10 minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
repo=$PWD
cache=$repo/.cache/luo-kernel
log() { echo "luo-kernel.sh: $*" >&2; }
mkdir -p "$cache"

# --- the private apt configuration ---
apt=$cache/apt
mkdir -p "$apt/etc" "$apt/lists/partial" "$apt/cache/archives/partial"
uris=$(debian_uris)
[ -n "$uris" ] || { log "cannot find the machine's Debian source entry to copy"; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uris trixie-backports main" >"$apt/etc/sources.list"
aptopts=(-o "Dir::Etc::SourceList=$apt/etc/sources.list" -o Dir::Etc::SourceParts=- -o "Dir::State::Lists=$apt/lists"
	-o "Dir::Cache=$apt/cache" -o Dir::State::status=/dev/null -o APT::Architecture=amd64 -o APT::Sandbox::User=root)
pkg=linux-source-7.3
version() { { apt-cache "${aptopts[@]}" show "$pkg" 2>/dev/null || true; } | awk '/^Version:/ {print $2; exit}'; }
ver=$(version)
if [ -z "$ver" ]; then
	log "reading trixie-backports' package list (private apt configuration under $apt)"
	apt-get "${aptopts[@]}" -qq update
	ver=$(version)
fi
[ -n "$ver" ] || { log "$pkg is not in trixie-backports"; exit 1; }

frag=$repo/scripts/luo-kernel.config
hash=$( { echo "$pkg $ver"; cat "$frag" "$0"; } | sha256sum | cut -c1-16)
out=$cache/out-$hash
if [ -f "$out/bzImage" ] && [ -f "$out/version" ]; then
	echo "$out"
	exit 0
fi

# --- the source ---
deb=$cache/${pkg}_${ver//:/%3a}_all.deb
if [ ! -f "$deb" ]; then
	log "downloading $pkg $ver"
	(cd "$cache" && apt-get "${aptopts[@]}" -qq download "$pkg=$ver")
fi
work=$cache/build-$hash
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
log "unpacking $pkg $ver"
dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' | tar -xJ -C "$work"
src=$(echo "$work"/linux-source-*)

# --- the config: tinyconfig + the fragment; every line of it must hold ---
log "configuring (tinyconfig + scripts/luo-kernel.config)"
make -s -C "$src" tinyconfig >/dev/null
(cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$frag" >/dev/null)
make -s -C "$src" olddefconfig LOCALVERSION=-lu >/dev/null
missing=$(grep -E '^CONFIG_[A-Z0-9_]+=' "$frag" | while read -r l; do grep -qx -- "$l" "$src/.config" || echo "$l (have: $(grep -E "^(# )?${l%%=*}[= ]" "$src/.config" || echo unset))"; done)
[ -z "$missing" ] || { log "the config lost options of the fragment (unmet dependencies):"; echo "$missing" >&2; exit 1; }

# --- the build ---
log "building (make -j$(nproc) bzImage modules; about 10 minutes on two cores)"
start=$SECONDS
make -s -C "$src" -j"$(nproc)" LOCALVERSION=-lu bzImage modules >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
tmp=$out.tmp
rm -rf "$tmp" && mkdir -p "$tmp"
make -s -C "$src" LOCALVERSION=-lu INSTALL_MOD_PATH="$tmp" modules_install >/dev/null
cp "$src/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$src/.config" "$tmp/config"
make -s -C "$src" LOCALVERSION=-lu kernelrelease >"$tmp/version"
mv "$tmp" "$out"
log "built $(cat "$out/version") in $((SECONDS - start)) s"
echo "$out"
