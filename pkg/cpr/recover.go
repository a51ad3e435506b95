package cpr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Recovery says what Recover did with one guest.
type Recovery struct {
	VM     string `json:"vm"`
	Action string `json:"action"` // running, resumed, restored, failed
	Detail string `json:"detail,omitempty"`
}

// Recover brings every guest the manifest records back to running, from
// whatever state it finds — whichever step of a restart or an update was
// interrupted, and however (our crash, a QEMU killed, a full disk, a hung
// monitor) — and is idempotent: a second run finds everything running and
// changes nothing.
//
//   - a QEMU of that name runs the guest: nothing to do;
//   - the guest's old QEMU still lives, paused (the save ran, or was
//     cancelled, and nobody quit it): its migration is cancelled and it
//     continues, and its state file is set aside as .aborted;
//   - a new QEMU of that name waits for its state and never got it: it is
//     stopped, and the guest restored again — or, if it was started early
//     and the old QEMU still lives, stopped and the old one resumed, with
//     its sockets put back;
//   - no QEMU runs it and its state file is there: it is restored;
//   - anything else is reported, with its RAM and files left as they are.
//
// held are fds the caller still holds (see Restore). The rollbacks of
// restart-qemu and update, PID 1's restore and `liveupdate recover` all
// come through here.
func (e *Engine) Recover(ctx context.Context, m *manifest.Manifest, held map[string]map[int]*os.File) ([]Recovery, error) {
	return e.runOn(m).recover(ctx, held)
}

// observed is what recover finds of one guest.
type observed struct {
	qemus      int    // QEMUs of the guest's name that run
	twinsApart bool   // the old QEMU's monitor is moved aside: twins' answers can be told apart
	found      bool   // a QEMU of that name runs
	answers    bool   // its monitor answered
	status     string // and said this (query-status)
	isOld      bool   // it is the guest's old QEMU (same boot, same pid)
	stateFile  bool   // the guest's state file is there to load (not consumed)
	consumed   bool   // a new QEMU loaded the state file (.done) and may have run the guest
	wasRunning bool   // the guest ran before the run (else it was paused, and stays so)
	// libvirtRuns: libvirt's daemon holds the monitor of the QEMU found,
	// libvirt's record names that QEMU, and the run confirmed the guest
	// running on it (the manifest's running, with that QEMU as its new
	// one): libvirt has taken the guest back, which is the end wanted.
	libvirtRuns bool
}

// asItWas tells whether the QEMU found runs the guest as it was before the
// run: running, or — a guest that was paused — paused with its state
// loaded (a new QEMU) or never sent away (the old one, "postmigrate" after
// its save).
func (o observed) asItWas() bool {
	if o.status == "running" {
		return true
	}
	return !o.wasRunning && (o.status == "paused" || o.status == "postmigrate")
}

// action is what recover does with one guest.
type action int

const (
	reportTwins  action = iota // twins share one monitor: touch neither, say which to stop
	reportHung                 // a QEMU runs it but does not answer: touch nothing
	markRunning                // a QEMU runs the guest: record which
	resumeOld                  // the old QEMU lives, paused: continue it there
	restartNew                 // a new QEMU never got its state: stop it, restore again
	contLoaded                 // a new QEMU loaded the state but was not continued: cont
	restoreState               // no QEMU runs it, its state file is there: restore
	reportLost                 // no QEMU and no state file: report, leave the RAM alone
	reportStale                // only the old QEMU, whose state a new QEMU (gone) consumed: never continue it
	libvirtHasIt               // confirmed running on its new QEMU, which libvirt manages again: nothing to do
	reportTorn                 // only a new QEMU that never got the whole state, none to load again: report
)

// decide is recover's judgement of one guest, from what it observed.
func decide(o observed) action {
	switch {
	case o.qemus > 1 && !o.twinsApart:
		return reportTwins
	case o.found && !o.answers && o.libvirtRuns:
		return libvirtHasIt
	case o.found && !o.answers:
		return reportHung
	case o.isOld && o.consumed && o.status != "running":
		return reportStale
	case o.found && o.asItWas():
		return markRunning
	case o.isOld:
		return resumeOld
	case o.found && o.status == "inmigrate" && o.stateFile:
		return restartNew
	case o.found && o.status == "inmigrate":
		return reportTorn
	case o.found:
		return contLoaded
	case o.stateFile:
		return restoreState
	default:
		return reportLost
	}
}

func (r *run) recover(ctx context.Context, held map[string]map[int]*os.File) ([]Recovery, error) {
	m := r.man
	sameBoot := m.Host.BootID == currentBootID()
	live, twins, err := r.liveQEMUs(ctx, m)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, t := range live {
			t.Close()
		}
	}()
	out := make([]Recovery, len(m.VMs))
	restore := map[string]bool{}
	var resume []*Target
	var errs []error
	failed := func(i int, detail string) {
		out[i].Action, out[i].Detail = "failed", detail
		m.VMs[i].Status, m.VMs[i].Error = manifest.StatusFailed, detail
		errs = append(errs, fmt.Errorf("%s: %s", m.VMs[i].Name, detail))
	}
	for i := range m.VMs {
		vm := &m.VMs[i]
		out[i] = Recovery{VM: vm.Name}
		t := live[vm.Name]
		o := observed{qemus: len(twins[vm.Name]), twinsApart: r.monitorAside(vm), found: t != nil,
			isOld:    t != nil && sameBoot && t.Proc.PID == vm.PID,
			consumed: r.consumed(vm), wasRunning: vm.WasRunning}
		// A state file to load: there, not a transfer's note, and not
		// consumed (marked on tmpfs, its rename not done yet).
		o.stateFile = fileExists(r.local(vm.StateFile)) && vm.Transfer == nil && !o.consumed
		if t != nil {
			r.lowerLeftRaised(t, vm)
			o.answers, o.status = t.Facts.QMPErr == nil, t.Facts.Status
			o.libvirtRuns = errors.Is(t.Facts.QMPErr, libvirt.ErrDaemonRuns) && t.Libvirt != "" &&
				vm.Status == manifest.StatusRunning && vm.NewPID == t.Proc.PID
		}
		if !sameBoot || unix.Kill(vm.PID, 0) != nil {
			r.dropAside(vm) // the old QEMU is gone: nothing to put back
		}
		switch decide(o) {
		case reportTwins:
			failed(i, fmt.Sprintf("%d QEMUs run it (pids %v), left by an interrupted restart; they share one monitor socket and cannot be told apart from here: stop the one that does not run the guest (the old one is pid %d, the others were started for it), then run recover again", o.qemus, twins[vm.Name], vm.PID))
		case libvirtHasIt:
			out[i].Action, out[i].Detail = "running", "libvirt manages it again (its daemon holds the monitor)"
		case reportHung:
			if errors.Is(t.Facts.QMPErr, libvirt.ErrDaemonRuns) {
				stop, start := libvirt.StopHint(libvirt.Daemons(r.ProcRoot))
				failed(i, fmt.Sprintf("QEMU pid %d runs it, but %v: stop the daemon (`%s`), run recover again, then `%s`", t.Proc.PID, t.Facts.QMPErr, stop, start))
				continue
			}
			failed(i, fmt.Sprintf("QEMU pid %d runs it but its monitor does not answer (stopped? hung?): %v", t.Proc.PID, t.Facts.QMPErr))
		case markRunning:
			out[i].Action = "running"
			if !vm.WasRunning {
				out[i].Action, out[i].Detail = "paused", "paused, as it was before the run"
			}
			r.dropTapPersistence(t, vm)
			if t.QMP != nil {
				cctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
				r.giveBackMigration(cctx, t.QMP, vm, !o.isOld)
				if err := r.handOver(cctx, t.QMP, vm, t.Proc.PID, !o.isOld); err != nil {
					cancel()
					failed(i, err.Error())
					continue
				}
				cancel()
			}
			if o.isOld {
				vm.Status = manifest.StatusResumed
				r.setAside(vm)
			} else {
				vm.Status, vm.NewPID, vm.Error = manifest.StatusRunning, t.Proc.PID, ""
				r.markDone(vm) // a new QEMU runs it: its state file was loaded
			}
		case resumeOld:
			t.rec = vm
			resume = append(resume, t)
			out[i].Action = "resumed"
		case restartNew:
			r.Log.Warn("stopping a new QEMU that never loaded its state", "vm", vm.Name, "pid", t.Proc.PID)
			r.killAndWait(t.Proc.PID)
			vm.Status = manifest.StatusQuit
			restore[vm.Name] = true
			out[i].Action = "restored"
		case contLoaded:
			// Loaded but not continued (e.g. we died before cont); a guest
			// that was paused before the run stays paused.
			c := t.QMP
			cctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
			var err error
			if vm.WasRunning {
				err = c.Execute(cctx, "cont", nil, nil)
			}
			if err == nil {
				r.giveBackMigration(cctx, c, vm, true)
			}
			if err != nil {
				cancel()
				failed(i, "cont: "+err.Error())
				continue
			}
			err = r.handOver(cctx, c, vm, t.Proc.PID, true)
			cancel()
			if err != nil {
				failed(i, err.Error())
				continue
			}
			vm.Status, vm.NewPID, vm.Error = manifest.StatusRunning, t.Proc.PID, ""
			r.markDone(vm)
			r.dropTapPersistence(t, vm)
			out[i].Action = "running"
			out[i].Detail = "continued the restored QEMU"
		case restoreState:
			vm.Status = manifest.StatusQuit
			restore[vm.Name] = true
			out[i].Action = "restored"
		case reportStale:
			failed(i, fmt.Sprintf("only its old QEMU pid %d runs it, paused, but a new QEMU (now gone) had loaded its state and may have run the guest: the old QEMU's device state is behind the guest's RAM, so it is not continued. The RAM file is left as it is", vm.PID))
		case reportTorn:
			failed(i, fmt.Sprintf("only its new QEMU pid %d lives, still waiting for the guest's device state, and there is no state file to give it (a cpr-transfer cut off with its old QEMU gone, or the file removed): the guest cannot be continued. Its RAM file is left as it is; stop that QEMU and boot the guest afresh", t.Proc.PID))
		case reportLost:
			if o.consumed {
				failed(i, "no QEMU runs it and its state file "+string(vm.StateFile)+" was loaded by a QEMU now gone, which may have run the guest: it is not loaded again (its RAM file is left as it is)")
				break
			}
			failed(i, "no QEMU runs it and its state file "+string(vm.StateFile)+" is gone (its RAM file is left as it is)")
		}
	}
	if len(resume) > 0 {
		if err := r.resume(ctx, resume); err != nil {
			errs = append(errs, err)
		}
		for _, t := range resume {
			r.dropTapPersistence(t, t.rec)
		}
	}
	if err := r.restore(ctx, held, restore); err != nil {
		errs = append(errs, err)
	}
	for i := range m.VMs {
		if vm := &m.VMs[i]; vm.Status == manifest.StatusFailed && out[i].Action != "failed" {
			out[i].Action, out[i].Detail = "failed", vm.Error // resume or restore said why
		}
	}
	if err := r.write(); err != nil {
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

// handOver gives the QEMU that now runs the guest (c, pid; isNew: not
// the old one) what an interrupted run had not given it yet: a twin
// started -vnc none its VNC port, and libvirt's record. Only the record is
// an error: without its VNC server the guest still runs.
func (r *run) handOver(ctx context.Context, c *qmp.Client, vm *manifest.VM, pid int, isNew bool) error {
	if isNew && vm.TwinVNC != nil {
		if err := r.takeVNC(ctx, vm, c); err != nil {
			r.Log.Warn("the guest runs without its VNC server", "vm", vm.Name, "err", err)
		}
	}
	return r.handBackToLibvirt(ctx, c, vm, pid)
}

// dropTapPersistence gives the taps of a guest's running QEMU back the
// non-persistence a save took from them (a run interrupted after its save
// leaves them persistent, so they would outlive the QEMU), through a copy
// of the QEMU's own fd: a single-queue tap cannot be opened twice.
func (r *run) dropTapPersistence(t *Target, vm *manifest.VM) {
	for _, fd := range vm.Fds {
		if fd.Kind != qemuargv.FdTap || fd.TapPersist {
			continue
		}
		for num, fi := range t.Proc.Fds {
			if fi.TapName != fd.TapName {
				continue
			}
			f, err := tapdev.DupFromProcess(t.Proc.PID, num)
			if err == nil {
				err = tapdev.SetPersist(f, false)
				f.Close()
			}
			if err != nil {
				r.Log.Warn("giving the tap back its non-persistence", "vm", vm.Name, "tap", fd.TapName, "err", err)
			}
			break
		}
	}
}

// liveQEMUs finds the running QEMUs by name. A QEMU of the manifest's
// whose monitor is not up yet may be one the interrupted run had just
// started, and a cpr-transfer's new QEMU may still be loading: each is
// given the QMP timeout to come up, or to load, before it is judged.
func (r *run) liveQEMUs(ctx context.Context, m *manifest.Manifest) (live map[string]*Target, twins map[string][]int, err error) {
	deadline := time.Now().Add(r.QMPTimeout)
	for {
		ts, err := r.plan(ctx, nil, true)
		if err != nil {
			return nil, nil, fmt.Errorf("finding the running QEMUs: %w", err)
		}
		if r.settleTwins(ts, m, time.Now().Before(deadline)) {
			CloseAll(ts) // old QEMUs' sockets are back: look again
			continue
		}
		waiting := false
		for _, t := range ts {
			for _, vm := range m.VMs {
				// (A cpr-transfer's new QEMU still loading runs the guest
				// the moment it is done: it is not judged before.)
				waiting = waiting || (vm.Name == t.Name() && (t.Facts.QMPErr != nil ||
					vm.Transfer != nil && t.Facts.Status == "inmigrate"))
			}
		}
		if !waiting || time.Now().After(deadline) {
			live, twins = map[string]*Target{}, map[string][]int{}
			for _, t := range ts {
				if prev := live[t.Name()]; prev != nil {
					prev.Close()
				}
				live[t.Name()] = t
				twins[t.Name()] = append(twins[t.Name()], t.Proc.PID)
			}
			return live, twins, nil
		}
		CloseAll(ts)
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// killAndWait kills a QEMU that holds nothing of the guest any more (a new
// one that never loaded its state, an old one its twin superseded) and
// waits until it is gone.
func (r *run) killAndWait(pid int) {
	if err := qemuproc.KillAndWait(pid, 10*time.Second); err != nil {
		r.Log.Warn("killing a QEMU that does not run its guest", "pid", pid, "err", err)
	}
}
