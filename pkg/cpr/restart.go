package cpr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/phase"
)

// RestartQEMU is the QEMU-only live restart: plan, save and quit every
// selected VM, then start each again (on binary, if set) and restore it. If
// any selected VM is unsafe nothing is touched, unless skipUnsafe, in which
// case only the safe ones are restarted and the others are reported.
//
//	plan → save (Save's table) → restore → retire the old QEMUs started beside
//	plan → set-up (Save's first steps) → each guest: save → load → cont → retire (o.Each)
func (e *Engine) RestartQEMU(ctx context.Context, names []string, o SaveOptions, skipUnsafe bool) (*manifest.Manifest, []*Target, error) {
	r := e.newRun()
	r.clockLater = true // after retireOld
	r.realtime = true
	defer func() { r.lower("", r.self) }() // at the latest
	var ts []*Target
	err := r.timed("plan", "", func() (err error) {
		ts, err = r.plan(ctx, names, false)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	defer CloseAll(ts)
	if len(ts) == 0 {
		return nil, nil, fmt.Errorf("no running QEMU found")
	}
	if err := fault.At("plan"); err != nil {
		return nil, ts, err
	}
	safe, unsafe := bySafety(ts)
	if len(unsafe) > 0 && !skipUnsafe {
		return nil, ts, fmt.Errorf("refusing to touch any VM, these are not safe to restart (nothing was changed):\n  %s", strings.Join(unsafe, "\n  "))
	}
	if o.QEMUBinary != "" {
		if _, err := os.Stat(o.QEMUBinary); err != nil {
			return nil, ts, fmt.Errorf("new QEMU binary: %w", err)
		}
	}
	var m *manifest.Manifest
	var saveErr, rerr error
	if o.Each > 0 {
		if m, rerr = r.restartEach(ctx, safe, o); m == nil {
			return nil, ts, rerr
		}
	} else {
		m, saveErr = r.save(ctx, safe, o)
		if saveErr != nil && (m == nil || !AnyQuit(m)) {
			r.fixClocks(ctx)      // of guests a rollback finished on their new QEMU (rollForward)
			return m, ts, saveErr // every other VM runs on its old QEMU
		}
		rerr = r.restore(ctx, Held(safe), nil)
	}
	r.lower("", r.self) // the last cont is done
	err = errors.Join(saveErr, rerr, r.retireOld(ctx, safe))
	r.fixClocks(ctx)
	if err == nil && len(unsafe) > 0 {
		err = fmt.Errorf("skipped unsafe VMs:\n  %s", strings.Join(unsafe, "\n  "))
	}
	return m, ts, err
}

// restartEach restarts each guest on its own (SaveOptions.Each). The steps
// before any guest stops are shared — VMs recorded, manifest written, new
// QEMUs started beside the old ones, old ones set up — and their failure
// resumes every guest, as Save's does. Then each guest goes save → load →
// cont as soon as one of Each slots is free, waiting for no other guest: its
// blackout is its own save and load whatever the number of guests, and the
// guests waiting for a slot run on untouched. A guest whose save fails
// continues on its old QEMU at once, one whose new QEMU fails to load
// continues there afterwards (retireOld); either way the others are
// restarted. A guest with no new QEMU started early goes save → quit →
// start → load, alone too. The manifest is written once every guest is
// done (each guest's record is its own goroutine's until then; recover
// judges by what runs, not by the record).
func (r *run) restartEach(ctx context.Context, ts []*Target, o SaveOptions) (*manifest.Manifest, error) {
	if err := allSafe(ts); err != nil {
		return nil, err
	}
	if err := phase.Run(ctx, r.recordHost, r.setupSteps(ts, o)...); err != nil {
		return r.setupFailed(err)
	}
	if r.realtime {
		r.self = r.raiseSelf()
	}
	held := Held(ts)
	slots := make(chan struct{}, o.Each)
	errs := make([]error, len(ts))
	var wg sync.WaitGroup
	for i, t := range ts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case slots <- struct{}{}:
				defer func() { <-slots }()
				errs[i] = r.restartOne(ctx, t, held[t.Name()])
			case <-ctx.Done(): // never stopped: it goes on as it was
				errs[i] = errors.Join(fmt.Errorf("%s: not restarted: %w", t.Name(), ctx.Err()),
					r.undoSave(context.WithoutCancel(ctx), []*Target{t}))
			}
		}()
	}
	wg.Wait()
	if err := r.write(); err != nil {
		errs = append(errs, fmt.Errorf("recording the restarts: %w", err))
	}
	return r.man, errors.Join(errs...)
}

// restartOne is one guest's turn in restartEach: save, then (no new QEMU
// started early) quit, then load and cont on the new QEMU. Each step is a
// fault point for that guest.
func (r *run) restartOne(ctx context.Context, t *Target, held map[int]*os.File) error {
	if err := r.timedPoint("save", t.Name(), func() error { return r.saveOne(ctx, t) }); err != nil {
		uerr := r.undoSave(context.WithoutCancel(ctx), []*Target{t})
		switch {
		case t.forward && uerr == nil:
			return fmt.Errorf("%s: save failed after its handover (%w): its restart was finished on its new QEMU", t.Name(), err)
		case t.forward:
			return fmt.Errorf("%s: save failed after its handover (%v), and finishing its restart on its new QEMU failed too: %w", t.Name(), err, uerr)
		case uerr != nil:
			return fmt.Errorf("%s: save failed (%v), and resuming it on its old QEMU failed too: %w", t.Name(), err, uerr)
		}
		return fmt.Errorf("%s: save failed, resumed on its old QEMU: %w", t.Name(), err)
	}
	t.rec.Status = manifest.StatusSaved
	if !t.early {
		if err := r.timedPoint("quit", t.Name(), func() error { return r.quitOne(ctx, t) }); err != nil {
			return fmt.Errorf("%s: saved, then quitting its old QEMU: %w (recover restores it from its state file once the old QEMU is gone)", t.Name(), err)
		}
	}
	return r.restoreVM(ctx, t.rec, held, r.mappedRAM)
}

// bySafety splits targets into those safe to restart and, for the others,
// why not.
func bySafety(ts []*Target) (safe []*Target, unsafe []string) {
	for _, t := range ts {
		if t.Verdict.OK {
			safe = append(safe, t)
		} else {
			unsafe = append(unsafe, fmt.Sprintf("%s: %s", t.Name(), strings.Join(t.Verdict.Problems, "; ")))
		}
	}
	return safe, unsafe
}

// AnyQuit tells whether some VM of m was saved (and its old QEMU may be
// gone): the way back is then a restore, not a resume.
func AnyQuit(m *manifest.Manifest) bool {
	for _, v := range m.VMs {
		if v.Status == manifest.StatusQuit || v.Status == manifest.StatusSaved {
			return true
		}
	}
	return false
}
