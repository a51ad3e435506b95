#!/bin/bash
# bench.sh — runs the benchmarks and rewrites docs/benchmarks.md with the
# figures, the command and the machine. Nothing here asserts on speed.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="go test -count=1 -run '^\$' -bench Restart -benchtime 5x ./qemu-tests"
log=$(mktemp)
eval "$cmd" 2>&1 | tee "$log" | grep -E '^(Benchmark|restart-qemu|ok|FAIL)'
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
{
	echo "# Benchmarks"
	echo
	echo "Written by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d). Figures are measurements, not"
	echo "targets; tests never assert on them."
	echo
	echo "- Machine: $(nproc) cores ($cpu), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r)"
	echo "- QEMU: $(qemu-system-x86_64 --version | head -1), TCG (no KVM here)"
	echo "- Guest: heartbeat test guest, 256 MiB RAM in a shared memory-backend-file on /dev/shm, Debian kernel $(cat .cache/kernels/new/version)"
	echo "- Command: \`$cmd\`"
	echo "- Blackout = new QEMU's RESUME − old QEMU's STOP (QMP event timestamps); per guest, 5 runs."
	echo
	echo "| benchmark | runs × guests | blackout median | min | max | state file | guest RAM |"
	echo "|---|---|---|---|---|---|---|"
	grep '^Benchmark' "$log" | while read -r name n _ _ rest; do
		get() { echo "$rest" | awk -v k="$1" '{for(i=2;i<=NF;i++) if($i==k) print $(i-1)}'; }
		guests=1; [[ $name == *3Guests* ]] && guests=3
		printf '| %s | %s × %s | %s ms | %s ms | %s ms | %s KiB | %s MiB |\n' "${name%-*}" "$n" "$guests" \
			"$(get blackout-median-ms)" "$(get blackout-min-ms)" "$(get blackout-max-ms)" \
			"$(( $(get state-bytes) / 1024 ))" "$(( $(get ram-bytes) / 1048576 ))"
	done
	echo
	echo "Raw blackouts (ms), sorted:"
	echo
	grep '^restart-qemu' "$log" | sed 's/^/    /'
} > docs/benchmarks.md
rm -f "$log"
echo "wrote docs/benchmarks.md"
