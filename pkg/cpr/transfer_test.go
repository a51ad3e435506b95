package cpr

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
)

// TestAwaitStart: what a failed cpr-transfer makes of its new QEMU (a
// stand-in process writing its run trace as QEMU does): one whose trace
// says it ran the guest keeps it, alive — even past the wait — and counts
// as having consumed the guest's state; one that ends, or is still silent
// when the wait ends, or whose guest was paused (it never starts it), has
// not and is gone afterwards — its old QEMU may go on.
func TestAwaitStart(t *testing.T) {
	const running = "runstate_set current_run_state 5 (inmigrate) new_state 9 (running)"
	for _, tc := range []struct {
		name        string
		script      string // the twin; $T is its trace
		paused      bool   // the guest was paused before the run
		wantRan     bool
		wantStopped bool // gone afterwards
		// stopped by awaitStart (not ended by itself)
		wantStoppedByUs bool
	}{
		{"ran the guest before the failure", `echo "` + running + `" >"$T"; exec sleep 30`, false, true, false, false},
		{"runs it during the wait", `sleep 0.1; echo "` + running + `" >"$T"; exec sleep 30`, false, true, false, false},
		{"ends without running it", `echo "runstate_set current_run_state 0 (prelaunch) new_state 5 (inmigrate)" >"$T"; exit 1`, false, false, true, false},
		{"silent until the wait ends: stopped", `exec sleep 30`, false, false, true, true},
		{"ran it, then died", `echo "` + running + `" >"$T"; exit 1`, false, true, true, false},
		{"a paused guest: never started, stopped", `exec sleep 30`, true, false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			trace := filepath.Join(dir, "vm.run.trace")
			p, err := qemuproc.Start(qemuproc.Spec{Binary: "/bin/sh", Argv: []string{"sh", "-c", tc.script},
				Env: []string{"T=" + trace}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			q := &newQEMU{p: p}
			t.Cleanup(q.stop)
			r := (&Engine{StateDir: hostpath.QEMU(dir), Log: slog.New(slog.DiscardHandler)}).newRun()
			vm := &manifest.VM{Name: "vm", WasRunning: !tc.paused, StateFile: hostpath.QEMU(filepath.Join(dir, "vm.state")),
				Transfer: &manifest.Transfer{Trace: hostpath.QEMU(trace)}}
			ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
			defer cancel()
			ran, stopped := r.awaitStart(ctx, vm, q)
			if ran != tc.wantRan {
				t.Errorf("awaitStart ran = %v, want %v", ran, tc.wantRan)
			}
			if stopped != tc.wantStoppedByUs {
				t.Errorf("awaitStart stopped = %v, want %v", stopped, tc.wantStoppedByUs)
			}
			if got := r.consumed(vm); got != tc.wantRan {
				t.Errorf("consumed = %v, want %v", got, tc.wantRan)
			}
			if tc.wantStopped && !tc.wantStoppedByUs {
				// It ends by itself, maybe a moment after awaitStart
				// read its trace.
				select {
				case <-p.Exited():
				case <-time.After(5 * time.Second):
				}
			}
			select {
			case <-p.Exited():
				if !tc.wantStopped {
					t.Errorf("the twin is gone; want it alive, keeping the guest")
				}
			default:
				if tc.wantStopped {
					t.Errorf("the twin still lives; want it gone")
				}
			}
		})
	}
	// Without a run trace (a cpr-reboot guest, an older manifest) nothing
	// is read into it.
	r := (&Engine{StateDir: "/nonexistent"}).newRun()
	if r.twinStarted(&manifest.VM{Name: "vm", Transfer: &manifest.Transfer{}}) {
		t.Error("twinStarted without a trace")
	}
}
