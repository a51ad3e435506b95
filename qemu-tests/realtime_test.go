package qemutests

import (
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRestartScheduling: a restart raises the new QEMU's threads to
// real-time priority for the load, its vCPUs until just before the cont
// (a run cut off there shows them so), and gives every thread of the QEMU
// that runs the guest afterwards the scheduling the old QEMU's had — an
// operator's renice on all of them, libvirt's <vcpusched> on vCPU 0 — with
// none left at real-time priority: after a restart, and after a run cut
// off between load and cont whose old QEMU is gone, once recovered.
func TestRestartScheduling(t *testing.T) {
	gs := bootAll(t, guestSpec{name: "rt1", extra: []string{"-smp", "2"}})
	g := gs[0]
	vcpus := func() map[int]int { // cpu-index → thread id, of the QEMU the monitor reaches
		var cpus []struct {
			CPUIndex int `json:"cpu-index"`
			ThreadID int `json:"thread-id"`
		}
		g.qmpExecute("query-cpus-fast", nil, &cpus)
		out := map[int]int{}
		for _, c := range cpus {
			out[c.CPUIndex] = c.ThreadID
		}
		if len(out) != 2 {
			t.Fatalf("query-cpus-fast: %d vCPUs, want 2", len(out))
		}
		return out
	}
	niced := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_NORMAL, Nice: 5}
	rr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_RR, Priority: 3}
	for _, tid := range threadsOf(t, g.pid()) {
		if err := unix.SchedSetAttr(tid, &niced, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.SchedSetAttr(vcpus()[0], &rr, 0); err != nil {
		t.Fatal(err)
	}
	// check: vCPU 0 round-robin 3, every other thread normal with nice 5.
	check := func(when string) {
		t.Helper()
		pid, v := g.pid(), vcpus()
		for _, tid := range threadsOf(t, pid) {
			a, err := unix.SchedGetAttr(tid, 0)
			if err != nil {
				continue // ended meanwhile
			}
			want := niced
			if tid == v[0] {
				want = rr
			}
			if a.Policy != want.Policy || a.Priority != want.Priority || a.Nice != want.Nice {
				t.Errorf("%s: QEMU pid %d thread %d (vCPU 0: %v): policy %d priority %d nice %d, want policy %d priority %d nice %d",
					when, pid, tid, tid == v[0], a.Policy, a.Priority, a.Nice, want.Policy, want.Priority, want.Nice)
			}
		}
	}

	before, _ := g.lastBeat()
	if code, out, errOut := runLU(t, "restart-qemu", "--state-dir", t.TempDir(), "rt1"); code != 0 {
		t.Fatalf("restart-qemu: exit %d\n%s\n%s", code, out, errOut)
	}
	check("after restart-qemu")
	before = g.checkContinues(before)

	// Cut off between the load and cont: the new QEMU (the pidfile's) is
	// still raised, the old one paused (lowered after its save).
	oldPID := g.pid()
	state := t.TempDir()
	code, _, _ := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=load=kill"}, "restart-qemu", "--state-dir", state, "rt1")
	if code != 128+int(syscall.SIGKILL) {
		t.Fatalf("restart-qemu with load=kill: exit %d", code)
	}
	newPID, v := g.pid(), vcpus()
	if newPID == oldPID {
		t.Fatalf("the pidfile still names the old QEMU %d", oldPID)
	}
	// Its vCPU threads too: the guest does not run there before the cont,
	// and the load waits for them. (vCPU 0 may already have its owner's
	// round-robin 3, set before the load: real-time, and left so.)
	raised, vcpusRaised := 0, 0
	for _, tid := range threadsOf(t, newPID) {
		if a, err := unix.SchedGetAttr(tid, 0); err == nil && (a.Policy == unix.SCHED_FIFO || a.Policy == unix.SCHED_RR) {
			if tid == v[0] || tid == v[1] {
				vcpusRaised++
			} else {
				raised++
			}
		}
	}
	if raised == 0 || vcpusRaised != 2 {
		t.Errorf("new QEMU pid %d during its load: %d threads at real-time priority, %d of its 2 vCPU threads; want some, and both", newPID, raised, vcpusRaised)
	}
	// The old QEMU gone: recover continues the loaded one.
	syscall.Kill(oldPID, syscall.SIGKILL)
	recoverAll(t, state)
	if g.pid() != newPID {
		t.Fatalf("recover: QEMU %d runs the guest, want the loaded one %d", g.pid(), newPID)
	}
	check("after recover")
	g.checkContinues(before)
}

// threadsOf lists process pid's threads.
func threadsOf(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, tid)
		}
	}
	return out
}
