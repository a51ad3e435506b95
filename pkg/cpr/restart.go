package cpr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// RestartQEMU is the QEMU-only live restart: plan, save and quit every
// selected VM, then start each again (on binary, if set) and restore it. If
// any selected VM is unsafe nothing is touched, unless skipUnsafe, in which
// case only the safe ones are restarted and the others are reported.
//
//	plan → save (Save's table) → restore → retire the old QEMUs started beside
func (e *Engine) RestartQEMU(ctx context.Context, names []string, o SaveOptions, skipUnsafe bool) (*manifest.Manifest, []*Target, error) {
	r := e.newRun()
	r.clockLater = true // after retireOld
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
	m, saveErr := r.save(ctx, safe, o)
	if saveErr != nil && (m == nil || !AnyQuit(m)) {
		return m, ts, saveErr // every VM runs on its old QEMU
	}
	rerr := r.restore(ctx, Held(safe), nil)
	err = errors.Join(saveErr, rerr, r.retireOld(ctx, safe))
	r.fixClocks(ctx)
	if err == nil && len(unsafe) > 0 {
		err = fmt.Errorf("skipped unsafe VMs:\n  %s", strings.Join(unsafe, "\n  "))
	}
	return m, ts, err
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
