package qemutests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDebianHostUpdate is the fleet operator's update of a real Debian KVM
// host (scripts/debian-host.sh) by the project's Ansible playbook, run from
// this machine over SSH (QEMU user networking, a forwarded port): the host
// boots the old kernel (this project's PID 1, handed over to systemd),
// libvirt autostarts its guest (RAM on PMEM, a qcow2 disk on the images
// filesystem of the host's fstab, its disk writer acknowledging records, a
// NIC on br0, the agent), and a second guest runs outside libvirt with two
// NUMA nodes, each one's RAM on its own host node's PMEM. First the bad
// paths on this host: two updates refused before anything is touched (a
// command line without the host's memmap=, a file that is no kernel); the
// playbook's gate stops the wave on two unsafe
// guests, touching nothing; the updater killed just before its kexec, then
// `liveupdate recover` and libvirt's daemon started, as the README says.
// Then the update by the playbook to the new kernel: every guest kept and
// in place, libvirt managing its own, the host's boot finished. With
// LIVEUPDATE_NESTED_FULL=1 two more kexecs: back to the old kernel with a
// third guest whose restore fails, and to the new one with the manifest
// cut short (PID 1's rescue shell, recover --host, then the host's boot).
// Last, after libvirt's ACPI shutdown, every acknowledged record on the
// guest's image.
func TestDebianHostUpdate(t *testing.T) {
	if _, err := exec.LookPath("ansible-playbook"); err != nil {
		t.Fatal("ansible-playbook is not installed (scripts/setup.sh installs ansible-core)")
	}
	h := bootDebianHost(t, "old")
	// On failure: the guest's console (its served= count tells a guest
	// that stopped answering from answers lost on the way), libvirt's
	// view and daemon log, and liveupdate's record.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		out, _ := h.ssh(2*time.Minute, "tail -n 15 /var/log/libvirt/qemu/heartbeat-serial.log; tail -n 30 /var/log/libvirt/qemu/heartbeat.log; "+
			"virsh -c qemu:///system list --all; cat /run/libvirt/qemu/heartbeat.pid; echo; pgrep -af qemu-system; "+
			"systemctl status --no-pager liveupdate-machines.service libvirtd.service | cat; journalctl -b --no-pager -u liveupdate-machines.service -u libvirtd.service | tail -n 40; grep -E 'qemuProcessReconnect|qemuProcessStop|error :|NoMachine|virCgroup|Failed' /var/log/libvirt/libvirtd-debug.log | tail -n 80; "+
			"liveupdate status --state-dir /mnt/pmem/liveupdate")
		t.Logf("the host after the failure:\n%s", out)
	})
	start := time.Now()
	h.checkBooted(t, "old", start)
	first := h.waitGuestBeats(t, start)
	acks := h.guestAcks(t)
	tapBefore := h.tapPersist(t)
	echo := watchEcho(t, dhNS, dhGuest+":7007")
	defer close(echo.stop)
	beats := watchBeats(dhNS, dhGuest+":7008")
	defer close(beats.stop)
	numa := startNUMAGuest(t, h)
	bootID := strings.TrimSpace(h.mustSSH("cat /proc/sys/kernel/random/boot_id"))

	nw := kernelVersion(t, "new")
	if !t.Run("Refusals", func(t *testing.T) { refusals(t, h, numa, nw, bootID) }) ||
		!t.Run("GateStopsTheWave", func(t *testing.T) { gateStopsWave(t, h, nw, bootID, h.libvirtQEMU(t)) }) ||
		!t.Run("CrashBeforeKexec", func(t *testing.T) { crashBeforeKexec(t, h, numa, nw, bootID) }) {
		return
	}
	if _, err := echo.takeGap(); err != nil {
		t.Fatalf("the TCP connection into the guest broke before the update: %v", err)
	}
	beats.takeGap()
	qemuBefore := h.libvirtQEMU(t)
	numaBefore := numa.pid(t)

	out, err := h.playbook(t, "liveupdate_kernel_version="+nw)
	if err != nil {
		t.Fatalf("the playbook failed: %v; PID 1 on the console:\n%s", err, pid1Lines(h.console()))
	}
	for _, want := range []string{"Every guest runs", "heartbeat: running, blackout", "numa: running, blackout", "libvirt manages its guests again"} {
		if !strings.Contains(out, want) {
			t.Errorf("the playbook's output does not say %q", want)
		}
	}
	if got := strings.TrimSpace(h.mustSSH("uname -r")); got != nw {
		t.Errorf("host runs %s after the update, want %s", got, nw)
	}
	if st := strings.TrimSpace(h.mustSSH("systemctl is-active libvirtd.service; systemctl is-system-running || true")); st != "active\nrunning" {
		failed, _ := h.ssh(time.Minute, "systemctl --failed --no-legend --plain; journalctl -b -p err --no-pager | tail -40")
		t.Errorf("after the update libvirtd and the system are %q, want active and running:\n%s", st, failed)
	}
	// libvirt took the restored QEMU back: its record names the new
	// QEMU (PID 1 started it), the guest runs, and it stays so.
	qemuAfter := h.libvirtQEMU(t)
	if qemuAfter == qemuBefore {
		t.Errorf("libvirt's guest still runs under QEMU pid %d: was it restored?", qemuAfter)
	}
	after, _ := waitGuestState(t, dhNS, dhGuest+":7008", 4*time.Minute)
	if after.boot != first.boot || after.seq <= first.seq || after.mem != "ok" {
		t.Errorf("guest after the update: %+v, before %+v: rebooted, stalled or its RAM changed", after, first)
	}
	gap, err := echo.takeGap()
	if err != nil {
		t.Errorf("the TCP connection into the guest broke: %v", err)
	}
	acks = h.waitGuestAcksPast(t, acks, 4*time.Minute)
	// The guest's clock, put right after the restore through its agent.
	clock, _ := h.ssh(time.Minute, "liveupdate status --json --state-dir /mnt/pmem/liveupdate")
	_, lag := waitGuestState(t, dhNS, dhGuest+":7008", time.Minute)
	if lag < -3*time.Second || lag > 3*time.Second {
		t.Errorf("guest clock − host clock = %s after the update; status: %s", lag, clock)
	}
	if got := h.tapPersist(t); got != tapBefore {
		t.Errorf("the guest's tap is %q after the update, %q before (it would outlive its QEMU, or vanish with a fd)", got, tapBefore)
	}
	// The guest outside libvirt: restored, its RAM as it was, each
	// backend's file on its node's PMEM and bound to that node again.
	numa.checkKept(t, numaBefore)
	if st := h.statusGuests(t); st["numa"] != "running" || st["heartbeat"] != "running" {
		t.Errorf("liveupdate status after the update: %v", st)
	}
	time.Sleep(10 * time.Second) // libvirt must keep it, not stop it a moment later
	if q := h.libvirtQEMU(t); q != qemuAfter {
		t.Errorf("libvirt's guest moved from QEMU pid %d to %d after the update", qemuAfter, q)
	}
	h.checkMachine(t, qemuAfter)
	t.Logf("updated to %s: guest kept (boot %s, seq %d → %d), QEMU pid %d → %d under libvirt, TCP echo longest gap %s, heartbeat longest gap %s, disk ACK %d, clock off by %s",
		nw, after.boot, first.seq, after.seq, qemuBefore, qemuAfter, gap.Round(time.Millisecond),
		beats.takeGap().Round(time.Millisecond), acks, lag.Round(time.Millisecond))

	// Two more kexecs: minutes under nested emulation, which CI's half
	// hour cannot spare; make soak runs them.
	if os.Getenv("LIVEUPDATE_NESTED_FULL") != "" {
		old := kernelVersion(t, "old")
		if !t.Run("OneRestoreFails", func(t *testing.T) { oneRestoreFails(t, h, numa, old) }) ||
			!t.Run("CorruptManifestAfterKexec", func(t *testing.T) { corruptManifest(t, h, numa, nw) }) {
			return
		}
	}

	// Last: the guest shut down by libvirt (ACPI), its image read here.
	t.Run("DiskRecords", func(t *testing.T) {
		h.mustSSH("virsh -c qemu:///system shutdown heartbeat")
		deadline := time.Now().Add(3 * time.Minute)
		for {
			st, _ := h.ssh(time.Minute, "virsh -c qemu:///system domstate heartbeat")
			if strings.HasPrefix(st, "shut off") {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("the guest did not shut down within 3 min of libvirt's ACPI shutdown (%q): destroyed", st)
				h.ssh(time.Minute, "virsh -c qemu:///system destroy heartbeat")
				break
			}
			time.Sleep(3 * time.Second)
		}
		acked := h.guestAcks(t)
		img := filepath.Join(t.TempDir(), "heartbeat.qcow2")
		if err := h.fetch("/var/lib/libvirt/images/heartbeat.qcow2", img); err != nil {
			t.Fatal(err)
		}
		n, err := checkImage(img, "qcow2", acked, first.boot, false)
		if err != nil {
			t.Fatalf("the guest's disk after the update: %v", err)
		}
		t.Logf("the guest's qcow2 image holds all %d records it acknowledged, intact", n)
	})
}

// waitGuestBeats waits for libvirt's guest to beat over br0 (a nested boot
// under TCG: minutes) and returns its state.
func (h *debianHost) waitGuestBeats(t *testing.T, start time.Time) beat {
	t.Helper()
	h.checkGuest(t, start)
	// The guest answered moments ago, but a guest still booting under
	// nested TCG can starve for minutes (once no answer within 1 min just
	// after its heartbeat 11 came, 7.5 min after the host's start).
	b, _ := waitGuestState(t, dhNS, dhGuest+":7008", 4*time.Minute)
	return b
}

// guestAcks is the highest record libvirt's guest acknowledged on its
// serial console (a file libvirt keeps on the host).
func (h *debianHost) guestAcks(t testing.TB) uint64 {
	out, code := h.ssh(time.Minute, "tail -n 200 /var/log/libvirt/qemu/heartbeat-serial.log")
	if code != 0 {
		t.Fatalf("reading the guest's console: exit %d %s", code, out)
	}
	ns, errLine := parseAcks([]byte(out))
	if errLine != "" {
		t.Fatalf("the guest's disk writer stopped: %s", errLine)
	}
	return highest(ns)
}

func (h *debianHost) waitGuestAcksPast(t testing.TB, n uint64, d time.Duration) uint64 {
	return waitAckPast(t, n, d, 3*time.Second, func() uint64 { return h.guestAcks(t) }, func() string { return "" })
}

// libvirtQEMU is the pid libvirt's record gives for the guest, checked
// against the QEMU that runs it.
func (h *debianHost) libvirtQEMU(t testing.TB) int {
	out := h.mustSSH("cat /run/libvirt/qemu/heartbeat.pid; echo; virsh -c qemu:///system domstate heartbeat; pgrep -f 'guest=heartbeat' | head -1")
	f := strings.Fields(out)
	if len(f) < 3 || f[1] != "running" {
		t.Fatalf("libvirt's view of the guest: %q", out)
	}
	pid, _ := strconv.Atoi(f[0])
	if f[len(f)-1] != f[0] {
		t.Errorf("libvirt's record says pid %s, the QEMU running the guest is %s", f[0], f[len(f)-1])
	}
	return pid
}

// tapPersist is the persistence of libvirt's tap for the guest ("persist
// on" or "persist off", as ip -d link shows it).
func (h *debianHost) tapPersist(t testing.TB) string {
	out := h.mustSSH("ip -d link show vnet0")
	m := regexp.MustCompile(`persist (on|off)`).FindString(out)
	if m == "" {
		t.Fatalf("ip -d link show vnet0 shows no persistence:\n%s", out)
	}
	return m
}

// fetch copies a file of the host to local over SSH.
func (h *debianHost) fetch(remote, local string) error {
	f, err := os.Create(local)
	if err != nil {
		return err
	}
	defer f.Close()
	c := exec.Command("ssh", h.sshArgs("cat "+remote)...)
	var stderr strings.Builder
	c.Stdout, c.Stderr = f, &stderr
	if err := c.Run(); err != nil {
		return fmt.Errorf("ssh cat %s: %v %s", remote, err, stderr.String())
	}
	return nil
}

// pid1Lines is what this project's PID 1 printed in the console's last
// boot (its log lines and messages), for a failure report.
func pid1Lines(console string) string {
	if i := strings.LastIndex(console, "Linux version"); i >= 0 {
		console = console[i:]
	}
	var out []string
	for _, l := range strings.Split(console, "\n") {
		if strings.Contains(l, "liveupdate") || strings.Contains(l, "level=") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
