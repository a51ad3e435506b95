package qemutests

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// TestChaos (make soak): faults at random moments, not only at the named
// points. Each iteration restarts three guests writing to their disks
// (restart-qemu, early start or --sequential at random) and kills one
// process at a random instant of the run, in one of two modes (subtests,
// over the same guests):
//
//   - tool: liveupdate itself is SIGKILLed — before, during or after the
//     saves, the quits, the loads, the conts — and recover brings every
//     guest back;
//   - qemu: one QEMU is SIGKILLed, and only one whose death a correct tool
//     must survive (see chaosQEMU): the run itself must bring every guest
//     back, saying why when it fails.
//
// Then recover runs twice (the second must change nothing) and every guest
// is checked: heartbeat going on, same boot id, RAM checksum intact, every
// acknowledged record on its disk, one QEMU each.
// LIVEUPDATE_CHAOS_N iterations per mode, each mode bounded by
// LIVEUPDATE_CHAOS_MINUTES; LIVEUPDATE_CHAOS_MODES picks modes ("tool,qemu",
// the default); outcomes go to LIVEUPDATE_SOAK_OUT (JSON lines) for
// docs/reliability.md. Skipped unless LIVEUPDATE_CHAOS_N is set.
func TestChaos(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_CHAOS_N"))
	if n <= 0 {
		t.Skip("set LIVEUPDATE_CHAOS_N (make soak)")
	}
	limit := 30 * time.Minute
	if m, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_CHAOS_MINUTES")); m > 0 {
		limit = time.Duration(m) * time.Minute
	}
	want := []string{"tool", "qemu"}
	if s := os.Getenv("LIVEUPDATE_CHAOS_MODES"); s != "" {
		want = strings.Split(s, ",")
	}
	names := []string{"c1", "c2", "c3"}
	var specs []guestSpec
	for _, nm := range names {
		specs = append(specs, chaosGuest(nm))
	}
	gs := bootAll(t, specs...)
	var out *os.File
	if p := os.Getenv("LIVEUPDATE_SOAK_OUT"); p != "" {
		var err error
		if out, err = os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err != nil {
			t.Fatalf("opening the soak record: %v", err)
		}
		defer out.Close()
	}
	c := &chaos{gs: gs, names: names, out: out, rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 42))}
	for _, m := range []struct {
		name string
		run  func(t *testing.T, c *chaos, n int, deadline time.Time)
	}{
		{"tool", chaosTool},
		{"qemu", chaosQEMU},
	} {
		if !slices.Contains(want, m.name) {
			continue
		}
		t.Run(m.name, func(t *testing.T) {
			if c.broken != "" {
				t.Fatalf("not run: the guests cannot be checked any more (%s)", c.broken)
			}
			m.run(t, c, n, time.Now().Add(limit))
		})
	}
}

// chaos is what the modes share: the guests, booted once, and the record.
type chaos struct {
	gs    []*guest
	names []string
	out   *os.File
	rng   *rand.Rand
	// broken says why the guests cannot be checked any more (a disk
	// writer that stopped stays stopped): the loops end there.
	broken string
}

// chaosGuest is the guest shape the chaos loop restarts: each writes to a
// disk of its own shape, and has a monitor of the test's own (the QEMU mode
// asks QEMUs how they are through it while liveupdate holds theirs).
func chaosGuest(name string) guestSpec {
	shapes := map[string]*diskSpec{
		"c1": {format: "raw", frontend: "drive", cache: "none", aio: "native"},
		"c2": {format: "qcow2", frontend: "blockdev", iothread: true, cache: "writeback", aio: "threads"},
		"c3": {format: "raw", frontend: "drive+device", cache: "none", aio: "io_uring"},
	}
	return guestSpec{name: name, disk: shapes[name], observer: true}
}

// record appends one outcome to the soak record.
func (c *chaos) record(rec map[string]any) {
	if c.out == nil {
		return
	}
	b, _ := json.Marshal(rec)
	c.out.Write(append(b, '\n'))
}

// beats is every guest's last heartbeat, and the test's guests bound to t.
func (c *chaos) beats(t *testing.T) []beat {
	var before []beat
	for _, g := range c.gs {
		g.t = t
		b, _ := g.lastBeat()
		before = append(before, b)
	}
	return before
}

// args is restart-qemu's command line for one iteration.
func (c *chaos) args(state string, sequential bool) []string {
	args := []string{"restart-qemu", "--state-dir", state}
	if sequential {
		args = append(args, "--sequential")
	}
	return append(args, c.names...)
}

// afterRun is the end of every iteration: recover twice (the second a
// no-op), then every guest checked — heartbeat, boot id, RAM, every
// acknowledged record on its disk, one QEMU each — and its disk writer
// going on. It returns whether recover did its part, the guests that are
// not as they were (lost), and the disk writers that stopped (the guest
// runs, its acknowledged records are all there, but it acknowledges no
// more: the loop cannot check that guest again, and ends).
func (c *chaos) afterRun(t *testing.T, i int, state string, before []beat) (recovered bool, bad, stalled []string) {
	t.Helper()
	rec, _, _ := runLU(t, "recover", "--state-dir", state)
	rec2, out2, _ := runLU(t, "recover", "--state-dir", state)
	recovered = rec == 0 && rec2 == 0 && !regexp.MustCompile(`(restored|resumed|failed)`).MatchString(out2)
	if !recovered {
		t.Errorf("iteration %d: recover exit %d then %d (second: %q)", i, rec, rec2, out2)
	}
	for j, g := range c.gs {
		if why := g.continues(before[j]); why != "" {
			bad = append(bad, why)
		}
		if why := reported(g, func() { g.checkAcksContinue(before[j].ack) }); why != "" {
			stalled = append(stalled, why)
		} else if g.lostIRQ != "" { // QEMU's bug: counted, as any stall
			stalled = append(stalled, g.name+": QEMU lost a completion interrupt: "+g.lostIRQ)
		}
		if why := reported(g, func() { g.checkDisk() }); why != "" {
			bad = append(bad, why)
		}
		if pids := qemusOf(g.name); len(pids) != 1 {
			t.Errorf("iteration %d: %s has %d QEMUs after recover (pids %v): one is left over", i, g.name, len(pids), pids)
		}
	}
	if len(stalled) > 0 {
		c.broken = strings.Join(stalled, "; ")
		t.Errorf("iteration %d: %s", i, c.broken)
	}
	return recovered, bad, stalled
}

// reportingTB is a test whose Fatal records why and unwinds to reported:
// the chaos loop counts a guest check that fails instead of stopping there.
type reportingTB struct {
	testing.TB
	why string
}

func (r *reportingTB) Helper() {}

func (r *reportingTB) Fatalf(format string, args ...any) {
	r.why = fmt.Sprintf(format, args...)
	panic(r)
}

func (r *reportingTB) Fatal(args ...any) {
	r.why = fmt.Sprint(args...)
	panic(r)
}

// reported runs a check of g's that fails by Fatal, and says why it failed
// ("" if it passed).
func reported(g *guest, check func()) (why string) {
	t := g.t
	r := &reportingTB{TB: t}
	g.t = r
	defer func() {
		g.t = t
		if p := recover(); p != nil {
			if p != any(r) {
				panic(p)
			}
			why = r.why
		}
	}()
	check()
	return ""
}

// chaosTool: liveupdate SIGKILLed at a random instant of each run.
func chaosTool(t *testing.T, c *chaos, n int, deadline time.Time) {
	lost, done := 0, 0
	for i := 1; i <= n && time.Now().Before(deadline) && c.broken == ""; i++ {
		before := c.beats(t)
		state := t.TempDir()
		sequential := c.rng.IntN(2) == 0
		// A restart of three guests takes 0.3–1.5 s here: kill within 2 s.
		after := time.Duration(c.rng.IntN(2000)) * time.Millisecond
		code := killAfter(t, after, c.args(state, sequential)...)
		ok, bad, stalled := c.afterRun(t, i, state, before)
		if len(bad) > 0 {
			lost++
			t.Errorf("iteration %d (kill at %s, sequential %v, exit %d): %s", i, after, sequential, code, strings.Join(bad, "; "))
		}
		done++
		c.record(map[string]any{"kind": "chaos", "iteration": i, "kill_after_ms": after.Milliseconds(),
			"sequential": sequential, "exit": code, "recovered": ok, "guests_lost": len(bad), "disks_stalled": len(stalled)})
	}
	t.Logf("chaos: %d iterations (%d guests each), guests lost in %d", done, len(c.gs), lost)
}

// chaosSettle is how long liveupdate is held frozen before the QEMUs are
// judged: long enough for every command it wrote before it froze to have
// been run by its QEMU (a cont among them), and for a save or load under
// way to end.
const chaosSettle = 150 * time.Millisecond

// chaosQEMU: one QEMU SIGKILLed at a random instant of each run — but only
// a QEMU whose death a correct tool must survive, because the guest's
// state is safe elsewhere at that instant:
//
//   - a new QEMU (an early twin, or a sequential restart's) before it has
//     run the guest, i.e. before the cont of its restore: starting, waiting
//     for the incoming state, loading it, loaded and paused. The state
//     file and the RAM are as the save left them, and the old QEMU (early
//     start) still holds the device state.
//   - an old QEMU after the guest was stopped for its save and its state
//     file is complete (query-migrate "completed", runstate postmigrate):
//     everything of the guest is in the state file and the RAM.
//
// A new QEMU after its cont is NOT a target: it runs the guest, whose
// device state lives only in that process — killing it is the guest's
// host crashing, which no tool survives. Nor is an old QEMU still running
// the guest or still writing its state file, for the same reason.
//
// Which QEMU is which, at a random instant, without a race: at the instant
// liveupdate is frozen (SIGSTOP), so it sends nothing more; after
// chaosSettle everything it had sent has been run, and a QEMU's state then
// changes by itself only towards "more saved" (a save completing, a load
// completing) — only liveupdate's cont runs a guest on a new QEMU (-S) or
// resumes an old one. The QEMUs of each guest are read from /proc: the one
// with the pid it had before the run is the old one, any other a new one;
// each is asked its runstate (twice: the second answer comes after any
// command queued on liveupdate's monitor) and its migration status on its
// observer monitor. One eligible QEMU is picked at random and SIGKILLed,
// its death awaited, then liveupdate continued. An instant with no eligible
// QEMU (plan, the old QEMUs still running or saving, every guest already
// on its new QEMU, the run over) is recorded as "no target", not a kill.
//
// The instants: half are drawn over the whole run, half over the window in
// which the QEMUs' states change fastest — the last untouched run's (of
// the same way, early or sequential) first save to its last cont, from its
// manifest — so that the narrow states (an old QEMU saved, a new one
// loading or loaded: milliseconds each) are hit too, not only the long
// wait of an early twin.
func chaosQEMU(t *testing.T, c *chaos, n int, deadline time.Time) {
	kills := map[string]int{}
	lost, done, noTarget := 0, 0, 0
	span := 2 * time.Second                // about the run's length
	windows := map[bool][2]time.Duration{} // by sequential: the last run's first save → last cont
	for i := 1; i <= n && time.Now().Before(deadline) && c.broken == ""; i++ {
		before := c.beats(t)
		olds := map[string]int{}
		for _, g := range c.gs {
			pids := qemusOf(g.name)
			if len(pids) != 1 {
				t.Fatalf("iteration %d: %s has %d QEMUs before the run (pids %v)", i, g.name, len(pids), pids)
			}
			olds[g.name] = pids[0]
		}
		state := t.TempDir()
		sequential := c.rng.IntN(2) == 0
		at, drawn := time.Duration(c.rng.Int64N(int64(span))), "run"
		if w, ok := windows[sequential]; ok && c.rng.IntN(2) == 0 {
			at, drawn = w[0]+time.Duration(c.rng.Int64N(int64(w[1]-w[0])+1)), "blackout"
		}
		lu := startLU(t, c.args(state, sequential)...)
		hit := chaosTarget{kind: "none"}
		select {
		case <-lu.done:
			hit.why = "the run had ended"
		case <-time.After(at):
			hit = c.killOneQEMU(t, lu, olds)
		}
		code, errOut := lu.wait(t, 5*time.Minute)
		if took := lu.took - hit.frozen; took > 0 {
			span = max(500*time.Millisecond, took*6/5)
		}
		if w, ok := stateWindow(state, lu.start); ok && hit.kind == "none" {
			windows[sequential] = w
		}
		if hit.kind == "none" {
			noTarget++
			t.Logf("iteration %d: no target at %s (%s)", i, at, hit.why)
		} else {
			kills[hit.kind]++
			t.Logf("iteration %d: SIGKILLed %s's %s QEMU pid %d at %s (sequential %v); restart-qemu exit %d", i, hit.vm, hit.kind, hit.pid, at, sequential, code)
		}
		// A failed run must say why, naming the guest, in words.
		saysWhy := code == 0 || (hit.kind != "none" && strings.Contains(errOut, hit.vm+":") &&
			regexp.MustCompile(`killed by signal|closed its monitor|exited`).MatchString(errOut))
		if !saysWhy {
			t.Errorf("iteration %d (%s): restart-qemu exit %d without saying why:\n%s", i, hit.kind, code, errOut)
		}
		// The run itself must have brought every guest back: resumed on its
		// old QEMU, or restored — before any recover.
		var down []string
		for j, g := range c.gs {
			if why := g.continues(before[j]); why != "" {
				down = append(down, why)
			}
		}
		if len(down) > 0 {
			t.Errorf("iteration %d (%s at %s): after the run, before recover: %s", i, hit.kind, at, strings.Join(down, "; "))
		}
		ok, bad, stalled := c.afterRun(t, i, state, before)
		if len(bad) > 0 {
			lost++
			t.Errorf("iteration %d (%s at %s, sequential %v, exit %d): %s", i, hit.kind, at, sequential, code, strings.Join(bad, "; "))
		}
		done++
		c.record(map[string]any{"kind": "chaos-qemu", "iteration": i, "kill_at_ms": at.Milliseconds(), "drawn": drawn, "sequential": sequential,
			"target": hit.kind, "vm": hit.vm, "exit": code, "says_why": saysWhy, "ran_after_run": len(down) == 0,
			"recovered": ok, "guests_lost": len(bad), "disks_stalled": len(stalled)})
	}
	var kinds []string
	for _, k := range slices.Sorted(maps.Keys(kills)) {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, kills[k]))
	}
	t.Logf("chaos qemu: %d iterations (%d guests each): QEMUs killed: %s; no target %d; guests lost in %d",
		done, len(c.gs), strings.Join(kinds, ", "), noTarget, lost)
}

// stateWindow is where, in a run started at start, the QEMUs' states
// changed: from its first save to its last cont (its manifest's phases).
func stateWindow(state string, start time.Time) ([2]time.Duration, bool) {
	m, err := manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		return [2]time.Duration{}, false
	}
	var from, to time.Time
	for _, ph := range m.Phases {
		if ph.VM == "" {
			continue
		}
		if ph.Name == "save" && (from.IsZero() || ph.Start.Before(from)) {
			from = ph.Start
		}
		if ph.Name == "cont" && ph.End.After(to) {
			to = ph.End
		}
	}
	if from.IsZero() || !to.After(from) {
		return [2]time.Duration{}, false
	}
	return [2]time.Duration{max(0, from.Sub(start)), to.Sub(start)}, true
}

// chaosTarget is the QEMU an iteration killed ("none": no target).
type chaosTarget struct {
	kind   string        // "new: starting", "new: waiting", "new: loading", "new: loaded", "old: saved", or "none"
	vm     string        // its guest
	pid    int           // the QEMU killed
	why    string        // for "none": why not
	frozen time.Duration // how long liveupdate was held
}

// killOneQEMU freezes liveupdate where it is, judges every QEMU of the
// guests, kills one eligible at random and lets liveupdate go on.
func (c *chaos) killOneQEMU(t *testing.T, lu *luRun, olds map[string]int) (hit chaosTarget) {
	t.Helper()
	hit.kind = "none"
	froze := time.Now()
	defer func() { hit.frozen = time.Since(froze) }()
	if err := lu.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		hit.why = "the run had ended"
		return hit
	}
	defer lu.cmd.Process.Signal(syscall.SIGCONT)
	if !stopped(lu.cmd.Process.Pid) {
		hit.why = "the run had ended"
		return hit
	}
	time.Sleep(chaosSettle)
	var eligible []chaosTarget
	var seen []string
	for _, g := range c.gs {
		for _, pid := range qemusOf(g.name) {
			kind, what := judgeQEMU(g, pid, pid == olds[g.name])
			seen = append(seen, fmt.Sprintf("%s pid %d %s", g.name, pid, what))
			if kind != "" {
				eligible = append(eligible, chaosTarget{kind: kind, vm: g.name, pid: pid})
			}
		}
	}
	if len(eligible) == 0 {
		hit.why = strings.Join(seen, ", ")
		if len(seen) == 0 {
			hit.why = "no QEMU of the guests runs: between old QEMUs' quit and their new ones' exec"
		}
		return hit
	}
	pick := eligible[c.rng.IntN(len(eligible))]
	syscall.Kill(pick.pid, syscall.SIGKILL)
	// Gone (or a zombie: its files, its monitor among them, are closed)
	// before liveupdate goes on.
	for end := time.Now().Add(10 * time.Second); alive(pick.pid); {
		if time.Now().After(end) {
			t.Fatalf("%s's QEMU pid %d does not die of SIGKILL", pick.vm, pick.pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("liveupdate frozen: %s; killed %s pid %d (%s)", strings.Join(seen, ", "), pick.vm, pick.pid, pick.kind)
	return pick
}

// judgeQEMU says whether a QEMU of g may be killed now (its kind, "" if
// not) and what it saw, asking it through its observer monitor. Called
// with liveupdate frozen (killOneQEMU).
func judgeQEMU(g *guest, pid int, old bool) (kind, what string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var cl *qmp.Client
	// An early twin's old QEMU has its sockets moved aside; DialPeer
	// makes sure we talk to pid, wherever its socket is.
	for _, p := range []string{g.observe, g.observe + ".lu-old"} {
		if c, err := qmp.DialPeer(ctx, p, pid); err == nil {
			cl = c
			break
		}
	}
	if cl == nil {
		if old {
			return "", "old, its monitor not answering"
		}
		// Not listening yet: a QEMU still starting has run nothing.
		return "new: starting", "new, starting (monitor not up)"
	}
	defer cl.Close()
	var st1, st2 struct{ Status string }
	var mig struct{ Status string }
	if cl.Execute(ctx, "query-status", nil, &st1) != nil || cl.Execute(ctx, "query-migrate", nil, &mig) != nil ||
		cl.Execute(ctx, "query-status", nil, &st2) != nil {
		return "", "not answering"
	}
	what = fmt.Sprintf("%s, migration %q", st2.Status, mig.Status)
	if st1.Status != st2.Status {
		return "", what + " (changing)"
	}
	if old {
		what = "old " + what
		if st2.Status == "postmigrate" && mig.Status == "completed" {
			return "old: saved", what
		}
		return "", what // still running the guest, or still saving it
	}
	what = "new " + what
	switch {
	case st2.Status == "inmigrate" && (mig.Status == "" || mig.Status == "none"):
		return "new: waiting", what
	case st2.Status == "inmigrate":
		return "new: loading", what
	case st2.Status == "paused":
		return "new: loaded", what
	}
	// Running: after its cont. Not a target (see chaosQEMU).
	return "", what
}

// qemusOf lists the living QEMU processes of the guest named name.
func qemusOf(name string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		argv := strings.Split(string(b), "\x00")
		if len(argv) == 0 || !strings.HasPrefix(filepath.Base(argv[0]), "qemu-system") {
			continue
		}
		if i := slices.Index(argv, "-name"); i >= 0 && i+1 < len(argv) && argv[i+1] == name && alive(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// stopped waits until pid is stopped (SIGSTOP is delivered asynchronously);
// false if it has ended instead.
func stopped(pid int) bool {
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		i := strings.LastIndexByte(string(b), ')')
		switch st := strings.TrimSpace(string(b[i+1:])); {
		case strings.HasPrefix(st, "T"):
			return true
		case strings.HasPrefix(st, "Z"), strings.HasPrefix(st, "X"):
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// luRun is a liveupdate run in the background.
type luRun struct {
	cmd    *exec.Cmd
	args   []string
	errOut strings.Builder
	start  time.Time
	took   time.Duration
	done   chan struct{}
	err    error
}

// startLU starts liveupdate with this test run's own lock.
func startLU(t *testing.T, args ...string) *luRun {
	t.Helper()
	args = append([]string{args[0], "--lock", filepath.Join(binDir, "liveupdate.lock")}, args[1:]...)
	r := &luRun{args: args, done: make(chan struct{})}
	r.cmd = exec.Command(filepath.Join(binDir, "liveupdate"), args...)
	r.cmd.Stderr = &r.errOut
	r.start = time.Now()
	if err := r.cmd.Start(); err != nil {
		t.Fatalf("starting liveupdate: %v", err)
	}
	go func() {
		r.err = r.cmd.Wait()
		r.took = time.Since(r.start)
		close(r.done)
	}()
	return r
}

// wait waits for the run to end (killing it after d: a run that hangs is
// a failure) and returns its exit code (128+signal if killed) and stderr.
func (r *luRun) wait(t *testing.T, d time.Duration) (int, string) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(d):
		r.cmd.Process.Signal(syscall.SIGKILL)
		<-r.done
		t.Errorf("liveupdate %s did not end within %s", strings.Join(r.args, " "), d)
	}
	code := exitCode(r.err)
	t.Logf("liveupdate %s → exit %d\n%s", strings.Join(r.args, " "), code, r.errOut.String())
	return code, r.errOut.String()
}

// exitCode is a finished command's exit code, 128+signal when killed.
func exitCode(err error) int {
	ee, ok := err.(*exec.ExitError)
	if !ok {
		return 0
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ee.ExitCode()
}

// killAfter runs liveupdate and SIGKILLs it after d (if it is still
// running then); it returns the exit code (137 when killed).
func killAfter(t *testing.T, d time.Duration, args ...string) int {
	t.Helper()
	r := startLU(t, args...)
	select {
	case <-r.done:
	case <-time.After(d):
		r.cmd.Process.Signal(syscall.SIGKILL)
	}
	code, _ := r.wait(t, 5*time.Minute)
	t.Logf("(SIGKILL after %s)", d)
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
