package qemutests

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFaults: restart-qemu of three guests with a fault injected at every
// phase boundary — our process failing there, or killed there (SIGKILL),
// a QEMU dying by itself after its save, the manifest write interrupted —
// then `liveupdate recover`, twice. Afterwards every guest runs: heartbeat
// continuing, same boot id, memory checksum intact; the second recover
// changes nothing; every write a guest acknowledged is on its disk, and
// its disk writer goes on (disk_test.go). The binary is built with the
// faultinject tag; normal builds have no hook.
func TestFaults(t *testing.T) {
	// Each guest writes to a disk of another shape, and every case checks
	// every write the guest was told is stable is on its image.
	gs := bootAll(t,
		// f1 allows cpr-transfer (aux-ram-share=on): every case without
		// --sequential hands it over that way, beside two cpr-reboot guests.
		guestSpec{name: "f1", extra: []string{"-machine", "aux-ram-share=on"}, disk: &diskSpec{format: "raw", frontend: "drive", cache: "none", aio: "native"}},
		guestSpec{name: "f2", disk: &diskSpec{format: "qcow2", frontend: "blockdev", iothread: true, cache: "writeback", aio: "threads"}},
		guestSpec{name: "f3", disk: &diskSpec{format: "raw", frontend: "drive", cache: "none", aio: "io_uring", refusal: "io_uring"}})
	names := []string{"f1", "f2", "f3"}
	// Each guest's own migration set-up differs from QEMU's defaults, so
	// that giving it back (and not the defaults) is seen: whatever the run
	// changes is recorded before it is changed.
	const own = "mode=normal x-ignore-shared=true events=false"
	for _, g := range gs {
		g.qmpExecute("migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}, nil)
		if got := g.migrationSetup(); got != own {
			t.Fatalf("%s: own migration set-up %q, want %q", g.name, got, own)
		}
	}
	cases := []struct {
		fault, why string
		sequential bool // restart-qemu --sequential: no early start
		// The old QEMUs ran on through the failure (Resume): their own
		// migration set-up must be given back, not left at cpr-reboot's.
		resumed bool
		// A QEMU's death the run itself must survive: every guest runs
		// when it ends, before any recover.
		survived bool
		each     bool // restart-qemu --each: each guest on its own
	}{
		{"plan=fail", "nothing touched", false, false, false, false},
		{"plan=kill", "nothing touched", false, false, false, false},
		{"manifest=fail", "manifest written, nothing saved", false, false, false, false},
		{"manifest-write=kill", "the first manifest write interrupted before its rename", false, false, false, false},
		{"manifest=kill", "manifest written, nothing saved", false, false, false, false},
		{"early-start=fail", "new QEMUs started beside the old ones, then an error: stopped, old sockets put back", false, true, false, false},
		{"early-start=kill", "we die with new QEMUs beside the old ones: recover stops them, puts the old sockets back", false, false, false, false},
		{"saved=fail", "all saved, none quit: resumed — f1, handed over by cpr-transfer, has its restart finished on its new QEMU instead", false, true, false, false},
		{"saved=kill", "all saved, none quit, we die: recover continues the old QEMUs", false, false, false, false},
		{"manifest-write@2=kill", "recording the migration set-up interrupted: nothing changed yet", false, false, false, false},
		{"migrate-setup=kill", "every old QEMU set up for the save, we die: recover gives each its own set-up back", false, false, false, false},
		{"manifest-write@3=kill", "saves done, recording them interrupted", false, false, false, false},
		{"saved=killqemu", "one old QEMU dies after its save: restored from its state file", false, false, true, false},
		{"saved=killqemu", "one old QEMU dies after its save, before its quit: restored from its state file", true, false, true, false},
		{"quit=fail", "all saved, an error before the restores: restored on the early QEMUs", false, false, false, false},
		{"quit=kill", "all saved, we die: recover stops the early QEMUs, continues the old ones", false, false, false, false},
		{"qemu-start=fail", "one early QEMU fails to start: that VM restarts the sequential way", false, false, false, false},
		{"qemu-start=kill", "we die starting the early QEMUs: recover stops them, puts the old sockets back", false, false, false, false},
		{"load=fail", "one early QEMU fails to load: its guest continues on its old QEMU", false, false, false, false},
		{"load=kill", "we die after a load: recover kills the old QEMU its new one superseded", false, false, false, false},
		{"load=killnew", "an early QEMU dies after its load, before cont: its guest continues on its old QEMU", false, false, true, false},
		{"cont=fail", "the cont's answer lost: the new QEMU is asked, the guest runs there, the old QEMU is never continued", false, false, false, false},
		{"cont=kill", "we die after cont: recover kills the old QEMU, the new one runs the guest", false, false, false, false},
		{"quit=fail", "all quit, then an error: restored", true, false, false, false},
		{"quit=kill", "all quit, we die: recover restores from the state files", true, false, false, false},
		{"qemu-start=fail", "one new QEMU fails at start: the others run, recover restores it", true, false, false, false},
		{"qemu-start=kill", "we die with new QEMUs waiting for their state: recover stops them and restores", true, false, false, false},
		{"qemu-start=killnew", "a new QEMU dies before its monitor answers: another is started and restores the guest", true, false, true, false},
		{"load=fail", "one restore fails after loading: recover restores it again", true, false, false, false},
		{"load=kill", "we die before cont: recover continues the loaded QEMUs", true, false, false, false},
		{"load=killnew", "a new QEMU dies after its load, before cont: another is started and restores the guest", true, false, true, false},
		{"cont=fail", "the cont's answer lost: the new QEMU is asked, the guest runs", true, false, false, false},
		{"cont=kill", "we die after cont: the new QEMUs run, recover finds them running", true, false, false, false},
		// --each: the guests' turns are their own; the fault is reached
		// first by whichever guest gets there first.
		{"save=fail", "one guest's save fails: it alone continues on its old QEMU, the others restart", false, true, true, true},
		{"save=kill", "we die after one guest's save: recover continues its old QEMU and stops the others' twins", false, false, false, true},
		{"load=fail", "one guest's new QEMU fails to load: it continues on its old QEMU, the others restart", false, false, true, true},
		{"cont=kill", "we die after one guest's cont: recover kills its old QEMU and gives the others back theirs", false, false, false, true},
		{"quit=kill", "each on its own, sequential: we die after one old QEMU quit: recover restores it from its state file", true, false, false, true},
		{"load=fail", "each on its own, sequential: one restore fails after loading: recover restores it again", true, false, false, true},
		// f1's cpr-transfer, at each of its steps. Its new QEMU runs the
		// guest the moment its load ends (no -S): from the handover on the
		// guest is the new QEMU's, and a failure is rolled forward.
		{"handover:f1=killnew", "f1's new QEMU dies during its handover, before it ran the guest (its run trace says so): every guest continues on its old QEMU", false, true, true, false},
		{"handover:f1=fail", "an error while f1 is handed over: the handover is waited for, and f1's restart finished on its new QEMU", false, true, true, true},
		{"save:f1=fail", "f1 handed over, then an error: its restart is finished on its new QEMU, the old one killed", false, true, true, true},
		{"save:f1=kill", "we die after f1's handover: its new QEMU runs it; recover kills the old one", false, false, false, true},
		{"load:f1=fail", "f1's new QEMU loaded and runs it, then an error: the guest stays there", false, false, true, false},
		{"load:f1=kill", "we die after f1's load: recover finds it running on its new QEMU, kills the old one", false, false, false, false},
		{"load:f1=kill", "each on its own, we die after f1's load: recover finds it running on its new QEMU and gives the others back their QEMUs", false, false, false, true},
	}
	for _, c := range cases {
		name, args := strings.NewReplacer("=", "_", ":", "_").Replace(c.fault), []string{"restart-qemu"}
		if c.sequential {
			name += "_sequential"
			args = append(args, "--sequential")
		}
		if c.each {
			name += "_each"
			args = append(args, "--each")
		}
		ok := t.Run(name, func(t *testing.T) {
			for _, g := range gs {
				g.t = t
			}
			var before []beat
			for _, g := range gs {
				b, _ := g.lastBeat()
				before = append(before, b)
			}
			state := t.TempDir()
			code, _, errOut := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=" + c.fault},
				append(append(args, "--state-dir", state), names...)...)
			if !strings.Contains(errOut, "FAULT INJECTED") {
				t.Fatalf("the fault %s never fired (exit %d)", c.fault, code)
			}
			if c.survived {
				// A new QEMU killed says nothing over QMP: how it ended is
				// the reason, and the run must give it.
				if strings.Contains(c.fault, "killnew") && !regexp.MustCompile(`new QEMU pid \d+ ended.*killed by signal 9`).MatchString(errOut) {
					t.Errorf("the run does not say the new QEMU was killed:\n%s", errOut)
				}
				for i, g := range gs {
					before[i] = g.checkContinues(before[i])
				}
			}
			if c.resumed {
				for _, g := range gs {
					if got := g.migrationSetup(); got != own {
						t.Errorf("%s after the rollback: migration set-up %q, want its own %q", g.name, got, own)
					}
				}
			}
			recoverAll(t, state)
			for i, g := range gs {
				g.checkContinues(before[i])
				if got := g.migrationSetup(); got != own {
					t.Errorf("%s after recover: migration set-up %q, want its own %q", g.name, got, own)
				}
			}
			t.Logf("%s (%s): restart-qemu exit %d; every guest runs after recover", strings.Join(append([]string{c.fault}, args[1:]...), " "), c.why, code)
		})
		if !ok {
			// Each case starts from the guests the last one left: after a
			// failure their state is unknown, and a stalled guest would
			// fail every later case a minute each.
			t.Fatalf("the table stops at %s: the guests are no longer in a known state", name)
		}
	}
}

// exitRefusedCode is the CLI's exit status for a refusal (init/cli.go's
// exitRefused), here: another run holds the lock.
const exitRefusedCode = 3

// recoverAll runs recover twice: the first brings every guest back, the
// second must find all of them running and change nothing.
func recoverAll(t *testing.T, state string) {
	t.Helper()
	code, out, errOut := runLU(t, "recover", "--state-dir", state)
	if code == exitRefusedCode { // who holds the lock, for the log
		o, _ := exec.Command("sh", "-c", "for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null | grep -q liveupdate.lock && { echo $p; cat $p/cmdline | tr '\\0' ' '; echo; cat $p/status | grep -E 'State|PPid'; }; done").CombinedOutput()
		t.Logf("processes holding the lock:\n%s", o)
	}
	if code != 0 {
		t.Fatalf("recover: exit %d\n%s\n%s", code, out, errOut)
	}
	code, out, _ = runLU(t, "recover", "--state-dir", state)
	if _, err := os.Stat(filepath.Join(state, "manifest.json")); err != nil {
		if !strings.Contains(out, "no interrupted run") {
			t.Errorf("second recover without a manifest: %s", out)
		}
		return
	}
	if code != 0 || regexp.MustCompile(`(restored|resumed|failed)`).MatchString(out) {
		t.Errorf("second recover was not a no-op: exit %d\n%s", code, out)
	}
}

// TestFaultFullDisk: the state directory's filesystem fills up (by
// someone else) after the manifest is written: the saves fail with ENOSPC,
// every guest resumes on its old QEMU at once, and once the space is freed
// recover finds nothing left to do but record it.
func TestFaultFullDisk(t *testing.T) {
	gs := bootAll(t, guestSpec{name: "d1"}, guestSpec{name: "d2"}, guestSpec{name: "d3"})
	state := t.TempDir()
	// A small filesystem of its own, so that filling it harms nothing else.
	if err := unix.Mount("tmpfs", state, "tmpfs", 0, "size=80m,mode=0700"); err != nil {
		t.Skipf("cannot mount a small tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(state, unix.MNT_DETACH) })
	var before []beat
	for _, g := range gs {
		b, _ := g.lastBeat()
		before = append(before, b)
	}
	code, _, errOut := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=manifest=fill"}, "restart-qemu", "--state-dir", state, "d1", "d2", "d3")
	// The disk fills before the saves: the record of the migration set-up
	// (written before any QEMU is changed) or the saves fail; either way
	// every guest goes on on its old QEMU at once.
	if code != 1 || !(strings.Contains(errOut, "every VM resumed on its old QEMU") || strings.Contains(errOut, "no VM stopped")) {
		t.Errorf("restart-qemu on a disk that filled up: exit %d\n%s", code, errOut)
	}
	// Running again before anyone touched them.
	for i, g := range gs {
		before[i] = g.checkContinues(before[i])
	}
	os.Remove(filepath.Join(state, ".fault-fill"))
	recoverAll(t, state)
	for i, g := range gs {
		g.checkContinues(before[i])
	}
}

// TestFaultQMPHangRecover: a QEMU whose monitor hangs (SIGSTOP) is reported
// by recover, touched by nobody, and recovered once it answers again.
func TestFaultQMPHangRecover(t *testing.T) {
	gs := bootAll(t, guestSpec{name: "h1"}, guestSpec{name: "h2"})
	state := t.TempDir()
	before, _ := gs[0].lastBeat()
	// A run interrupted after the saves: both old QEMUs paused.
	code, _, _ := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=saved=kill"}, "restart-qemu", "--state-dir", state, "h1", "h2")
	if code != 128+int(syscall.SIGKILL) {
		t.Fatalf("restart-qemu with saved=kill: exit %d", code)
	}
	pid := gs[0].pid()
	syscall.Kill(pid, syscall.SIGSTOP)
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })
	code, out, _ := runLU(t, "recover", "--qmp-timeout", "2s", "--state-dir", state)
	if code != 1 || !regexp.MustCompile(`h1 +failed .*monitor does not answer`).MatchString(out) || !regexp.MustCompile(`h2 +resumed`).MatchString(out) {
		t.Errorf("recover with h1 hung: exit %d\n%s", code, out)
	}
	syscall.Kill(pid, syscall.SIGCONT)
	recoverAll(t, state)
	gs[0].checkContinues(before)
}
