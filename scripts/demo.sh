#!/bin/bash
# demo.sh — a real live kernel update of a KVM host, as an operator runs it:
# a Debian bookworm host (systemd, libvirt 11.3, QEMU 10; scripts/
# debian-host.sh) boots in a VM on this machine, libvirt autostarts its guest
# (RAM on PMEM, a qcow2 disk it writes to, a NIC on br0), and the project's
# Ansible playbook updates the host's kernel there and back (UPDATES=2) with
# the guest running throughout. Each update shows liveupdate's plan, the
# playbook's run, liveupdate's status table and where its timeline picture
# was written; the last line says what was verified. Needs root (a network
# namespace for the guests' network); run `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
updates=${UPDATES:-2}
ns=lu-demo tap=ludemo0
work=$(mktemp -d /tmp/liveupdate-demo.XXXXXX)
out=$repo/out/demo
mkdir -p "$out"
say() { printf '\n== %s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
qpid=""
cleanup() {
	[ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
	ip netns del $ns 2>/dev/null || true
	[ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

say "building the Debian host's images (cached by what goes into them: .cache/debian-host)"
t0=$SECONDS
dir=$(scripts/debian-host.sh 2> >(sed 's/^/   /' >&2))
read -r old new < <(sed 's/old=\(\S*\) new=\(\S*\)/\1 \2/' "$dir/kernels")
note "images in $dir ($((SECONDS - t0)) s); kernels: old $old, new $new"

say "booting the host on $old (nested emulation: about a minute to SSH)"
ip netns del $ns 2>/dev/null || true
ip netns add $ns
ip -n $ns tuntap add dev $tap mode tap
ip -n $ns addr add 10.80.0.1/24 dev $tap
ip -n $ns link set $tap up
ip -n $ns link set lo up
for img in root images; do
	qemu-img create -q -f qcow2 -F raw -b "$dir/$img.img" "$work/$img.qcow2"
done
port=2222
# QEMU runs in the namespace: its tap is there, and so is its forwarded SSH
# port (127.0.0.1:2222 inside the namespace).
ip netns exec $ns qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 $(cat "$dir/machine-args") \
	-nographic -nodefaults -no-reboot -serial file:"$work/console.log" -monitor none \
	-kernel "$dir/boot/vmlinuz-$old" -initrd "$dir/boot/initramfs-$old.img" -append "$(cat "$dir/cmdline")" \
	-drive file="$work/root.qcow2",if=virtio,format=qcow2 -drive file="$work/images.qcow2",if=virtio,format=qcow2 \
	-netdev user,id=mgmt,hostfwd=tcp:127.0.0.1:$port-:22 -device virtio-net-pci,netdev=mgmt,mac=52:54:00:4c:55:01 \
	-netdev tap,id=guests,ifname=$tap,script=no,downscript=no -device virtio-net-pci,netdev=guests,mac=52:54:00:4c:55:02 \
	2>>"$work/qemu.log" &
qpid=$!
ssh_opts=(-i "$dir/id_ed25519" -o UserKnownHostsFile="$dir/known_hosts" -o HostKeyAlias=lu-debian-host
	-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR -p $port)
host() { ip netns exec $ns ssh "${ssh_opts[@]}" root@127.0.0.1 "$@"; }
wait_for() { # wait_for WHAT SECONDS CMD…: until CMD succeeds, a line every 30 s
	local what=$1 max=$2 t=$SECONDS next=$((SECONDS + 30)); shift 2
	until "$@" >/dev/null 2>&1; do
		kill -0 $qpid 2>/dev/null || { echo "the host's VM exited; its console: $work/console.log"; KEEP=1; exit 1; }
		((SECONDS - t < max)) || { echo "no $what within $max s; the host's console: $work/console.log"; KEEP=1; exit 1; }
		if ((SECONDS >= next)); then
			note "waiting for $what ($((SECONDS - t)) s)"
			next=$((SECONDS + 30))
		fi
		sleep 1
	done
	note "$what after $((SECONDS - t)) s"
}
wait_for "SSH" 600 host true
note "$(host 'systemd-analyze time | head -1')"

say "waiting for libvirt's guest (autostarted; its own boot under nested emulation takes minutes)"
beat() { host "grep '^HB seq=' /var/log/libvirt/qemu/heartbeat-serial.log | tail -1"; }
beating() { host "grep -q '^HB seq=5 ' /var/log/libvirt/qemu/heartbeat-serial.log"; }
wait_for "the guest's heartbeat" 900 beating
first=$(beat)
note "guest: $first"
note "libvirt: $(host 'virsh -c qemu:///system list | sed -n 3p' | tr -s ' ')"

inv=$work/inventory.ini
printf "[kvm_hosts]\nlu-debian-host ansible_host=127.0.0.1 ansible_port=%s ansible_user=root ansible_ssh_private_key_file=%s ansible_python_interpreter=/usr/bin/python3 ansible_ssh_common_args='%s'\n" \
	$port "$dir/id_ed25519" "-o UserKnownHostsFile=$dir/known_hosts -o HostKeyAlias=lu-debian-host -o StrictHostKeyChecking=yes -o ServerAliveInterval=5 -o ServerAliveCountMax=3" >"$inv"

from=$old to=$new
pid0=$(host cat /run/libvirt/qemu/heartbeat.pid)
for i in $(seq "$updates"); do
	say "update $i: $from → $to — liveupdate's plan (libvirt's daemon stopped for it: liveupdate and libvirt take turns)"
	host "systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket; liveupdate plan; systemctl start libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket libvirtd.service" | sed 's/^/   /'

	say "update $i: the Ansible playbook (ansible/playbook.yml) updates the host"
	t0=$SECONDS
	rc=0
	ip netns exec $ns env ANSIBLE_NOCOLOR=1 ANSIBLE_RETRY_FILES_ENABLED=0 ANSIBLE_LOCAL_TEMP="$work/ansible" \
		ansible-playbook -i "$inv" ansible/playbook.yml -e liveupdate_kernel_version="$to" >"$work/playbook-$i.log" 2>&1 || rc=$?
	grep -E '^(TASK|ok|changed|fatal|failed)|"msg"|lu-debian-host +:' "$work/playbook-$i.log" | sed 's/^/   /' || true
	if ((rc != 0)); then
		echo "the playbook failed (exit $rc): $work/playbook-$i.log; the host's console: $work/console.log"
		KEEP=1
		exit 1
	fi
	note "playbook done in $((SECONDS - t0)) s"

	say "update $i: liveupdate status on the host"
	host "liveupdate status --state-dir /mnt/pmem/liveupdate; liveupdate status --state-dir /mnt/pmem/liveupdate --svg /tmp/timeline.svg >/dev/null" | sed 's/^/   /'
	host cat /tmp/timeline.svg >"$out/timeline-$i.svg"
	note "timeline picture: $out/timeline-$i.svg"
	note "guest: $(beat)"
	note "libvirt: $(host 'virsh -c qemu:///system list | sed -n 3p' | tr -s ' '), QEMU pid $(host cat /run/libvirt/qemu/heartbeat.pid)"
	tmp=$from from=$to to=$tmp
done

last=$(beat)
kernel=$(host uname -r)
boot0=$(sed 's/.* boot=\(\S*\) .*/\1/' <<<"$first") boot1=$(sed 's/.* boot=\(\S*\) .*/\1/' <<<"$last")
seq0=$(sed 's/^HB seq=\([0-9]*\) .*/\1/' <<<"$first") seq1=$(sed 's/^HB seq=\([0-9]*\) .*/\1/' <<<"$last")
state=$(host 'virsh -c qemu:///system domstate heartbeat')
if [ "$boot0" != "$boot1" ] || ((seq1 <= seq0)) || ! grep -q 'mem=ok' <<<"$last" || [ "$state" != running ]; then
	echo "NOT verified: guest before: $first; after: $last; libvirt says $state"
	KEEP=1
	exit 1
fi
echo
echo "verified: $updates live kernel updates of the Debian host (now $kernel), driven by Ansible; libvirt's guest ran throughout — same boot $boot0, heartbeat $seq0 → $seq1, RAM checksum ok, libvirt runs it (QEMU pid $pid0 → $(host cat /run/libvirt/qemu/heartbeat.pid))"
