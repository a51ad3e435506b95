package cpr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// Starting the new QEMU early (restart-qemu). A QEMU takes 100 ms and more
// to start before its monitor answers (seconds in a nested host); started
// with -incoming defer while the old QEMU still runs the guest, that time
// leaves the blackout, which becomes save + load (the old QEMU is killed
// once the new one runs the guest).
//
// Two QEMUs of one guest at once need care:
//   - QEMU unlinks a server socket's path before it binds it, and again when
//     it quits; it locks its -pidfile. The old QEMU's sockets and pidfile
//     are moved aside (PATH.lu-old) before the new one starts, so that the
//     new one makes its own and a rollback can put the old ones back; and
//     the old QEMU, once its guest runs on the new one, is killed, not
//     quit, as quitting would unlink the paths the new one uses. Its disks
//     were flushed and released by the migration. The new QEMU runs the
//     very same command line.
//   - A tap opened by name (single queue), a TCP port, a client socket whose
//     server takes one client cannot be held twice (qemuargv.TwinConflicts):
//     such a VM, and any VM whose early QEMU does not come up, is restarted
//     the sequential way.

// asideSuffix marks an old QEMU's socket moved out of its new twin's way.
const asideSuffix = ".lu-old"

// startEarly starts every target's new QEMU beside its old one, in
// parallel. A VM whose new QEMU cannot start early is logged and left to
// the sequential way; nothing of its old QEMU is changed.
func (r *run) startEarly(ctx context.Context, ts []*Target) {
	for i, err := range r.inParallel("early-start", ts, func(t *Target) error { return r.startEarlyOne(ctx, t) }) {
		if err != nil {
			r.Log.Warn("cannot start the new QEMU beside the old one; restarting this VM the sequential way", "vm", ts[i].Name(), "why", err)
		}
	}
}

func (r *run) startEarlyOne(ctx context.Context, t *Target) error {
	vm := t.rec
	c, err := qemuargv.Parse(vm.RestartArgv)
	if err != nil {
		return err
	}
	if conflicts := c.TwinConflicts(); len(conflicts) > 0 {
		return errors.New(strings.Join(conflicts, "; "))
	}
	aside := r.ownPaths(vm)
	for i, p := range aside {
		if err := os.Rename(p, p+asideSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			putBack(aside[:i])
			return fmt.Errorf("moving the old QEMU's socket aside: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, r.RestoreTimeout)
	defer cancel()
	argv := vm.RestartArgv
	if twin, addr, ok := c.TwinVNC(); ok {
		// The old QEMU holds the port until it is killed: retireOld
		// hands it over.
		argv = twin.Argv()
		vm.TwinVNC = &addr
	}
	var q *newQEMU
	if vm.Transfer != nil {
		q, err = r.startTransfer(ctx, vm, t.files, argv)
	} else if q, err = r.startQEMU(ctx, vm, t.files, argv); err == nil {
		if err = migrateSetup(ctx, q.c, vm); err != nil {
			q.stop()
		}
	}
	if err != nil {
		r.dropTransferSockets(vm)
		vm.NewPID, vm.TwinVNC, vm.Transfer = 0, nil, nil
		putBack(aside)
		return err
	}
	q.setUp, q.aside = true, aside
	r.mu.Lock()
	r.early[vm.Name] = q
	r.mu.Unlock()
	t.early = true
	return nil
}

// dropEarly is startEarly's inverse for one VM, for a rollback to its old
// QEMU: the new QEMU is stopped and the old one's sockets are put back.
func (r *run) dropEarly(vm *manifest.VM) {
	q := r.takeEarly(vm.Name)
	if q == nil {
		return
	}
	q.stop()
	r.dropTransferSockets(vm)
	vm.NewPID, vm.TwinVNC = 0, nil
	putBack(q.aside)
	r.Log.Info("stopped the new QEMU started early; the old one keeps its sockets", "vm", vm.Name)
}

// takeEarly returns (and forgets) the VM's early-started QEMU, if any.
func (r *run) takeEarly(name string) *newQEMU {
	r.mu.Lock()
	defer r.mu.Unlock()
	q := r.early[name]
	delete(r.early, name)
	return q
}

// retireOld runs after the restore of early-started VMs. An old QEMU whose
// guest now runs on its new QEMU is killed — SIGKILL, because quit would
// unlink the sockets and pidfile the new one made; stopped and saved, it
// has not touched the guest since its STOP, and killing it only now keeps
// its teardown (unmapping gigabytes) out of every guest's blackout. A
// guest whose new QEMU failed before running it continues on its old
// QEMU, paused there since the save, with its files put back.
func (r *run) retireOld(ctx context.Context, ts []*Target) error {
	var back []*Target
	var errs []error
	for _, t := range ts {
		if !t.early || t.rec == nil || t.forward { // rolled forward: retired then
			continue
		}
		switch t.rec.Status {
		case manifest.StatusRunning, manifest.StatusRestored:
			if err := r.timed("kill-old", t.Name(), func() error { return r.killOld(t) }); err != nil {
				errs = append(errs, err)
			}
		case manifest.StatusFailed:
			if r.consumed(t.rec) { // the new QEMU holds the guest: never back
				if err := r.timed("kill-old", t.Name(), func() error { return r.killOld(t) }); err != nil {
					errs = append(errs, err)
				}
				continue
			}
			putBack(r.ownPaths(t.rec))
			back = append(back, t)
		case manifest.StatusSaved:
			putBack(r.ownPaths(t.rec))
			back = append(back, t)
		}
	}
	if len(back) > 0 {
		for _, t := range back {
			r.Log.Warn("the new QEMU did not take the guest; continuing it on its old QEMU", "vm", t.Name(), "why", t.rec.Error)
		}
		if err := r.resume(ctx, back); err != nil {
			errs = append(errs, err)
		}
	}
	if err := r.reapOld(ts); err != nil {
		errs = append(errs, err)
	}
	if err := r.handVNC(ctx, ts); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// handVNC gives each twin started -vnc none that now runs its guest the
// VNC port of its old QEMU, gone (reapOld).
func (r *run) handVNC(ctx context.Context, ts []*Target) error {
	var errs []error
	for _, t := range ts {
		if t.early && t.rec != nil && t.rec.TwinVNC != nil && t.dying == nil && t.rec.NewPID > 0 && r.runsOnNew(t.rec) {
			if err := r.timed("vnc-takeover", t.Name(), func() error { return r.takeVNC(ctx, t.rec, nil) }); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// runsOnNew: the guest is on its new QEMU (restored, or consumed by it).
func (r *run) runsOnNew(vm *manifest.VM) bool {
	return vm.Status == manifest.StatusRunning || vm.Status == manifest.StatusRestored || r.consumed(vm)
}

// takeVNC gives a twin started with -vnc none (qemuargv.TwinVNC) the VNC
// port its old QEMU listened on, now that the old one is gone: the guest's
// VNC clients reconnect to the same address. c is a connection to the new
// QEMU's monitor, or nil to dial one.
func (r *run) takeVNC(ctx context.Context, vm *manifest.VM, c *qmp.Client) error {
	ctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	defer cancel()
	if c == nil {
		var err error
		if c, err = qmp.DialPeerCheck(ctx, r.local(vm.QMP), vm.NewPID, nil); err != nil {
			return fmt.Errorf("%s: the new QEMU's monitor, to give it the VNC port %s: %w", vm.Name, vm.TwinVNC, err)
		}
		defer c.Close()
	}
	var st struct{ Enabled bool }
	if err := c.Execute(ctx, "query-vnc", nil, &st); err == nil && st.Enabled {
		return nil // already has it (a repeated recover)
	}
	addr := map[string]any{"type": "inet", "host": vm.TwinVNC.Host, "port": strconv.Itoa(vm.TwinVNC.Port)}
	if err := c.Execute(ctx, "display-update", map[string]any{"type": "vnc", "addresses": []any{addr}}, nil); err != nil {
		return fmt.Errorf("%s: the new QEMU cannot take the VNC port %s (display-update): %w", vm.Name, vm.TwinVNC, err)
	}
	r.Log.Info("the new QEMU listens on the old one's VNC port", "vm", vm.Name, "vnc", vm.TwinVNC.String())
	return nil
}

// killOld SIGKILLs an old QEMU whose guest runs on its new QEMU, without
// waiting (reapOld does), and removes its files moved aside.
func (r *run) killOld(t *Target) error {
	h, err := qemuproc.Open(t.Proc.PID)
	switch {
	case err == nil:
		if err := h.Kill(); err != nil {
			h.Close()
			return fmt.Errorf("%s: killing old QEMU pid %d: %w", t.Name(), t.Proc.PID, err)
		}
		t.dying = h
	case !errors.Is(err, qemuproc.ErrGone):
		return fmt.Errorf("%s: %w", t.Name(), err)
	}
	t.QMP.Close()
	r.dropAside(t.rec) // a killed QEMU unlinks nothing
	return nil
}

// reapOld waits until the old QEMUs killOld killed are gone.
func (r *run) reapOld(ts []*Target) error {
	var errs []error
	for _, t := range ts {
		if t.dying == nil {
			continue
		}
		if !t.dying.WaitExit(r.QuitTimeout) {
			errs = append(errs, fmt.Errorf("%s: old QEMU pid %d, killed, does not exit (stuck in the kernel?)", t.Name(), t.Proc.PID))
		}
		t.dying.Close()
		t.dying = nil
	}
	return errors.Join(errs...)
}

// ownPaths are the host paths of what the VM's QEMU makes its own and a
// second QEMU would take from it: the unix sockets it binds, its pidfile.
func (r *run) ownPaths(vm *manifest.VM) []string {
	c, err := qemuargv.Parse(vm.Argv)
	if err != nil {
		return nil
	}
	var out []string
	for _, p := range c.ListenPaths() {
		out = append(out, r.localIn(vm, p))
	}
	if p := c.Pidfile(); p != "" {
		out = append(out, r.localIn(vm, p))
	}
	return out
}

// putBack moves an old QEMU's sockets and pidfile back from aside, over
// whatever a new QEMU left at their paths, and tells whether there were any.
func putBack(paths []string) (any bool) {
	for _, p := range paths {
		if _, err := os.Lstat(p + asideSuffix); err == nil {
			any = os.Rename(p+asideSuffix, p) == nil || any
		}
	}
	return any
}

// dropAside removes the files an old QEMU that is gone left moved aside.
func (r *run) dropAside(vm *manifest.VM) {
	for _, p := range r.ownPaths(vm) {
		os.Remove(p + asideSuffix)
	}
}

// hasAside tells whether some of the old QEMU's files are moved aside.
func (r *run) hasAside(vm *manifest.VM) bool {
	for _, p := range r.ownPaths(vm) {
		if _, err := os.Lstat(p + asideSuffix); err == nil {
			return true
		}
	}
	return false
}

// monitorAside tells whether the old QEMU's monitor socket is moved aside:
// while it is, the monitor path is the new twin's. A monitor passed by fd
// (libvirt's way) is never moved: both QEMUs listen on that one socket and
// either may answer.
func (r *run) monitorAside(vm *manifest.VM) bool {
	if vm.QMP == "" {
		return false
	}
	_, err := os.Lstat(r.local(vm.QMP) + asideSuffix)
	return err == nil
}

// settleTwins finishes an early start interrupted before the old QEMU was
// retired. While the old QEMU's monitor socket is moved aside the monitor
// path is its new twin's, so what QEMU answered there (whichever of the
// two targets got through: a monitor serves one client at a time) is the
// twin's state: a twin that never got its state is stopped and the old
// files put back; an old QEMU whose twin has loaded the guest is killed.
// Files moved aside with no twin (we died before it started) are put back.
// A twin whose monitor does not answer is left alone (recover reports it).
// A cpr-transfer twin still loading a guest its old QEMU has handed over
// runs the guest the moment its load ends: while patient it is left alone
// (liveQEMUs waits for it), then stopped — its run trace says afterwards
// whether it had run the guest (consumed).
// It tells whether it changed anything: the caller then looks anew.
func (r *run) settleTwins(ts []*Target, m *manifest.Manifest, patient bool) bool {
	if m.Host.BootID != currentBootID() {
		return false // PIDs of another boot mean nothing
	}
	alive := map[int]bool{}
	for _, t := range ts {
		alive[t.Proc.PID] = true
	}
	changed := false
	for i := range m.VMs {
		vm := &m.VMs[i]
		if !alive[vm.PID] {
			continue
		}
		var twin, old *Target
		for _, t := range ts {
			if t.Name() == vm.Name && t.Proc.PID != vm.PID {
				twin = t
			} else if t.Name() == vm.Name {
				old = t
			}
		}
		// A monitor passed by fd (libvirt's) is one listening socket both
		// QEMUs accept on: nothing was moved aside, but each target's
		// connection is known to be its own QEMU's when the QEMU that
		// answered (its vCPU threads) is that target's (plan swaps them).
		identified := twin != nil && old != nil && twin.Facts.AnsweredBy == twin.Proc.PID && old.Facts.AnsweredBy == old.Proc.PID
		if !r.hasAside(vm) && !identified {
			continue
		}
		status := "" // the twin's, when what answered is known to be the twin
		if trust := r.monitorAside(vm); trust {
			for _, t := range ts {
				if t.Name() == vm.Name && t.Facts.QMPErr == nil {
					status = t.Facts.Status
				}
			}
		} else if identified && twin.Facts.QMPErr == nil {
			status = twin.Facts.Status
		}
		switch {
		case twin == nil:
			putBack(r.ownPaths(vm))
			r.Log.Info("put the old QEMU's sockets back from aside", "vm", vm.Name)
			changed = true
		case status == "inmigrate" && vm.Transfer != nil && patient && !r.guestStillOnOld(vm):
			// Left alone: liveQEMUs looks again while a transfer's new
			// QEMU is still loading, until its patience ends.
			r.Log.Debug("waiting for a new QEMU loading the guest its old QEMU handed over (cpr-transfer)", "vm", vm.Name, "pid", twin.Proc.PID)
		case status == "inmigrate":
			r.Log.Warn("stopping a new QEMU started early; its old QEMU still runs the guest", "vm", vm.Name, "pid", twin.Proc.PID)
			r.killAndWait(twin.Proc.PID)
			putBack(r.ownPaths(vm))
			changed = true
		case status == "" && vm.Transfer != nil && twin.Facts.QMPErr != nil && r.guestStillOnOld(vm):
			// A cpr-transfer twin makes its monitor only once the cpr
			// state came: silent, with the guest still on its old QEMU,
			// it holds nothing (stopped, an old QEMU handing over
			// fails and runs on).
			r.Log.Warn("stopping a new QEMU waiting for its cpr-transfer; its old QEMU still runs the guest", "vm", vm.Name, "pid", twin.Proc.PID)
			r.killAndWait(twin.Proc.PID)
			putBack(r.ownPaths(vm))
			changed = true
		case status == "running" || status == "paused":
			// The new QEMU loaded the guest: the old one, saved, is
			// superseded (we died before retireOld).
			r.Log.Warn("stopping an old QEMU whose guest its new QEMU has taken over", "vm", vm.Name, "pid", vm.PID)
			r.killAndWait(vm.PID)
			r.dropAside(vm)
			changed = true
		}
	}
	return changed
}
