package qemutests

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDiscardData: a guest whose RAM backend has discard-data=on (QEMU
// punches the RAM file out when it quits) is restarted, both ways, and
// survives; and a restore that fails after its old QEMU quit keeps the RAM
// for recover (a new QEMU is killed, never quit). Before the fix the
// sequential restart lost the guest ("loading … failed").
func TestDiscardData(t *testing.T) {
	ram := "/dev/shm/lu-test-dd.ram"
	g := bootAll(t, guestSpec{name: "dd", memory: []string{"-m", "256", "-machine", "pc,memory-backend=ram0",
		"-object", "memory-backend-file,id=ram0,size=256M,mem-path=" + ram + ",share=on,discard-data=on"}})[0]
	for _, c := range []struct {
		name  string
		args  []string
		fault string
	}{
		{"sequential", []string{"--sequential"}, ""},
		{"early", nil, ""},
		{"sequential, load fails, recover", []string{"--sequential"}, "load=fail"},
		{"early, load fails, back on the old QEMU", nil, "load=fail"},
	} {
		t.Run(c.name, func(t *testing.T) {
			g.t = t
			before, _ := g.lastBeat()
			state := t.TempDir()
			args := append(append([]string{"restart-qemu", "--state-dir", state}, c.args...), "dd")
			if c.fault == "" {
				if code, _, errOut := runLU(t, args...); code != 0 {
					t.Fatalf("restart-qemu: exit %d\n%s", code, errOut)
				}
			} else {
				code, _, errOut := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=" + c.fault}, args...)
				if !strings.Contains(errOut, "FAULT INJECTED") {
					t.Fatalf("the fault never fired (exit %d)", code)
				}
				recoverAll(t, state)
			}
			g.checkContinues(before)
			var st struct{ Size int64 }
			if fi, err := os.Stat(ram); err != nil || fi.Size() != 256<<20 {
				t.Errorf("RAM file after the restart: %v %v", fi, err)
			}
			_ = st
			// The QEMU that runs the guest has discard-data back on.
			var on bool
			g.qmpExecute("qom-get", map[string]any{"path": "/objects/ram0", "property": "discard-data"}, &on)
			if !on {
				t.Errorf("discard-data is off on the QEMU that runs the guest: its own setting was not given back")
			}
		})
	}
}

// TestRefuseUnreopenableRAM: RAM that cannot be found again by name after
// its QEMU is gone — mem-path a directory (QEMU keeps the RAM in an
// unlinked file inside it, hugetlbfs' usual form) — is refused by plan
// with the reason and the fix, and restart-qemu touches nothing.
func TestRefuseUnreopenableRAM(t *testing.T) {
	dir := t.TempDir()
	g := bootAll(t, guestSpec{name: "dirram", memory: []string{"-m", "256", "-machine", "pc,memory-backend=ram0",
		"-object", "memory-backend-file,id=ram0,size=256M,mem-path=" + dir + ",share=on"}})[0]
	refusedUntouched(t, g, []string{"--sequential"}, "mem-path "+dir+" is a directory", "Give mem-path a file name")
}

// TestRestartInheritedMemfd: RAM whose mem-path is an fd QEMU inherited
// (/proc/self/fd/3, a memfd `liveupdate exec-memfd` made before it exec'd
// QEMU: the guest's RAM lives in its QEMU alone). plan shows it as memfd-fd;
// an update here refuses it (this kernel has no /dev/liveupdate);
// restart-qemu --sequential refuses before touching anything (nothing would
// hold the RAM between the quit and the new QEMU's start); restart-qemu
// hands the very memfd to the new QEMU started beside the old one — twice,
// the second time by --each, from a QEMU that got it renumbered — and the
// guest runs on with its RAM. An inherited fd that is a plain file is
// refused with the fix.
func TestRestartInheritedMemfd(t *testing.T) {
	plainRAM, err := os.CreateTemp(t.TempDir(), "ram")
	if err != nil {
		t.Fatal(err)
	}
	plainRAM.Truncate(256 << 20)
	fdRAM := []string{"-m", "256", "-machine", "pc,memory-backend=ram0",
		"-object", "memory-backend-file,id=ram0,size=256M,mem-path=/proc/self/fd/3,share=on"}
	gs := bootAll(t, guestSpec{name: "fdram", memory: fdRAM, wrapper: []string{filepath.Join(binDir, "liveupdate"), "exec-memfd", "--mib", "256", "--"}},
		guestSpec{name: "fdfile", files: []*os.File{plainRAM}, memory: fdRAM})
	plainRAM.Close()
	g := gs[0]
	refusedUntouched(t, gs[1], nil, "is fd 3, "+plainRAM.Name()+", not a memfd: give mem-path the file's name")

	state := t.TempDir()
	code, out, _ := runLU(t, "plan", "--state-dir", state, "fdram")
	if code != 0 || !regexp.MustCompile(`(?m)^fdram +\d+ .*memfd-fd`).MatchString(out) {
		t.Errorf("plan: exit %d, want 0 with the RAM shown as memfd-fd:\n%s", code, out)
	}
	if _, err := os.Stat("/dev/liveupdate"); err != nil {
		code, out, errOut := runLU(t, "update", "--dry-run", "--state-dir", state, "--kernel", guestKernel, "--initrd", guestInitrd, "fdram")
		if code != 3 || !strings.Contains(out+errOut, "the running kernel has no /dev/liveupdate") {
			t.Errorf("update --dry-run without LUO: exit %d, want 3 saying the kernel has no /dev/liveupdate:\n%s%s", code, out, errOut)
		}
	}
	pid := g.pid()
	last, _ := g.lastBeat()
	code, _, errOut := runLU(t, "restart-qemu", "--sequential", "--state-dir", t.TempDir(), "fdram")
	if code == 0 || !strings.Contains(errOut, "its RAM is a memfd its QEMU inherited") || !strings.Contains(errOut, "nothing was stopped") {
		t.Errorf("restart-qemu --sequential: exit %d, want a refusal naming the memfd:\n%s", code, errOut)
	}
	if g.pid() != pid {
		t.Fatalf("restart-qemu --sequential: the guest moved from QEMU %d to %d", pid, g.pid())
	}
	last = g.checkContinues(last)
	for _, args := range [][]string{nil, {"--each"}} {
		pid := g.pid()
		code, out, errOut := runLU(t, append(append([]string{"restart-qemu", "--state-dir", t.TempDir()}, args...), "fdram")...)
		if code != 0 {
			t.Fatalf("restart-qemu %v: exit %d\n%s%s", args, code, out, errOut)
		}
		if g.pid() == pid || alive(pid) {
			t.Errorf("restart-qemu %v: QEMU pid %d before, %d after, old alive %v: want a new QEMU and the old one gone", args, pid, g.pid(), alive(pid))
		}
		last = g.checkContinues(last)
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/3", g.pid())); err != nil || !strings.HasPrefix(target, "/memfd:guest-ram0") {
			t.Errorf("restart-qemu %v: the new QEMU's fd 3 is %q (%v), want the guest's memfd", args, target, err)
		}
	}
}

// TestRefuseReplacedRAMFile: the guest's RAM file deleted and another made
// under its name (a clean-up script, a second guest's set-up): the guest
// still runs on the unlinked one, and a new QEMU would start on the
// impostor. plan refuses it, restart-qemu touches nothing.
func TestRefuseReplacedRAMFile(t *testing.T) {
	g := bootAll(t, guestSpec{name: "swapped"})[0]
	ram := g.ramFile[0]
	if err := os.Remove(ram); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ram, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ram, 256<<20); err != nil {
		t.Fatal(err)
	}
	refusedUntouched(t, g, nil, "QEMU does not map the file now at mem-path "+ram, "a new QEMU would start on the wrong RAM")
}

// refusedUntouched checks that plan refuses g's guest (exit 3) saying
// every one of want, that restart-qemu (with args) refuses it saying the
// first, and that the guest runs on under the same QEMU.
func refusedUntouched(t *testing.T, g *guest, args []string, want ...string) {
	t.Helper()
	last, _ := g.lastBeat()
	pid := g.pid()
	state := t.TempDir()
	code, out, _ := runLU(t, "plan", "--state-dir", state, g.name)
	for _, w := range want {
		if code != 3 || !strings.Contains(out, w) {
			t.Errorf("plan: exit %d, want 3 saying %q:\n%s", code, w, out)
		}
	}
	code, _, errOut := runLU(t, append(append([]string{"restart-qemu", "--state-dir", state}, args...), g.name)...)
	if code != 3 || !strings.Contains(errOut, want[0]) {
		t.Errorf("restart-qemu: exit %d, want 3 saying %q:\n%s", code, want[0], errOut)
	}
	if g.pid() != pid {
		t.Fatalf("the guest's QEMU changed: %d → %d", pid, g.pid())
	}
	g.checkContinues(last)
}

// TestPausedStaysPaused: a guest paused before the restart is paused after
// it — restarted both ways, and after a run killed before cont and
// recovered; so is its neighbour started with aux-ram-share=on, which the
// early runs hand over by cpr-transfer (whose new QEMU, without -S, would run
// a guest that ran: it must keep a paused one paused by itself).
func TestPausedStaysPaused(t *testing.T) {
	gs := bootAll(t, guestSpec{name: "paused"}, guestSpec{name: "pausedx", extra: []string{"-machine", "aux-ram-share=on"}})
	for _, g := range gs {
		g.qmpExecute("stop", nil, nil)
	}
	status := func(g *guest) string {
		var st struct{ Status string }
		g.qmpExecute("query-status", nil, &st)
		return st.Status
	}
	for _, c := range []struct {
		name, fault string
		args        []string
	}{
		{"early", "", nil},
		{"sequential", "", []string{"--sequential"}},
		{"sequential, killed before cont, recovered", "load=kill", []string{"--sequential"}},
		{"early, killed after the load, recovered", "load=kill", nil},
		{"early, killed after the transfer's load, recovered", "load:pausedx=kill", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			state := t.TempDir()
			args := append(append([]string{"restart-qemu", "--state-dir", state}, c.args...), "paused", "pausedx")
			if c.fault == "" {
				code, out, errOut := runLU(t, args...)
				if code != 0 {
					t.Fatalf("restart-qemu: exit %d\n%s", code, errOut)
				}
				if c.args == nil && !regexp.MustCompile(`(?m)^pausedx .*none: cpr-transfer`).MatchString(out) {
					t.Errorf("pausedx did not go by cpr-transfer:\n%s", out)
				}
			} else {
				code, _, _ := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=" + c.fault}, args...)
				if code != 128+int(syscall.SIGKILL) {
					t.Fatalf("restart-qemu with %s: exit %d", c.fault, code)
				}
				recoverAll(t, state)
			}
			for _, g := range gs {
				g.t = t
				if s := status(g); s != "paused" {
					t.Errorf("%s is %q after the restart, want paused as it was", g.name, s)
				}
				if _, err := os.Stat(filepath.Join(state, g.name+".state")); err == nil {
					t.Errorf("%s: the state file is still there to be loaded again", g.name)
				}
			}
		})
	}
	// pausedx handed over, then an error (its save's fault point, after
	// the handover: rolled forward), then another in finishing it on the
	// new QEMU, which — the guest paused — never ran it: it goes back to
	// its old QEMU, same pid, its monitor socket back in place, paused
	// there (postmigrate: its migration completed).
	t.Run("handed over, the restart not finished: back on the old QEMU", func(t *testing.T) {
		g := gs[1]
		g.t = t
		pid := g.pid()
		state := t.TempDir()
		code, _, errOut := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=save:pausedx=fail,load:pausedx=fail"},
			"restart-qemu", "--each", "--state-dir", state, "pausedx")
		if code == 0 || !strings.Contains(errOut, "its new QEMU never ran the guest: it goes back to its old QEMU") {
			t.Errorf("restart-qemu: exit %d, want a failure sending pausedx back to its old QEMU:\n%s", code, errOut)
		}
		if got := g.pid(); got != pid || !alive(pid) {
			t.Errorf("pausedx runs on QEMU %d (alive %v), want its old QEMU %d", got, alive(pid), pid)
		}
		if s := status(g); s != "paused" && s != "postmigrate" {
			t.Errorf("pausedx is %q on its old QEMU, want paused (or postmigrate)", s)
		}
		if socks, _ := filepath.Glob(filepath.Join(state, "*.sock")); len(socks) > 0 {
			t.Errorf("the transfer's sockets are left: %v", socks)
		}
	})
	// And they still run when let.
	for _, g := range gs {
		before, _ := g.lastBeat()
		g.qmpExecute("cont", nil, nil)
		g.checkContinues(before)
	}
}

// TestNoSecondQEMU: `restore` of a run whose old QEMU still lives (paused
// after its save: the run was killed before any quit) refuses to start a
// second QEMU on the RAM that QEMU maps — both would run the guest — and
// touches nothing; recover then continues the guest on its old QEMU.
func TestNoSecondQEMU(t *testing.T) {
	g := bootAll(t, guestSpec{name: "twice"})[0]
	before, _ := g.lastBeat()
	pid := g.pid()
	state := t.TempDir()
	if code, _, _ := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=saved=kill"}, "restart-qemu", "--sequential", "--state-dir", state, "twice"); code != 128+int(syscall.SIGKILL) {
		t.Fatalf("restart-qemu with saved=kill: exit %d", code)
	}
	code, out, errOut := runLU(t, "restore", "--state-dir", state)
	if code != 1 || !strings.Contains(out+errOut, "still runs on its RAM file") {
		t.Errorf("restore beside the living old QEMU: exit %d\n%s\n%s", code, out, errOut)
	}
	if g.pid() != pid || !alive(pid) {
		t.Fatalf("the old QEMU changed: %d → %d", pid, g.pid())
	}
	if n := qemusNamed(t, "twice"); n != 1 {
		t.Errorf("%d QEMUs run the guest, want 1", n)
	}
	recoverAll(t, state)
	g.checkContinues(before)
}

// qemusNamed counts the QEMU processes whose command line has -name NAME.
func qemusNamed(t *testing.T, name string) int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "qemu-system") {
			continue
		}
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-name" && strings.HasPrefix(args[i+1], name) && (len(args[i+1]) == len(name) || args[i+1][len(name)] == ',') {
				n++
			}
		}
	}
	return n
}

// TestLoadFailureSaysWhy: when a new QEMU refuses the saved state, the
// error says why in QEMU's own words (they are in its log, not over QMP),
// and the guest goes on on its old QEMU. The "new binary" drops a device
// whose state the saved stream has.
func TestLoadFailureSaysWhy(t *testing.T) {
	g := bootAll(t, guestSpec{name: "why", extra: []string{"-device", "virtio-rng-pci,id=rng0"}})[0]
	before, _ := g.lastBeat()
	wrapper := filepath.Join(t.TempDir(), "qemu-without-rng")
	script := "#!/bin/bash\nargs=()\nfor a in \"$@\"; do [ \"$a\" = virtio-rng-pci,id=rng0 ] && { unset 'args[${#args[@]}-1]'; continue; }; args+=(\"$a\"); done\nexec " + qemuBinary + " \"${args[@]}\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	code, _, errOut := runLU(t, "restart-qemu", "--state-dir", state, "--qemu", wrapper, "why")
	if code != 1 || !strings.Contains(errOut, "QEMU said: ") {
		t.Fatalf("restart-qemu onto a QEMU that refuses the state: exit %d, without QEMU's words:\n%s", code, errOut)
	}
	i := strings.Index(errOut, "QEMU said: ")
	t.Logf("the failure, as the operator reads it: …%s", strings.SplitN(errOut[i:], "\n", 2)[0])
	g.checkContinues(before)
}

// TestFdsetLog: a guest whose serial log is passed as an -add-fd set of an
// O_APPEND file (libvirt's way with its logs) is restarted both ways: the
// new QEMU gets the very file and the guest's console goes on at its end.
func TestFdsetLog(t *testing.T) {
	g := bootAll(t, guestSpec{name: "fdset", serialFdset: true, qmpFD: true})[0]
	for _, seq := range []bool{false, true} {
		before, _ := g.lastBeat()
		state := t.TempDir()
		args := []string{"restart-qemu", "--state-dir", state}
		if seq {
			args = append(args, "--sequential")
		}
		args = append(args, "fdset")
		if code, _, errOut := runLU(t, args...); code != 0 {
			t.Fatalf("restart-qemu (sequential %v): exit %d\n%s", seq, code, errOut)
		}
		g.checkContinues(before)
	}
	b, _ := os.ReadFile(g.serial)
	if strings.Contains(string(b), "\x00") {
		t.Errorf("the serial log has NULs: a QEMU wrote it at an offset, not at its end")
	}
}

// TestPlacement: a guest whose QEMU runs pinned (taskset: CPU 1) with its
// vCPU thread pinned elsewhere (CPU 0, as libvirt's <vcpupin> does after
// the start) is pinned the same on its new QEMU, both ways of restarting.
func TestPlacement(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("needs two CPUs")
	}
	g := bootAll(t, guestSpec{name: "pinned", wrapper: []string{"taskset", "-c", "1"}})[0]
	vcpu := func() int {
		var cpus []struct {
			ThreadID int `json:"thread-id"`
		}
		g.qmpExecute("query-cpus-fast", nil, &cpus)
		if len(cpus) == 0 {
			t.Fatal("no vCPU")
		}
		return cpus[0].ThreadID
	}
	var set unix.CPUSet
	set.Set(0)
	if err := unix.SchedSetaffinity(vcpu(), &set); err != nil {
		t.Fatal(err)
	}
	affinity := func(tid int) string {
		var s unix.CPUSet
		if err := unix.SchedGetaffinity(tid, &s); err != nil {
			return err.Error()
		}
		var out []string
		for c := 0; c < runtime.NumCPU(); c++ {
			if s.IsSet(c) {
				out = append(out, strconv.Itoa(c))
			}
		}
		return strings.Join(out, ",")
	}
	for _, args := range [][]string{nil, {"--sequential"}} {
		before, _ := g.lastBeat()
		old := g.pid()
		if code, _, errOut := runLU(t, append(append([]string{"restart-qemu", "--state-dir", t.TempDir()}, args...), "pinned")...); code != 0 {
			t.Fatalf("restart-qemu %v: exit %d\n%s", args, code, errOut)
		}
		if g.pid() == old {
			t.Fatalf("not restarted")
		}
		if a := affinity(g.pid()); a != "1" {
			t.Errorf("%v: the new QEMU's main thread runs on CPUs %s, the old one's on 1", args, a)
		}
		if a := affinity(vcpu()); a != "0" {
			t.Errorf("%v: the new QEMU's vCPU thread runs on CPUs %s, the old one's on 0", args, a)
		}
		g.checkContinues(before)
	}
}
