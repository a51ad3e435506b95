package cpr

import (
	"context"
	"errors"
	"fmt"
	"github.com/liveupdate/liveupdate/pkg/fault"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/guestagent"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/rtboost"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Restore starts every VM of m that is not running yet, in parallel, and
// loads its saved state. held are fds the caller still holds for a VM (from
// the old QEMU, in restart-qemu), by VM name and new fd number; fds not held
// are re-created. A VM that fails keeps its RAM and state files and is
// marked failed in the manifest, so Restore can be run again.
func (e *Engine) Restore(ctx context.Context, m *manifest.Manifest, held map[string]map[int]*os.File) error {
	return e.runOn(m).restore(ctx, held, nil)
}

// restore restores the VMs of m that need it — only those in only, when
// only is not nil.
func (r *run) restore(ctx context.Context, held map[string]map[int]*os.File, only map[string]bool) error {
	m := r.man
	var wg sync.WaitGroup
	errs := make([]error, len(m.VMs))
	mapped := sync.OnceValue(r.mappedRAM) // RAM files living QEMUs map, looked up once
	for i := range m.VMs {
		vm := &m.VMs[i]
		if only != nil && !only[vm.Name] {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = r.restoreVM(ctx, vm, held[vm.Name], mapped)
		}()
	}
	wg.Wait()
	if err := r.write(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// restoreVM restores one VM if it needs it, and records the outcome in its
// manifest entry (not written): a VM that fails keeps its RAM and state
// files and is marked failed. mapped gives the RAM files living QEMUs map.
func (r *run) restoreVM(ctx context.Context, vm *manifest.VM, held map[int]*os.File, mapped func() map[string]int) error {
	switch vm.Status {
	case manifest.StatusRunning, manifest.StatusResumed:
		return nil // nothing to do: idempotent
	case manifest.StatusPlanned:
		return fmt.Errorf("%s: was never saved (its old QEMU should still run): not restoring", vm.Name)
	}
	early := r.hasEarly(vm.Name)
	if !early && !r.sawExit(vm.Name) {
		if err := ramInUse(r, vm, mapped()); err != nil {
			vm.Status, vm.Error = manifest.StatusFailed, err.Error()
			return fmt.Errorf("%s: %w", vm.Name, err)
		}
	}
	attempt := func() error {
		return r.timed("restore", vm.Name, func() (err error) {
			// A bug here must not take the caller (PID 1) down.
			defer func() {
				if p := recover(); p != nil {
					err = fmt.Errorf("internal error: %v", p)
				}
			}()
			return r.restoreOne(ctx, vm, held)
		})
	}
	err := attempt()
	if r.startAnother(vm, early, err) {
		r.Log.Warn("the new QEMU was killed before it ran the guest; starting another on the same state and RAM", "vm", vm.Name, "why", err)
		if err = attempt(); err != nil {
			err = fmt.Errorf("a second new QEMU failed too: %w", err)
		}
	}
	if err != nil {
		err = r.holdLibvirtAutostart(vm, err)
		vm.Status = manifest.StatusFailed
		vm.Error = err.Error()
		r.Log.Error("restore failed; RAM and state files kept", "vm", vm.Name, "err", err)
		return fmt.Errorf("%s: %w", vm.Name, err)
	}
	return nil
}

// startAnother tells whether a restore that failed with err is tried once
// more with a new QEMU of its own: when the new QEMU was killed (by a
// signal: an operator, the OOM killer, a crash) before it ran the guest, so
// the guest's state file and RAM are as the save left them, and the guest
// has no old QEMU to go on on (early: a new QEMU started beside a living old
// one, which retireOld continues instead). A QEMU that exited by itself has
// said why in its log (a state it refuses) and would only say it again.
func (r *run) startAnother(vm *manifest.VM, early bool, err error) bool {
	var died *diedError
	return err != nil && !early && errors.As(err, &died) && died.killed() &&
		!r.consumed(vm) && fileExists(r.local(vm.StateFile))
}

// diedError is a restore that failed because its new QEMU ended before it
// ran the guest — killed, crashed: QEMU says nothing over QMP then, and how
// it ended is the reason.
type diedError struct {
	pid  int
	exit error // how it ended (qemuproc.ExitError)
	err  error // what the restore saw
}

func (e *diedError) Error() string {
	if ee := new(qemuproc.ExitError); errors.As(e.err, &ee) { // it says how already (qemuproc.DialQMP)
		return fmt.Sprintf("the new QEMU pid %d ended before it ran the guest: %v", e.pid, e.err)
	}
	return fmt.Sprintf("the new QEMU pid %d ended (%v) before it ran the guest: %v", e.pid, e.exit, e.err)
}

func (e *diedError) Unwrap() error { return e.err }

// killed tells whether the QEMU was ended by a signal.
func (e *diedError) killed() bool {
	var ee *qemuproc.ExitError
	return errors.As(e.exit, &ee) && ee.Status.Signaled()
}

// diedFirst is err, or — when the new QEMU had ended by itself — a
// *diedError saying how. A QEMU that closed its monitor under us is on its
// way out: it is given a moment to end.
func (q *newQEMU) diedFirst(err error) error {
	died := func() error { return &diedError{pid: q.p.Pid, exit: q.p.ExitErr(), err: err} }
	select {
	case <-q.p.Exited():
		return died()
	default:
	}
	if !errors.Is(err, qmp.ErrDisconnected) && !errors.Is(err, qmp.ErrNotDelivered) {
		return err
	}
	select {
	case <-q.p.Exited():
		return died()
	case <-time.After(2 * time.Second):
		return err
	}
}

// restoreOne starts one VM's new QEMU and loads its state.
func (r *run) restoreOne(ctx context.Context, vm *manifest.VM, held map[int]*os.File) error {
	ctx, cancel := context.WithTimeout(ctx, r.RestoreTimeout)
	defer cancel()
	q := r.takeEarly(vm.Name) // started before the save, if it was
	if err := r.checkGuestFiles(vm); err != nil {
		if q != nil {
			q.stop()
		}
		return err
	}
	if q == nil {
		var err error
		if q, err = r.startQEMU(ctx, vm, held, vm.RestartArgv); err != nil {
			return err
		}
	}
	// Its threads but the vCPUs (the load, cont) at real-time priority
	// until the guest runs. (A cpr-transfer twin's vCPU threads are not
	// known before its load: it is not raised; it needs no cont either.)
	raised := r.raiseQEMU(vm.Name, q.p.Pid, q.vcpus, false)
	defer r.lower(vm.Name, raised)
	if vm.Transfer == nil {
		q.vcpusRaised = r.raiseStoppedVCPUs(vm.Name, q.p.Pid, q.vcpus)
		defer r.lower(vm.Name, q.vcpusRaised) // on a failure before the cont
	}
	c, err := q.monitor(ctx) // cpr-transfer: reached while the old QEMU handed over
	if c != nil {
		defer c.Close()
	}
	if vm.Transfer != nil {
		if err := r.takeTransferred(ctx, vm, q, c, err); err != nil {
			return err
		}
	} else if err := r.loadAndCont(ctx, vm, q, c, err); err != nil {
		return err
	}
	r.lower(vm.Name, raised)

	// Outside the blackout: the consumed mark made durable, and the new
	// QEMU gets the VM's own migration set-up.
	r.settleConsumed(vm)
	r.giveBackMigration(ctx, c, vm, true)
	r.dropTransferSockets(vm)

	// Confirmed: the state file is done with; keep it for inspection.
	vm.Status = manifest.StatusRunning
	vm.Error = ""
	r.markDone(vm)
	if err := r.handBackToLibvirt(ctx, c, vm, vm.NewPID); err != nil {
		r.Log.Error("libvirt's record not rewritten", "vm", vm.Name, "err", err)
		vm.Error = err.Error()
	}
	// Through a copy of the new QEMU's own fd: ours were closed once it
	// started, and a single-queue tap cannot be opened twice.
	for _, fd := range vm.Fds {
		if fd.Kind == qemuargv.FdTap && !fd.TapPersist {
			f, err := tapdev.DupFromProcess(vm.NewPID, fd.Num)
			if err == nil {
				err = tapdev.SetPersist(f, false)
				f.Close()
			}
			if err != nil {
				r.Log.Warn("restoring tap persistence", "vm", vm.Name, "tap", fd.TapName, "err", err)
			}
		}
	}
	r.Log.Info("restored", "vm", vm.Name, "pid", vm.NewPID, "blackout", vm.Blackout())
	if r.clockLater {
		r.mu.Lock()
		r.clockDue = append(r.clockDue, vm)
		r.mu.Unlock()
	} else if r.ClockAsync {
		r.clockFixes.Add(1)
		go func() {
			defer r.clockFixes.Done()
			r.fixClock(context.WithoutCancel(ctx), vm)
			if err := r.write(); err != nil {
				r.Log.Warn("recording the clock fix", "vm", vm.Name, "err", err)
			}
		}()
	} else {
		r.fixClock(ctx, vm)
	}
	return nil
}

// loadAndCont is the cpr-reboot way's restore on the new QEMU, started
// -S: its state loaded from the state file, the state marked consumed,
// then cont. c and err are the new QEMU's monitor and the error of
// reaching it.
func (r *run) loadAndCont(ctx context.Context, vm *manifest.VM, q *newQEMU, c *qmp.Client, err error) error {
	// Until the state is consumed, a failure stops the new QEMU and the
	// guest can be restored (or continued on its old QEMU) again.
	fail := func(err error) error {
		err = q.diedFirst(err)
		q.stop()
		vm.NewPID = 0
		return r.withQEMUsWords(vm, err)
	}
	if err != nil {
		return fail(err)
	}
	err = r.timedPoint("load", vm.Name, func() error {
		if !q.setUp {
			if err := migrateSetup(ctx, c, vm); err != nil {
				return err
			}
		}
		if err := c.Execute(ctx, "migrate-incoming", map[string]any{"uri": "file:" + string(vm.StateFile)}, nil); err != nil {
			return err
		}
		return waitMigration(ctx, c, "loading "+vm.Name)
	})
	if err != nil {
		return fail(err)
	}
	// From cont on, the new QEMU runs the guest: its saved state must never
	// be loaded again nor its old QEMU continued. The state file is marked
	// consumed before cont (durably just after); after that a failure never stops the
	// new QEMU (it holds the guest) — recover continues it.
	if err := r.consume(vm); err != nil {
		return fail(fmt.Errorf("marking the state file consumed before cont: %w", err))
	}
	vm.Status = manifest.StatusRestored
	// The vCPUs back to their own scheduling before the guest runs.
	r.lower(vm.Name, q.vcpusRaised)
	if vm.WasRunning {
		// Straight to cont, no query-status first: the new QEMU runs with
		// -S, so it is paused, and a round trip here is in the blackout.
		// (cont on a running guest does no harm.)
		err := r.timedPoint("cont", vm.Name, func() error { return c.Execute(ctx, "cont", nil, nil) })
		if errors.Is(err, qmp.ErrNotDelivered) {
			// The cont never reached the new QEMU: it was gone (killed,
			// crashed between its load and now) before the cont was
			// written, or died with it unread. So it never ran the guest.
			// It is stopped and the consumed mark taken back: the guest
			// goes on as after a failed load, on its old QEMU or from its
			// state file. (A cont QEMU read and did not answer may have run
			// the guest: that is the case below, which keeps the mark.)
			err = fail(err)
			if uerr := r.unconsume(vm); uerr != nil {
				return fmt.Errorf("%w; %v: its old QEMU is not continued, nor its state loaded again", err, uerr)
			}
			return err
		}
		if err != nil {
			r.Log.Warn("cont: no answer to trust; asking the new QEMU whether the guest runs", "vm", vm.Name, "err", err)
		}
		if err := r.confirmRunning(ctx, c, vm); err != nil {
			return r.loadedNotRunning(vm, err)
		}
	}
	return nil
}

// mappedRAM is, for every QEMU that runs now, the RAM files of its command
// line as we see them, with its pid.
func (r *run) mappedRAM() map[string]int {
	out := map[string]int{}
	procs, err := discover.All(r.ProcRoot)
	if err != nil {
		r.Log.Warn("listing the running QEMUs before the restore", "err", err)
		return out
	}
	for _, p := range procs {
		ram, err := p.Cmdline.RAM()
		if err != nil {
			continue
		}
		for _, b := range ram.Backends {
			if b.File() != "" {
				cwd := r.Root.QEMU(hostpath.Local(p.Cwd))
				out[filepath.Clean(r.local(hostpath.Arg(cwd, b.File())))] = p.PID
			}
		}
	}
	return out
}

// ramInUse refuses to start a second QEMU on RAM that a living QEMU maps:
// both would run the guest.
func ramInUse(r *run, vm *manifest.VM, mapped map[string]int) error {
	for _, b := range vm.RAM {
		if b.File() == "" {
			continue // a memfd: one fd of it goes to one QEMU
		}
		if pid, ok := mapped[filepath.Clean(r.localIn(vm, b.MemPath))]; ok {
			return fmt.Errorf("QEMU pid %d still runs on its RAM file %s: a second QEMU on it would run the guest twice. Not restored; if pid %d is the guest's old QEMU, 'liveupdate recover' continues it there, else stop it first", pid, b.MemPath, pid)
		}
	}
	return nil
}

// confirmRunning waits for the new QEMU's RESUME event and checks the
// guest runs; a cont whose reply was lost is sent again once.
func (r *run) confirmRunning(ctx context.Context, c *qmp.Client, vm *manifest.VM) error {
	var st struct {
		Running bool
		Status  string
	}
	wctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	ev, _, err := c.WaitEvent(wctx, "RESUME", 0, nil)
	cancel()
	if err == nil {
		vm.Resumed = ev.Time
	}
	if qerr := c.Execute(ctx, "query-status", nil, &st); qerr != nil {
		return fmt.Errorf("query-status after cont: %w", qerr)
	}
	if !st.Running && st.Status == "paused" {
		if err := c.Execute(ctx, "cont", nil, nil); err != nil {
			return fmt.Errorf("cont again: %w", err)
		}
		if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
			return fmt.Errorf("query-status after the second cont: %w", err)
		}
	}
	if !st.Running {
		return fmt.Errorf("guest is %q after restore, not running", st.Status)
	}
	return nil
}

// loadedNotRunning is a failure after the state was consumed: the new QEMU
// keeps the guest, paused or in an unknown state, for recover.
func (r *run) loadedNotRunning(vm *manifest.VM, err error) error {
	return r.withQEMUsWords(vm, fmt.Errorf("the new QEMU pid %d has loaded the guest but it is not confirmed running: %w; it keeps the guest (its old QEMU and state file are not used again): run 'liveupdate recover' to continue it", vm.NewPID, err))
}

// withQEMUsWords adds what the VM's QEMU said in its log since it was
// started to err: its reasons are there, not over QMP.
func (r *run) withQEMUsWords(vm *manifest.VM, err error) error {
	if said := qemuSaid(r.logPath(vm)); said != "" {
		return fmt.Errorf("%w; QEMU said: %s (log: %s)", err, said, r.logPath(vm))
	}
	return fmt.Errorf("%w (QEMU log: %s)", err, r.logPath(vm))
}

// qemuSaid is the last lines QEMU wrote to its log after our last start
// marker, joined.
func qemuSaid(log string) string {
	b, err := os.ReadFile(log)
	if err != nil {
		return ""
	}
	s := string(b)
	if i := strings.LastIndex(s, startMarker); i >= 0 {
		s = s[i:]
		if nl := strings.IndexByte(s, '\n'); nl >= 0 {
			s = s[nl+1:]
		} else {
			s = ""
		}
	}
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > 3 {
		lines = lines[len(lines)-3:]
	}
	return strings.Join(lines, " / ")
}

// checkGuestFiles checks that a VM's state file is there and its RAM
// files are whole before a QEMU is started on them.
func (r *run) checkGuestFiles(vm *manifest.VM) error {
	if _, err := os.Stat(r.local(vm.StateFile)); err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	for _, b := range vm.RAM {
		if b.File() == "" {
			continue // a memfd: openFds checks it
		}
		st, err := os.Stat(r.localIn(vm, b.MemPath))
		if err != nil {
			return fmt.Errorf("RAM of backend %s: %w", b.ID, err)
		}
		if st.Mode().IsRegular() && b.Size > 0 && uint64(st.Size()) < b.Size {
			return fmt.Errorf("RAM file %s of backend %s is %d bytes, smaller than the guest's %d: refusing to start on it", b.MemPath, b.ID, st.Size(), b.Size)
		}
	}
	return nil
}

// newQEMU is a QEMU started for a VM, waiting for its state.
type newQEMU struct {
	p     *qemuproc.Process
	c     *qmp.Client
	files []*os.File // its inherited fds 3, 4, …
	setUp bool       // migration capabilities already set
	// dialing brings its monitor, reached in the background (cpr-transfer:
	// dialTransfer); nil when c is set or is to be dialled.
	dialing chan dialed
	aside   []string    // started early: the old QEMU's sockets, moved aside (early.go)
	vcpus   map[int]int // its vCPU threads by index (nil: not known)
	// vcpusRaised are its vCPU threads at real-time priority from its load
	// to just before its cont (raiseStoppedVCPUs; nil: not raised).
	vcpusRaised *rtboost.Raised
}

// startQEMU starts a VM's new QEMU on argv (in its network namespace,
// cgroup and credentials) and connects to its monitor. Its inverse is stop.
func (r *run) startQEMU(ctx context.Context, vm *manifest.VM, held map[int]*os.File, argv []string) (*newQEMU, error) {
	q, err := r.spawnQEMU(vm, held, argv)
	if err != nil {
		return nil, err
	}
	// QEMU's own start-up: until its QMP socket answers.
	err = r.timed("qemu-init", vm.Name, func() (err error) {
		q.c, err = qemuproc.DialQMP(ctx, r.local(vm.QMP), q.p)
		return err
	})
	if err != nil {
		err = q.diedFirst(err)
		q.stop()
		vm.NewPID = 0
		return nil, r.withQEMUsWords(vm, err)
	}
	// Its vCPU threads, for a restart-qemu: which threads are not raised
	// for the load (realtime.go), and where to place them. (Otherwise
	// place asks, if it needs them: one round trip less in PID 1.)
	if r.realtime && !r.NoRealtime {
		if q.vcpus, err = vcpuThreads(ctx, q.c); err != nil {
			r.Log.Warn("new QEMU's vCPU threads not known: not raised for its load", "vm", vm.Name, "err", err)
		}
	}
	r.place(ctx, q.c, vm, q.p.Pid, r.man.Host.BootID == currentBootID(), q.vcpus)
	return q, nil
}

// spawnQEMU is startQEMU up to the process: started, not yet talked to.
func (r *run) spawnQEMU(vm *manifest.VM, held map[int]*os.File, argv []string) (*newQEMU, error) {
	q := &newQEMU{}
	var opened []*os.File
	defer func() {
		for _, f := range opened {
			f.Close() // QEMU has its copies
		}
	}()
	r.makeSocketDirs(vm, argv)
	err := tapdev.InNetNS(vm.NetNS, func() error {
		var err error
		q.files, opened, err = r.openFds(vm, held)
		if err != nil {
			return err
		}
		log, err := r.openLog(vm, argv)
		if err != nil {
			return err
		}
		defer log.Close() // QEMU has its copy
		spec := qemuproc.Spec{Binary: string(vm.Binary), Argv: argv, Dir: string(vm.Cwd), Env: vm.Env, Root: string(r.Root),
			UID: vm.UID, GID: vm.GID, Groups: vm.Groups, Cgroup: vm.Cgroup, CgroupRoot: hoststate.CgroupRoot,
			ExtraFiles: q.files, Log: log}
		err = r.timed("qemu-start", vm.Name, func() (err error) {
			q.p, err = qemuproc.Start(spec, r.Reaper)
			return err
		})
		if err != nil {
			return err
		}
		vm.NewPID = q.p.Pid
		if q.p.CgroupErr != nil {
			r.Log.Warn("started QEMU outside its cgroup", "vm", vm.Name, "err", q.p.CgroupErr)
		}
		if len(vm.Hierarchies) > 0 && r.man.Host.BootID == currentBootID() {
			// cgroup v1 (hybrid hosts): every hierarchy the old QEMU was
			// in, before the new one runs the guest.
			mi, err := os.ReadFile(filepath.Join(r.ProcRoot, "self/mountinfo"))
			if err == nil {
				err = qemuproc.JoinHierarchies(q.p.Pid, vm.Hierarchies, string(mi), "")
			}
			if err != nil {
				r.Log.Warn("started QEMU outside some of its old QEMU's cgroups", "vm", vm.Name, "err", err)
			}
		}
		if ferr := fault.AtFor("qemu-start", vm.Name); ferr != nil {
			q.p.Kill()
			<-q.p.Exited()
			return ferr
		}
		return nil
	})
	if err != nil {
		vm.NewPID = 0
		return nil, fmt.Errorf("starting QEMU: %w", err)
	}
	return q, nil
}

// stop kills a new QEMU and waits until it is gone. Never SIGTERM or quit:
// a QEMU that quits with discard-data=on punches its RAM file out, and its
// RAM is the guest's; a new QEMU that has not run the guest holds nothing
// else worth a clean exit (its disks are opened inactive).
func (q *newQEMU) stop() {
	q.p.Kill()
	<-q.p.Exited()
	if q.dialing != nil { // the dial ends with the process
		d := <-q.dialing
		q.dialing, q.c = nil, d.c
	}
	if q.c != nil {
		q.c.Close()
	}
}

// fixClocks puts right the clocks restoreOne left for later, all at once.
func (r *run) fixClocks(ctx context.Context) {
	var wg sync.WaitGroup
	for _, vm := range r.clockDue {
		wg.Add(1)
		go func() { defer wg.Done(); r.fixClock(ctx, vm) }()
	}
	wg.Wait()
	r.clockDue = nil
	if err := r.write(); err != nil {
		r.Log.Warn("recording the clock fixes", "err", err)
	}
}

// fixClock puts the guest's clock right through its guest agent: it stood
// still while the guest was stopped. A guest without an agent is reported.
func (r *run) fixClock(ctx context.Context, vm *manifest.VM) {
	if !vm.WasRunning {
		return
	}
	setClock := func(s string) { // the manifest may be being written meanwhile
		r.mu.Lock()
		vm.Clock = s
		r.mu.Unlock()
	}
	if vm.Agent == "" {
		setClock("no guest agent")
		r.Log.Warn("guest has no agent channel: its clock is behind by the blackout", "vm", vm.Name)
		return
	}
	var offset time.Duration
	err := r.timed("clock-fix", vm.Name, func() error {
		// The agent may still be waking up in the guest, and it answers
		// only after hwclock -w: both slow under emulation.
		actx, cancel := context.WithTimeout(ctx, r.ClockTimeout)
		defer cancel()
		var err error
		offset, err = guestagent.SyncClock(actx, r.local(vm.Agent), 20*time.Second)
		return err
	})
	if err != nil {
		setClock("not corrected: " + err.Error())
		r.Log.Warn("guest clock not corrected", "vm", vm.Name, "err", err)
		return
	}
	r.mu.Lock()
	vm.ClockOffset = offset
	r.mu.Unlock()
	setClock("corrected")
	r.Log.Info("guest clock corrected", "vm", vm.Name, "offset", offset.Round(time.Microsecond))
}

// openFds returns the files to pass as fds 3, 4, … and those of them this
// function opened (the caller closes them once QEMU has its copies).
func (r *run) openFds(vm *manifest.VM, held map[int]*os.File) (files, opened []*os.File, err error) {
	for i, fd := range vm.Fds {
		if fd.Num != firstFd+i {
			return nil, opened, fmt.Errorf("manifest fds are not numbered from %d in order (%d at %d)", firstFd, fd.Num, i)
		}
		f := held[fd.Num]
		if f == nil {
			switch fd.Kind {
			case qemuargv.FdTap:
				f, err = tapdev.Open(fd.TapName, fd.TapFlags)
			case qemuargv.FdVhost:
				f, err = os.OpenFile("/dev/vhost-net", os.O_RDWR, 0)
			case qemuargv.FdChardev:
				f, err = listenUnix(r.Root, fd.SocketPath)
			case qemuargv.FdMemfd:
				err = fmt.Errorf("fd %d is the guest's RAM (backend %q, a memfd of %d bytes) and nothing handed it to this restore: a memfd has no name to be opened by; after a kexec the update's LUO session keeps it (token %d), retrieved by PID 1 (its log says why not)", fd.Num, fd.Backend, fd.Size, fd.Token)
			case qemuargv.FdFile:
				if fd.Path == "" {
					err = fmt.Errorf("fd %d was a pipe of an -add-fd set (libvirt's virtlogd): only a restart that hands it over keeps it", fd.Num)
					break
				}
				f, err = reopenFile(r.local(fd.Path), fd.Flags)
			default:
				err = fmt.Errorf("fd %d of kind %s cannot be re-created", fd.Num, fd.Kind)
			}
			if err != nil {
				return nil, opened, err
			}
			opened = append(opened, f)
		}
		files = append(files, f)
	}
	return files, opened, nil
}

// makeSocketDirs makes the directories of the unix sockets QEMU binds
// itself (-chardev socket,path=…,server=on, -qmp unix:…): after a kexec
// those under /run (a tmpfs) are gone, and QEMU would refuse to start
// ("Failed to bind socket … No such file or directory"). QEMU's error
// is the report if one cannot be made.
func (r *run) makeSocketDirs(vm *manifest.VM, argv []string) {
	c, err := qemuargv.Parse(argv)
	if err != nil {
		return // startQEMU's QEMU says what is wrong with its argv
	}
	for _, p := range c.ListenPaths() {
		if err := os.MkdirAll(filepath.Dir(r.localIn(vm, p)), 0o750); err != nil {
			r.Log.Warn("making a socket's directory", "vm", vm.Name, "path", p, "err", err)
		}
	}
}

// reopenFile opens a file of an -add-fd set again as its QEMU had it: the
// access mode and the flags that change how it is written; never created
// or truncated (it is the guest's log or disk).
func reopenFile(path string, flags int) (*os.File, error) {
	keep := unix.O_ACCMODE | unix.O_APPEND | unix.O_NONBLOCK | unix.O_DIRECT | unix.O_SYNC | unix.O_DSYNC | unix.O_NOATIME
	f, err := os.OpenFile(path, flags&keep, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s again for its -add-fd set: %w", path, err)
	}
	return f, nil
}

// listenUnix makes the listening unix socket a QEMU gets by fd, at path
// (QEMU's name for it) under root. It is bound from inside root — by a
// thread of ours chrooted there — so that its name, which /proc/net/unix
// and with it every later discovery reads, is QEMU's path and not ours:
// after PID 1 hands over to the host's init no "/newroot/…" path exists
// (the next update's plan failed "dial unix /newroot/var/lib/libvirt/…").
func listenUnix(root hostpath.Root, path hostpath.QEMU) (*os.File, error) {
	local := string(root.Local(path))
	os.Remove(local) // a stale socket from the old QEMU
	// After a kexec /run is empty: libvirt's agent channel is bound in
	// /run/libvirt/qemu/channel/ID-NAME/, which it made at the guest's start.
	if err := os.MkdirAll(filepath.Dir(local), 0o750); err != nil {
		return nil, fmt.Errorf("re-creating the directory of socket %s: %w", local, err)
	}
	top := string(root.Local("/"))
	if top == "/" {
		return bindUnix(local)
	}
	type bound struct {
		f   *os.File
		err error
	}
	ch := make(chan bound, 1)
	go func() {
		// Never unlocked: the thread, chrooted, ends with this goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			ch <- bound{nil, fmt.Errorf("binding socket %s inside %s: unshare: %w", path, top, err)}
			return
		}
		if err := unix.Chroot(top); err != nil {
			ch <- bound{nil, fmt.Errorf("binding socket %s inside %s: chroot: %w", path, top, err)}
			return
		}
		unix.Chdir("/")
		f, err := bindUnix(string(path))
		ch <- bound{f, err}
	}()
	b := <-ch
	return b.f, b.err
}

func bindUnix(path string) (*os.File, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("re-creating socket %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	return l.File()
}

func (r *run) logPath(vm *manifest.VM) string {
	return r.local(hostpath.Join(r.stateDir, vm.Name+".qemu.log"))
}

// startMarker heads each start of a QEMU in its log.
const startMarker = "--- liveupdate restore"

// openLog opens the VM's QEMU log and marks this start in it.
func (r *run) openLog(vm *manifest.VM, argv []string) (*os.File, error) {
	log, err := os.OpenFile(r.logPath(vm), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "%s %s: %s\n", startMarker, time.Now().Format(time.RFC3339Nano), strings.Join(argv, " "))
	return log, nil
}
