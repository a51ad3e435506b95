package cpr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/kexec"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
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
	e.man = m
	e.StateDir = m.StateDir
	sameBoot := m.Host.BootID == currentBootID()
	if sameBoot {
		e.undoUpdate(m)
	}
	live, twins, err := e.liveQEMUs(ctx, m)
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
		if pids := twins[vm.Name]; len(pids) > 1 && !e.monitorAside(vm) {
			// Twins settleTwins could not tell apart: their monitor is one
			// socket passed by fd to both (libvirt's way). Touch neither.
			failed(i, fmt.Sprintf("%d QEMUs run it (pids %v), left by an interrupted restart; they share one monitor socket and cannot be told apart from here: stop the one that does not run the guest (the old one is pid %d, the others were started for it), then run recover again", len(pids), pids, vm.PID))
			continue
		}
		isOld := t != nil && sameBoot && t.Proc.PID == vm.PID
		if !sameBoot || unix.Kill(vm.PID, 0) != nil {
			e.dropAside(vm) // the old QEMU is gone: nothing to put back
		}
		switch {
		case t != nil && t.Facts.QMPErr != nil:
			failed(i, fmt.Sprintf("QEMU pid %d runs it but its monitor does not answer (stopped? hung?): %v", t.Proc.PID, t.Facts.QMPErr))
		case t != nil && t.Facts.Status == "running":
			out[i].Action = "running"
			e.dropTapPersistence(t, vm)
			if t.QMP != nil {
				cctx, cancel := context.WithTimeout(ctx, e.QMPTimeout)
				e.giveBackMigration(cctx, t.QMP, vm)
				cancel()
			}
			if isOld {
				vm.Status = manifest.StatusResumed
				e.setAside(vm)
			} else {
				vm.Status, vm.NewPID, vm.Error = manifest.StatusRunning, t.Proc.PID, ""
				e.markDone(vm) // a new QEMU runs it: its state file was loaded
			}
		case isOld:
			t.rec = vm
			resume = append(resume, t)
			out[i].Action = "resumed"
		case t != nil && t.Facts.Status == "inmigrate":
			// A new QEMU that never got its state: start that again.
			e.Log.Warn("stopping a new QEMU that never loaded its state", "vm", vm.Name, "pid", t.Proc.PID)
			killAndWait(t.Proc.PID)
			vm.Status = manifest.StatusQuit
			restore[vm.Name] = true
			out[i].Action = "restored"
		case t != nil:
			// Loaded but not continued (e.g. we died before cont).
			c := t.QMP
			cctx, cancel := context.WithTimeout(ctx, e.QMPTimeout)
			err := c.Execute(cctx, "cont", nil, nil)
			if err == nil {
				e.giveBackMigration(cctx, c, vm)
			}
			cancel()
			if err != nil {
				failed(i, "cont: "+err.Error())
				continue
			}
			vm.Status, vm.NewPID, vm.Error = manifest.StatusRunning, t.Proc.PID, ""
			e.markDone(vm)
			e.dropTapPersistence(t, vm)
			out[i].Action = "running"
			out[i].Detail = "continued the restored QEMU"
		case fileExists(e.HostPath(vm.StateFile)):
			vm.Status = manifest.StatusQuit
			restore[vm.Name] = true
			out[i].Action = "restored"
		default:
			failed(i, "no QEMU runs it and its state file "+vm.StateFile+" is gone (its RAM file is left as it is)")
		}
	}
	if len(resume) > 0 {
		if err := e.Resume(resume); err != nil {
			errs = append(errs, err)
		}
		for _, t := range resume {
			e.dropTapPersistence(t, t.rec)
		}
	}
	if err := e.restore(ctx, m, held, restore); err != nil {
		errs = append(errs, err)
	}
	for i := range m.VMs {
		if vm := &m.VMs[i]; vm.Status == manifest.StatusFailed && out[i].Action != "failed" {
			out[i].Action, out[i].Detail = "failed", vm.Error // Resume or Restore said why
		}
	}
	if err := e.writeManifest(); err != nil {
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

// undoUpdate undoes what an update that died before its kexec did to this
// host: the filesystems it made read-only (and PMEM, where the state
// directory is) are made writable again, and the new kernel it loaded is
// unloaded. Each step is idempotent.
func (e *Engine) undoUpdate(m *manifest.Manifest) {
	loaded := false
	for _, p := range m.Phases {
		loaded = loaded || p.Name == "kexec-load"
	}
	if !loaded {
		return // not an update
	}
	dirs := slices.Clone(m.Remounted)
	if pm, err := mounts.Holding("/proc/self/mounts", e.HostPath(m.StateDir)); err == nil {
		dirs = append(dirs, pm.Dir)
	}
	for _, d := range dirs {
		var st unix.Statfs_t
		if unix.Statfs(d, &st) != nil || st.Flags&unix.ST_RDONLY == 0 {
			continue
		}
		if err := unix.Mount("", d, "", unix.MS_REMOUNT, ""); err != nil {
			e.Log.Error("remounting read-write", "mount", d, "err", err)
			continue
		}
		e.Log.Info("remounted read-write (the update had made it read-only)", "mount", d)
	}
	if kexec.Loaded() {
		if err := kexec.Unload(); err != nil {
			e.Log.Warn("unloading the new kernel the update had loaded", "err", err)
		} else {
			e.Log.Info("unloaded the new kernel the update had loaded")
		}
	}
}

// dropTapPersistence gives the taps of a guest's running QEMU back the
// non-persistence a save took from them (a run interrupted after its save
// leaves them persistent, so they would outlive the QEMU), through a copy
// of the QEMU's own fd: a single-queue tap cannot be opened twice.
func (e *Engine) dropTapPersistence(t *Target, vm *manifest.VM) {
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
				e.Log.Warn("giving the tap back its non-persistence", "vm", vm.Name, "tap", fd.TapName, "err", err)
			}
			break
		}
	}
}

// setAside renames a state file that will not be loaded (its guest runs on
// the QEMU that wrote it) to .aborted.
func (e *Engine) setAside(vm *manifest.VM) {
	if sf := e.HostPath(vm.StateFile); fileExists(sf) {
		os.Rename(sf, sf+".aborted")
	}
}

// markDone renames a loaded state file to .done.
func (e *Engine) markDone(vm *manifest.VM) {
	if sf := e.HostPath(vm.StateFile); fileExists(sf) {
		os.Rename(sf, sf+".done")
	}
}

func currentBootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

// CloseAll releases the targets' QMP connections and held files.
func CloseAll(ts []*Target) {
	for _, t := range ts {
		t.Close()
	}
}

// liveQEMUs finds the running QEMUs by name. A QEMU of the manifest's
// whose monitor is not up yet may be one the interrupted run had just
// started: it is given the QMP timeout to come up before it is judged.
func (e *Engine) liveQEMUs(ctx context.Context, m *manifest.Manifest) (live map[string]*Target, twins map[string][]int, err error) {
	deadline := time.Now().Add(e.QMPTimeout)
	for {
		ts, err := e.plan(ctx, nil, true)
		if err != nil {
			return nil, nil, fmt.Errorf("finding the running QEMUs: %w", err)
		}
		if e.settleTwins(ts, m) {
			CloseAll(ts) // old QEMUs' sockets are back: look again
			continue
		}
		waiting := false
		for _, t := range ts {
			for _, vm := range m.VMs {
				waiting = waiting || (vm.Name == t.Name() && t.Facts.QMPErr != nil)
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

// killAndWait kills a new QEMU that never loaded its state (it holds
// nothing of the guest) and waits until it is gone.
func killAndWait(pid int) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // already gone
	}
	defer unix.Close(pidfd)
	unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
	waitPidfd(pidfd, 10*time.Second)
}
