package qemutests

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
)

// TestRestartTransfer: restart-qemu hands a guest started with -machine
// aux-ram-share=on over by QEMU's cpr-transfer — no state file, the device
// state streamed to the new QEMU — and its neighbour without it the
// cpr-reboot way, in one run; with --each too, and with --no-transfer both
// go the cpr-reboot way. Each time: a new QEMU runs each guest, the old one
// is gone, heartbeats go on with the same boot id and an intact RAM
// checksum, every acknowledged disk record is on the image, and the
// transfer's sockets are gone from the state directory.
func TestRestartTransfer(t *testing.T) {
	gs := bootAll(t,
		guestSpec{name: "x1", extra: []string{"-machine", "aux-ram-share=on"},
			disk: &diskSpec{format: "qcow2", frontend: "blockdev", cache: "none", aio: "threads"}},
		guestSpec{name: "r1"})
	for _, c := range []struct {
		name     string
		args     []string
		transfer bool // x1 goes by cpr-transfer
	}{
		{"AllTogether", nil, true},
		{"Each", []string{"--each"}, true},
		{"NoTransfer", []string{"--no-transfer"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, g := range gs {
				g.t = t
			}
			var pids []int
			var last []beat
			for _, g := range gs {
				pids = append(pids, g.pid())
				b, _ := g.lastBeat()
				last = append(last, b)
			}
			state := t.TempDir()
			args := append(append([]string{"restart-qemu", "--state-dir", state}, c.args...), "x1", "r1")
			if code, _, _ := runLU(t, args...); code != 0 {
				t.Fatalf("restart-qemu exit %d", code)
			}
			for i, g := range gs {
				g.checkContinues(last[i])
				if g.pid() == pids[i] || alive(pids[i]) {
					t.Errorf("%s: QEMU pid %d before, %d after, old alive %v: want a new QEMU and the old one gone", g.name, pids[i], g.pid(), alive(pids[i]))
				}
			}
			m, err := manifest.Read(filepath.Join(state, manifest.FileName))
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range m.VMs {
				if v.Status != manifest.StatusRunning || v.Blackout() <= 0 {
					t.Errorf("%s: status %s, blackout %v: want running, its blackout measured", v.Name, v.Status, v.Blackout())
				}
				wantTransfer := c.transfer && v.Name == "x1"
				if (v.Transfer != nil) != wantTransfer {
					t.Errorf("%s: transfer %+v, want cpr-transfer %v", v.Name, v.Transfer, wantTransfer)
				}
				saved, _ := os.ReadFile(filepath.Join(state, v.Name+".state.done"))
				if isNote := strings.HasPrefix(string(saved), "cpr-transfer:"); isNote != wantTransfer || (!wantTransfer && v.StateSize == 0) {
					t.Errorf("%s: its state file (%d bytes, recorded %d) is a transfer's note: %v, want %v", v.Name, len(saved), v.StateSize, isNote, wantTransfer)
				}
				t.Logf("%s: %s, blackout %v", v.Name, map[bool]string{true: "cpr-transfer", false: "cpr-reboot"}[v.Transfer != nil], v.Blackout())
			}
			socks, _ := filepath.Glob(filepath.Join(state, "*.sock"))
			if len(socks) > 0 {
				t.Errorf("sockets left in the state directory: %v", socks)
			}
			if c.transfer {
				// The new QEMU ran without -S: its run trace says it went
				// from its load to running by itself, and when — the
				// blackout's end the manifest records.
				trace, _ := os.ReadFile(filepath.Join(state, "x1.run.trace"))
				at, ok := qemuproc.StartedAt(string(trace))
				if !regexp.MustCompile(`\(inmigrate\) new_state \d+ \(running\)`).Match(trace) || !ok {
					t.Errorf("x1's run trace, want a stamped inmigrate → running:\n%s", trace)
				}
				for _, v := range m.VMs {
					if v.Name == "x1" && !v.Resumed.Equal(at) {
						t.Errorf("x1 resumed at %v by the manifest, %v by its run trace", v.Resumed, at)
					}
				}
			}
		})
	}
	// Last, as it loses x1: its new QEMU killed once it ran the guest (no
	// -S: the moment its load ended). The guest went with it; what must
	// not happen is its old QEMU going on — its device state is behind the
	// RAM the new one ran — neither in the run nor in recover, and its RAM
	// file stays.
	t.Run("NewQEMUDiesAfterRunning", func(t *testing.T) {
		g := gs[0]
		g.t = t
		old := g.pid()
		state := t.TempDir()
		code, _, errOut := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=load:x1=killnew"},
			"restart-qemu", "--state-dir", state, "x1")
		if !strings.Contains(errOut, "FAULT INJECTED") {
			t.Fatalf("the fault never fired (exit %d):\n%s", code, errOut)
		}
		if code == 0 || !strings.Contains(errOut, "ran the guest and then ended") || !strings.Contains(errOut, "not continued") {
			t.Errorf("restart-qemu: exit %d, want a failure saying the new QEMU ran the guest and ended, the old one not continued:\n%s", code, errOut)
		}
		if alive(old) {
			t.Errorf("x1's old QEMU pid %d still lives after its new one ran the guest", old)
		}
		code, out, errOut := runLU(t, "recover", "--state-dir", state)
		if code == 0 || !regexp.MustCompile(`x1 +failed`).MatchString(out) || regexp.MustCompile(`x1 +(resumed|restored|running)`).MatchString(out) {
			t.Errorf("recover: exit %d, want x1 failed, neither resumed nor restored:\n%s%s", code, out, errOut)
		}
		for _, f := range g.ramFile {
			if _, err := os.Stat(f); err != nil {
				t.Errorf("x1's RAM file: %v", err)
			}
		}
	})
}

// TestRestartMemfd: a guest whose RAM is a memfd (memory-backend-memfd)
// lives only as long as its QEMU holds it, and only QEMU's cpr-transfer
// hands a memfd to a new QEMU. Started with -machine aux-ram-share=on it is
// restarted so — new QEMU, old gone, same boot, RAM checksum intact — while
// an update refuses it (a kexec would lose it) and so do restart-qemu
// --no-transfer and --sequential, touching nothing. Without aux-ram-share=on
// plan refuses it, naming the fix.
func TestRestartMemfd(t *testing.T) {
	memfd := func(aux string) []string {
		return []string{"-m", "256", "-machine", "pc,memory-backend=ram0" + aux,
			"-object", "memory-backend-memfd,id=ram0,size=256M,share=on"}
	}
	gs := bootAll(t, guestSpec{name: "mfd", memory: memfd(",aux-ram-share=on")}, guestSpec{name: "mfdplain", memory: memfd("")})
	g, plain := gs[0], gs[1]
	state := t.TempDir()

	code, out, _ := runLU(t, "plan", "--state-dir", state, "mfdplain")
	if code != 3 || !strings.Contains(out, `memory backend "ram0" (memory-backend-memfd`) || !strings.Contains(out, "Start it with -machine aux-ram-share=on") {
		t.Errorf("plan of a memfd guest without aux-ram-share=on: exit %d, want 3 naming the backend and the fix:\n%s", code, out)
	}
	code, out, _ = runLU(t, "plan", "--state-dir", state, "mfd")
	if code != 0 || !regexp.MustCompile(`(?m)^mfd +\d+ .* memfd +restart only$`).MatchString(out) || !strings.Contains(out, "mfd: not for an update: ") {
		t.Errorf("plan of a memfd guest with aux-ram-share=on: exit %d, want 0, its RAM shown as memfd, verdict restart only, the update's reason:\n%s", code, out)
	}
	code, out, errOut := runLU(t, "update", "--dry-run", "--state-dir", state, "--kernel", guestKernel, "--initrd", guestInitrd)
	if code != 3 || !strings.Contains(out+errOut, "a kexec loses a memfd's RAM") || !strings.Contains(out, "mfd (pid ") || !strings.Contains(out, "RAM: ram0 memfd") {
		t.Errorf("update --dry-run with a memfd guest: exit %d, want 3 saying a kexec loses it:\n%s%s", code, out, errOut)
	}
	for _, refused := range [][]string{{"--no-transfer"}, {"--sequential"}} {
		pid := g.pid()
		last, _ := g.lastBeat()
		code, _, errOut := runLU(t, append(append([]string{"restart-qemu", "--state-dir", t.TempDir()}, refused...), "mfd")...)
		if code == 0 || !strings.Contains(errOut, `memory backend "ram0" is a memfd, which only QEMU's cpr-transfer hands to a new QEMU`) {
			t.Errorf("restart-qemu %v of a memfd guest: exit %d, want a refusal naming the memfd:\n%s", refused, code, errOut)
		}
		if g.pid() != pid {
			t.Fatalf("restart-qemu %v: the guest moved from QEMU %d to %d", refused, pid, g.pid())
		}
		g.checkContinues(last)
	}

	pid := g.pid()
	last, _ := g.lastBeat()
	if code, _, _ := runLU(t, "restart-qemu", "--state-dir", state, "mfd"); code != 0 {
		t.Fatalf("restart-qemu of the memfd guest: exit %d", code)
	}
	g.checkContinues(last)
	if g.pid() == pid || alive(pid) {
		t.Errorf("QEMU pid %d before, %d after, old alive %v: want a new QEMU and the old one gone", pid, g.pid(), alive(pid))
	}
	m, err := manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		t.Fatal(err)
	}
	if v := m.VMs[0]; v.Transfer == nil || v.Status != manifest.StatusRunning {
		t.Errorf("mfd: status %s, transfer %+v: want running, by cpr-transfer", v.Status, v.Transfer)
	} else {
		t.Logf("mfd: memfd RAM handed over by cpr-transfer, blackout %v", v.Blackout())
	}
	plainLast, _ := plain.lastBeat()
	plain.checkContinues(plainLast)
}
