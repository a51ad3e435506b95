package qemutests

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestChaos (make soak): faults at random moments, not only at the named
// points. Each iteration restarts K guests (restart-qemu, early start or
// --sequential at random) and SIGKILLs liveupdate at a random instant of
// the run — before, during or after the saves, the quits, the loads, the
// conts — then runs recover (twice: the second must change nothing) and
// checks every guest: heartbeat going on, same boot id, RAM checksum
// intact, and every acknowledged record on each guest's disk.
// Bounded by LIVEUPDATE_CHAOS_N iterations and LIVEUPDATE_CHAOS_MINUTES;
// outcomes go to LIVEUPDATE_SOAK_OUT (JSON lines) for docs/reliability.md.
// Skipped unless LIVEUPDATE_CHAOS_N is set.
func TestChaos(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_CHAOS_N"))
	if n <= 0 {
		t.Skip("set LIVEUPDATE_CHAOS_N (make soak)")
	}
	limit := 30 * time.Minute
	if m, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_CHAOS_MINUTES")); m > 0 {
		limit = time.Duration(m) * time.Minute
	}
	names := []string{"c1", "c2", "c3"}
	var specs []guestSpec
	for _, nm := range names {
		specs = append(specs, chaosGuest(nm))
	}
	gs := bootAll(t, specs...)
	var out *os.File
	if p := os.Getenv("LIVEUPDATE_SOAK_OUT"); p != "" {
		out, _ = os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		defer out.Close()
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 42))
	deadline := time.Now().Add(limit)
	lost, done := 0, 0
	for i := 1; i <= n && time.Now().Before(deadline); i++ {
		var before []beat
		for _, g := range gs {
			g.t = t
			b, _ := g.lastBeat()
			before = append(before, b)
		}
		state := t.TempDir()
		sequential := rng.IntN(2) == 0
		// A restart of three guests takes 0.3–1.5 s here: kill within 2 s.
		after := time.Duration(rng.IntN(2000)) * time.Millisecond
		args := []string{"restart-qemu", "--state-dir", state}
		if sequential {
			args = append(args, "--sequential")
		}
		code := killAfter(t, after, append(args, names...)...)
		rec, _, _ := runLU(t, "recover", "--state-dir", state)
		rec2, out2, _ := runLU(t, "recover", "--state-dir", state)
		ok := rec == 0 && rec2 == 0 && (!strings.Contains(out2, "restored") && !strings.Contains(out2, "resumed") && !strings.Contains(out2, "failed"))
		var bad []string
		for j, g := range gs {
			if why := g.continues(before[j]); why != "" {
				bad = append(bad, why)
			}
			// Every acknowledged disk record on the image, and the writer
			// going on (a loss fails the test here).
			g.checkAcksContinue(before[j].ack)
			g.checkDisk()
		}
		if len(bad) > 0 {
			lost++
			t.Errorf("iteration %d (kill at %s, sequential %v, exit %d): %s", i, after, sequential, code, strings.Join(bad, "; "))
		}
		if !ok {
			t.Errorf("iteration %d: recover exit %d then %d (second: %q)", i, rec, rec2, out2)
		}
		done++
		if out != nil {
			b, _ := json.Marshal(map[string]any{"kind": "chaos", "iteration": i, "kill_after_ms": after.Milliseconds(),
				"sequential": sequential, "exit": code, "recovered": ok, "guests_lost": len(bad)})
			out.Write(append(b, '\n'))
		}
	}
	t.Logf("chaos: %d iterations (%d guests each), guests lost in %d", done, len(gs), lost)
}

// chaosGuest is the guest shape the chaos loop restarts: each writes to a
// disk of its own shape.
func chaosGuest(name string) guestSpec {
	shapes := map[string]*diskSpec{
		"c1": {format: "raw", frontend: "drive", cache: "none", aio: "native"},
		"c2": {format: "qcow2", frontend: "blockdev", iothread: true, cache: "writeback", aio: "threads"},
		"c3": {format: "raw", frontend: "drive+device", cache: "none", aio: "io_uring"},
	}
	return guestSpec{name: name, disk: shapes[name]}
}

// killAfter runs liveupdate and SIGKILLs it after d (if it is still
// running then); it returns the exit code (137 when killed).
func killAfter(t *testing.T, d time.Duration, args ...string) int {
	t.Helper()
	args = append([]string{args[0], "--lock", filepath.Join(binDir, "liveupdate.lock")}, args[1:]...)
	cmd := exec.Command(filepath.Join(binDir, "liveupdate"), args...)
	var errOut strings.Builder
	cmd.Stderr = &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(d, func() { cmd.Process.Signal(syscall.SIGKILL) })
	err := cmd.Wait()
	timer.Stop()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	}
	t.Logf("liveupdate %s, SIGKILL after %s → exit %d\n%s", strings.Join(args, " "), d, code, errOut.String())
	return code
}

// continues is checkContinues that reports instead of failing.
func (g *guest) continues(before beat) string {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if b, ok := g.lastBeat(); ok && b.seq >= before.seq+3 {
			switch {
			case b.boot != before.boot:
				return fmt.Sprintf("%s rebooted (boot id %s → %s)", g.name, before.boot, b.boot)
			case b.mem != "ok":
				return fmt.Sprintf("%s: memory checksum %q", g.name, b.mem)
			}
			return ""
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Sprintf("%s: no heartbeat for 60 s", g.name)
}
