package cpr

import (
	"context"
	"errors"
	"fmt"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// The way back to the old QEMUs, for VMs whose old QEMU still runs: the
// undos of Save's steps, one function each, and resume, all of them at
// once, for the runs that find old QEMUs to continue (retireOld, Recover).

// continueOld is the undo of the save step: it cancels any migration,
// continues each VM that was running on its old QEMU, and sets the state
// file aside (it will not be loaded).
func (r *run) continueOld(ctx context.Context, ts []*Target) error {
	var errs []error
	for _, t := range ts {
		if t.rec == nil || t.QMP == nil || t.forward {
			continue
		}
		if r.consumed(t.rec) {
			// A new QEMU loaded this guest and may have run it: the old
			// QEMU's device state is behind its RAM. Never continue it.
			t.rec.Status = manifest.StatusFailed
			t.rec.Error = "not resumed on the old QEMU: a new QEMU loaded its state and may have run it (its device state is behind the RAM)"
			errs = append(errs, fmt.Errorf("%s: %s", t.Name(), t.rec.Error))
			continue
		}
		// The state file is set aside before cont: once the old QEMU runs
		// the guest again, nothing may load that file.
		r.setAside(t.rec)
		if err := r.continueOne(ctx, t); err != nil {
			t.rec.Status = manifest.StatusFailed
			t.rec.Error = "resuming on the old QEMU: " + err.Error()
			errs = append(errs, fmt.Errorf("%s: resuming: %w", t.Name(), err))
			r.Log.Error("could not resume", "vm", t.Name(), "err", err)
			continue
		}
		t.rec.Status = manifest.StatusResumed
		r.Log.Info("resumed on old QEMU", "vm", t.Name())
	}
	return errors.Join(errs...)
}

func (r *run) continueOne(ctx context.Context, t *Target) error {
	ctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	defer cancel()
	var q struct{ Status string }
	if err := t.QMP.Execute(ctx, "query-migrate", nil, &q); err == nil && q.Status != "" &&
		q.Status != "completed" && q.Status != "failed" && q.Status != "cancelled" {
		t.QMP.Execute(ctx, "migrate_cancel", nil, nil)
	}
	var st struct{ Running bool }
	err := t.QMP.Execute(ctx, "query-status", nil, &st)
	if err == nil && t.rec.WasRunning && !st.Running {
		err = t.QMP.Execute(ctx, "cont", nil, nil)
	}
	return err
}

// giveBackAll is the undo of migrate-setup: every old QEMU set up for the
// save gets the VM's own migration set-up back.
func (r *run) giveBackAll(ctx context.Context, ts []*Target) {
	for _, t := range ts {
		if t.rec == nil || t.QMP == nil || t.rec.Migration == nil || t.forward {
			continue
		}
		gctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
		r.giveBackMigration(gctx, t.QMP, t.rec, false)
		cancel()
	}
}

// dropAllEarly is the undo of early-start.
func (r *run) dropAllEarly(ts []*Target) {
	for _, t := range ts {
		if t.rec != nil {
			r.dropEarly(t.rec)
		}
	}
}

// resume is every undo of Save at once, for VMs whose old QEMU still runs:
// the new QEMU started early is stopped, the migration cancelled, the VM
// continued with its own migration set-up, its taps given back their
// persistence, and the manifest records it.
func (r *run) resume(ctx context.Context, ts []*Target) error {
	return errors.Join(r.undoSave(ctx, ts), r.write())
}

// undoSave is resume without the manifest write, for a guest taken on its
// own while others' records change (restartEach writes once at the end).
func (r *run) undoSave(ctx context.Context, ts []*Target) error {
	ferr := r.rollForward(ctx, ts) // first: a handed-over guest's twin is not stopped
	r.dropAllEarly(ts)
	err := r.continueOld(ctx, ts)
	r.giveBackAll(ctx, ts)
	r.releaseTaps(ts)
	return errors.Join(ferr, err)
}
