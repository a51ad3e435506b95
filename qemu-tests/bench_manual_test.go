package qemutests

import (
	"context"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// P1 (issue 15): restart-qemu of one guest against the manual CPR procedure
// an operator would script over QMP on its twin, turn by turn in the same
// run: on the old QEMU migrate-set-capabilities x-ignore-shared,
// migrate-set-parameters mode=cpr-reboot, migrate file:, wait until it
// completed, quit; then the same command line again with -incoming defer,
// the same capability and mode, migrate-incoming file:, wait, cont. The
// blackout of both is the new QEMU's RESUME − the old QEMU's STOP.
func BenchmarkRestartManual(b *testing.B) {
	spec := func(name string) guestSpec { return guestSpec{name: name, kargs: []string{"hb.check_ms=60000"}} }
	benchTwins(b, "P1m", spec("bpm-lu"), spec("bpm-hand"), "", cprRebootByHand)
}

// cprRebootByHand restarts g's guest by the manual cpr-reboot procedure
// (BenchmarkRestartManual) and returns its blackout in ms.
func cprRebootByHand(b testing.TB, g *guest, dir string) float64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pid := g.pid()
	argv := qemuArgv(b, pid)
	stateURI := "file:" + filepath.Join(dir, "vm.state")
	setup := func(c *qmp.Client) {
		if err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}, nil); err != nil {
			b.Fatal(err)
		}
		if err := c.Execute(ctx, "migrate-set-parameters", map[string]any{"mode": "cpr-reboot"}, nil); err != nil {
			b.Fatal(err)
		}
	}
	// As a script would: query-migrate until the migration is over.
	wait := func(c *qmp.Client, what string) {
		for {
			var st struct {
				Status    string `json:"status"`
				ErrorDesc string `json:"error-desc"`
			}
			if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
				b.Fatalf("%s: %v", what, err)
			}
			switch st.Status {
			case "completed":
				return
			case "failed", "cancelled":
				b.Fatalf("%s: %s %s", what, st.Status, st.ErrorDesc)
			}
			time.Sleep(time.Millisecond)
		}
	}
	old, err := qmp.DialPeer(ctx, g.qmp, pid)
	if err != nil {
		b.Fatal(err)
	}
	defer old.Close()
	setup(old)
	mark := len(old.Events())
	if err := old.Execute(ctx, "migrate", map[string]any{"uri": stateURI}, nil); err != nil {
		b.Fatalf("migrate: %v", err)
	}
	wait(old, "saving")
	stop, _, err := old.WaitEvent(ctx, "STOP", mark, nil)
	if err != nil {
		b.Fatalf("no STOP from the old QEMU: %v", err)
	}
	old.Execute(ctx, "quit", nil, nil)
	for syscall.Kill(pid, 0) == nil {
		time.Sleep(time.Millisecond)
	}
	cmd, log := startAgain(b, argv, "-incoming", "defer")
	nw := dialNew(ctx, b, g.qmp, cmd, log)
	defer nw.Close()
	setup(nw)
	if err := nw.Execute(ctx, "migrate-incoming", map[string]any{"uri": stateURI}, nil); err != nil {
		b.Fatalf("migrate-incoming: %v; %s", err, log.String())
	}
	wait(nw, "loading")
	var st struct{ Status string }
	if nw.Execute(ctx, "query-status", nil, &st); st.Status != "running" {
		if err := nw.Execute(ctx, "cont", nil, nil); err != nil {
			b.Fatalf("cont: %v", err)
		}
	}
	resume, _, err := nw.WaitEvent(ctx, "RESUME", 0, nil)
	if err != nil {
		b.Fatalf("no RESUME from the new QEMU: %v; %s", err, log.String())
	}
	return float64(resume.Time.Sub(stop.Time).Microseconds()) / 1000
}
