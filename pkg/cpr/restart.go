package cpr

import (
	"context"
	"errors"
	"fmt"
	"github.com/liveupdate/liveupdate/pkg/fault"
	"os"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// RestartQEMU is the QEMU-only live restart: plan, save and quit every
// selected VM, then start each again (on binary, if set) and restore it. If
// any selected VM is unsafe nothing is touched, unless skipUnsafe, in which
// case only the safe ones are restarted and the others are reported.
func (e *Engine) RestartQEMU(ctx context.Context, names []string, o SaveOptions, skipUnsafe bool) (*manifest.Manifest, []*Target, error) {
	var ts []*Target
	err := e.timed("plan", "", func() error {
		var err error
		ts, err = e.Plan(ctx, names)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		for _, t := range ts {
			t.Close()
		}
	}()
	if len(ts) == 0 {
		return nil, nil, fmt.Errorf("no running QEMU found")
	}
	if err := fault.At("plan"); err != nil {
		return nil, ts, err
	}
	var safe []*Target
	var unsafe []string
	for _, t := range ts {
		if t.Verdict.OK {
			safe = append(safe, t)
		} else {
			unsafe = append(unsafe, fmt.Sprintf("%s: %s", t.Name(), strings.Join(t.Verdict.Problems, "; ")))
		}
	}
	if len(unsafe) > 0 && !skipUnsafe {
		return nil, ts, fmt.Errorf("refusing to touch any VM, these are not safe to restart (nothing was changed):\n  %s", strings.Join(unsafe, "\n  "))
	}
	if o.QEMUBinary != "" {
		if _, err := os.Stat(o.QEMUBinary); err != nil {
			return nil, ts, fmt.Errorf("new QEMU binary: %w", err)
		}
	}
	m, err := e.Save(ctx, safe, o)
	if err != nil && (m == nil || !AnyQuit(m)) {
		return m, ts, err
	}
	saveErr := err
	held := map[string]map[int]*os.File{}
	for _, t := range safe {
		held[t.Name()] = t.files
	}
	rerr := e.Restore(ctx, m, held)
	err = errors.Join(saveErr, rerr, e.retireOld(ctx, safe))
	if err == nil && len(unsafe) > 0 {
		err = fmt.Errorf("skipped unsafe VMs:\n  %s", strings.Join(unsafe, "\n  "))
	}
	return m, ts, err
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
