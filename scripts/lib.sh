# lib.sh — shell helpers the set-up scripts share (sourced, not run).

# debian_uris prints the machine's own Debian archive URI (its first non-
# security URIs: line, or the bookworm deb line of sources.list), so that the
# scripts copy the machine's source entry and never name a mirror host.
# With "security" as argument it prints the security archive's URI instead
# (empty if the machine has none).
debian_uris() {
	local want=${1:-main} src=/etc/apt/sources.list.d/debian.sources uri=""
	if [ -f "$src" ]; then
		if [ "$want" = security ]; then
			uri=$(awk '/^URIs:/ && /security/ {print $2; exit}' "$src")
		else
			uri=$(awk '/^URIs:/ && !/security/ {print $2; exit}' "$src")
		fi
	fi
	if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
		if [ "$want" = security ]; then
			uri=$(awk '/^deb / && $3 ~ /^bookworm-security$/ {print $2; exit}' /etc/apt/sources.list)
		else
			uri=$(awk '/^deb / && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)
		fi
	fi
	echo "$uri"
}
