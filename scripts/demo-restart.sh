#!/bin/bash
# demo-restart.sh — a real QEMU-only live restart: boots a heartbeat guest
# (RAM in a shared file on /dev/shm), shows its heartbeat, restarts its QEMU
# with `liveupdate restart-qemu`, and shows the heartbeat going on with the
# same boot id and an intact memory checksum. Needs root; run `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/liveupdate-demo.XXXXXX)
ram=/dev/shm/liveupdate-demo.ram
cleanup() {
	[ -f "$work/qemu.pid" ] && kill -9 "$(cat "$work/qemu.pid")" 2>/dev/null || true
	rm -f "$ram"
}
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT

./bin/mkinitrd -o "$work/guest.cpio.gz" -init ./bin/heartbeat
echo "== booting the heartbeat guest (TCG; a few seconds)"
qemu-system-x86_64 -name demo -accel tcg -nodefaults -nographic -vga none -no-reboot \
	-m 256 -machine pc,memory-backend=ram0 \
	-object memory-backend-file,id=ram0,size=256M,mem-path=$ram,share=on \
	-kernel "$PWD/.cache/kernels/new/vmlinuz" -initrd "$work/guest.cpio.gz" \
	-append "console=ttyS0 quiet panic=-1" \
	-chardev file,id=ser0,path="$work/serial.log",append=on -serial chardev:ser0 \
	-monitor none -qmp unix:"$work/qmp.sock",server=on,wait=off \
	-daemonize -pidfile "$work/qemu.pid"
for _ in $(seq 120); do grep -q '^HB seq=5 ' "$work/serial.log" 2>/dev/null && break; sleep 0.5; done
grep '^HB ' "$work/serial.log" | tail -2

echo "== liveupdate plan"
./bin/liveupdate plan --state-dir "$work/state" demo
echo "== liveupdate restart-qemu demo"
./bin/liveupdate restart-qemu --state-dir "$work/state" demo
sleep 2
echo "== heartbeat after the restart (same boot id, counter goes on, mem=ok)"
grep '^HB ' "$work/serial.log" | tail -3
echo "== QEMU pid now $(cat "$work/qemu.pid"); RAM file $(stat -c %s "$ram") bytes; state file $(stat -c %s "$work"/state/demo.state.done) bytes"
