package cpr

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/guestagent"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/phase"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// SaveOptions tune Save.
type SaveOptions struct {
	// QEMUBinary, when set, is the binary the VMs are restarted on.
	QEMUBinary string
	// CopyRAM saves guest RAM into the state file too, as a plain
	// migration does (no x-ignore-shared): the slow way, for comparison.
	CopyRAM bool
	// EarlyStart starts each new QEMU before its old one stops, so that
	// QEMU's start-up is not part of the blackout (restart-qemu; see
	// early.go). An update cannot: its new QEMUs run on the new kernel.
	EarlyStart bool
	// Phases the caller timed before the save (plan, kexec-load): they
	// head the manifest's.
	Phases []manifest.Phase
	// Each, when above 0, makes a restart-qemu take each guest on its own
	// (restart.go's restartEach): saved, loaded and continued as soon as
	// its turn comes, at most Each guests at once, a failure sending back
	// to its old QEMU that guest alone. 0: every guest saves before any
	// loads, and a failed save resumes them all (all or nothing).
	Each int
	// Transfer restarts by QEMU's cpr-transfer each guest that allows it
	// (transfer.go; with EarlyStart, restart-qemu only): no state file,
	// the device state streamed to the new QEMU. The others go the
	// cpr-reboot way.
	Transfer bool
	// KeepRAM, when set, has the kernel keep each guest's RAM memfd across
	// the kexec (the update's LUO session). Guests with such RAM then keep
	// their old QEMU, paused after its save, as the RAM's holder until the
	// kexec (a crash of ours before it leaves their RAM where recover
	// finds it). Nil: a restart, which hands the very memfd to a new QEMU
	// started beside the old one.
	KeepRAM RAMKeeper
}

// RAMKeeper keeps memfds of guest RAM across a kexec: an update's session
// of the kernel's Live Update Orchestrator (package luo).
type RAMKeeper interface {
	// Session is the name the new kernel hands the memfds back under.
	Session() string
	// Keep preserves f, the RAM of a guest's memory backend, and returns
	// the token that retrieves it after the kexec.
	Keep(vm, backend string, f *os.File) (token uint64, err error)
}

// firstFd is where the new QEMU's inherited fds start (after stdio).
const firstFd = 3

// Save saves every target's device state in parallel and, when all saved,
// quits the old QEMUs. On any failure before the quit it undoes every step
// begun — every VM resumes on its old QEMU — and returns an error saying
// what happened to each; nothing is lost. All targets must have an OK
// verdict. Without targets it records a manifest with no VMs (an update of
// a host without guests still tells PID 1 what to rebuild).
func (e *Engine) Save(ctx context.Context, ts []*Target, o SaveOptions) (*manifest.Manifest, error) {
	return e.newRun().save(ctx, ts, o)
}

func (r *run) save(ctx context.Context, ts []*Target, o SaveOptions) (*manifest.Manifest, error) {
	if err := allSafe(ts); err != nil {
		return nil, err
	}
	steps := r.setupSteps(ts, o)
	if r.realtime {
		steps = append(steps, phase.Step{Name: "realtime",
			Do:   func(context.Context) error { r.self = r.raiseSelf(); return nil },
			Undo: func(context.Context) error { r.lower("", r.self); return nil }})
	}
	steps = append(steps,
		// All save in parallel; none quits until all have saved.
		phase.Step{Name: "save",
			Do: func(ctx context.Context) error {
				return r.each("save", ts, func(t *Target) error { return r.saveOne(ctx, t) })
			},
			Undo: func(ctx context.Context) error {
				return errors.Join(r.rollForward(ctx, ts), r.continueOld(ctx, ts))
			}},
		phase.Step{Name: "saved", Do: func(context.Context) error { return r.recordSaved(ts) }},
	)
	if err := phase.Run(ctx, r.recordHost, steps...); err != nil {
		return r.setupFailed(err)
	}
	// Quit: from here on the way back is Restore. An old QEMU with a new
	// one started early waits, paused, until the new one runs its guest
	// (retireOld).
	err := phase.Run(ctx, r.recordHost, phase.Step{Name: "quit", Do: func(ctx context.Context) error { return r.quitAll(ctx, ts) }})
	return r.man, err
}

// allSafe refuses targets whose verdict is not OK.
func allSafe(ts []*Target) error {
	for _, t := range ts {
		if !t.Verdict.OK {
			return fmt.Errorf("VM %s is not safe to save: %s", t.Name(), strings.Join(t.Verdict.Problems, "; "))
		}
	}
	return nil
}

// setupFailed is what a save whose steps failed returns: a failure to
// prepare touched nothing and has no manifest.
func (r *run) setupFailed(err error) (*manifest.Manifest, error) {
	var pe *phase.Error
	if errors.As(err, &pe) && pe.Step == "prepare" {
		return nil, pe.Err
	}
	return r.man, saveFailed(err)
}

// setupSteps are the steps of a save before any guest stops: the VMs
// recorded, the manifest written, the new QEMUs started early (if asked),
// the old ones set up for the migration. Undone, every guest runs on as
// before.
func (r *run) setupSteps(ts []*Target, o SaveOptions) []phase.Step {
	steps := []phase.Step{
		{Name: "prepare", Do: func(context.Context) error { return r.prepareAll(ts, o) },
			Undo: func(context.Context) error { r.releaseTaps(ts); return nil }},
		{Name: "manifest", Do: func(context.Context) error { return r.firstWrite(ts) },
			Undo: func(context.Context) error { return r.rewrite() }}, // records what the undos after it did
	}
	if o.EarlyStart {
		steps = append(steps, phase.Step{Name: "early-start",
			Do:   func(ctx context.Context) error { r.startEarly(ctx, ts); return nil },
			Undo: func(context.Context) error { r.dropAllEarly(ts); return nil }})
	}
	steps = append(steps, phase.Step{Name: "ram-holders", Do: func(context.Context) error { return r.checkRAMHolders(ts) }})
	steps = append(steps,
		// Every old QEMU is set up for the migration before the first one
		// stops: these round trips then weigh on no guest's blackout.
		phase.Step{Name: "migrate-setup",
			Do: func(ctx context.Context) error {
				return r.setupAll(ctx, ts)
			},
			Undo: func(ctx context.Context) error { r.giveBackAll(ctx, ts); return nil }},
	)
	return steps
}

// saveFailed says what a failure of Save before the quit means for the
// guests, by the step that failed.
func saveFailed(err error) error {
	var pe *phase.Error
	if !errors.As(err, &pe) {
		return err
	}
	cause := errors.Join(pe.Err, pe.UndoErr)
	switch pe.Step {
	case "manifest", "early-start":
		return cause
	case "migrate-setup":
		return fmt.Errorf("setting up the migration failed, no VM stopped: %w", cause)
	case "save":
		return fmt.Errorf("save failed, every VM resumed on its old QEMU: %w", cause)
	default:
		return fmt.Errorf("%s failed, every VM resumed on its old QEMU: %w", pe.Step, cause)
	}
}

// recordHost records a step of the whole run (no VM's row).
func (r *run) recordHost(name string, start, end time.Time, err error) {
	r.record(name, "", start, end, err)
}

// prepareAll starts the manifest and records every VM in it, taking over
// the inherited fds that must outlive the old QEMUs, and the host state
// PID 1 rebuilds after a kexec. Its inverse is releaseTaps.
func (r *run) prepareAll(ts []*Target, o SaveOptions) error {
	if err := os.MkdirAll(r.local(r.stateDir), 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	if err := manifest.CheckPrivate(r.local(hostpath.Join(r.stateDir, manifest.FileName))); err != nil {
		return err
	}
	r.makeManifest(o.Phases)
	if o.KeepRAM != nil {
		r.man.LUO = &manifest.LUOSession{Name: o.KeepRAM.Session()}
	}
	for _, t := range ts {
		rec, err := r.prepare(t, o)
		if err != nil {
			return fmt.Errorf("preparing %s: %w", t.Name(), err)
		}
		r.man.VMs = append(r.man.VMs, *rec)
	}
	for i, t := range ts {
		t.rec = &r.man.VMs[i]
	}
	r.man.Cgroups, r.man.Network = hoststate.Capture(hoststate.CgroupRoot, hostGuests(ts), r.Log)
	return nil
}

// firstWrite records the prepared run before any guest is touched, and arms
// the fault actions that need the targets.
func (r *run) firstWrite(ts []*Target) error {
	if err := r.write(); err != nil {
		return err
	}
	r.written = true
	if len(ts) > 0 {
		fault.On("killqemu", func(string, string) { unix.Kill(ts[0].Proc.PID, unix.SIGKILL) })
	}
	// The VM's new QEMU dies where the point is reached for it, and is
	// gone (its monitor closed) before the run goes on.
	fault.On("killnew", func(_, vm string) {
		for i := range r.man.VMs {
			if v := &r.man.VMs[i]; v.Name == vm && v.NewPID > 0 {
				qemuproc.KillAndWait(v.NewPID, 10*time.Second)
			}
		}
	})
	fault.On("fill", func(string, string) { fillDisk(r.local(r.stateDir)) })
	return nil
}

// recordSaved records that every VM saved. When every VM has its new QEMU
// started beside the old one (a restart), the record stays in memory until
// the restore's write: nothing reads it before (recover judges such guests
// by which QEMU runs them), and writing the manifest here sat in every
// guest's blackout — the CPU it takes is the new QEMUs' loading time.
func (r *run) recordSaved(ts []*Target) error {
	allEarly := true
	for _, t := range ts {
		t.rec.Status = manifest.StatusSaved
		allEarly = allEarly && t.early
	}
	if allEarly {
		return nil
	}
	if err := r.writeUnsynced(); err != nil {
		return fmt.Errorf("recording the save: %w", err)
	}
	return nil
}

// checkRAMHolders refuses, before any guest stops, a guest whose RAM is an
// inherited memfd that would have no QEMU holding it between its old QEMU's
// quit and its new one's start: a crash of ours in between would lose it.
// An update keeps such old QEMUs (keepsRAM); a restart needs the new QEMU
// started beside the old one.
func (r *run) checkRAMHolders(ts []*Target) error {
	var errs []error
	for _, t := range ts {
		if t.ramFd && !t.early && !r.keepsRAM() {
			errs = append(errs, fmt.Errorf("%s: its RAM is a memfd its QEMU inherited, which only a QEMU keeps alive, and its new QEMU could not be started beside the old one (logged above; restart-qemu --sequential never does): nothing was stopped. Fix what kept the new QEMU from starting early and run it again", t.Name()))
		}
	}
	return errors.Join(errs...)
}

// quitAll quits the old QEMUs that have no new QEMU started early, and
// keeps, paused, those holding RAM the update preserved (checkRAMHolders).
func (r *run) quitAll(ctx context.Context, ts []*Target) error {
	var quitting []*Target
	for _, t := range ts {
		if !t.early && !(t.ramFd && r.keepsRAM()) {
			quitting = append(quitting, t)
		}
	}
	errs := r.inParallel("quit", quitting, func(t *Target) error { return r.quitOne(ctx, t) })
	if len(quitting) > 0 {
		if err := r.write(); err != nil {
			r.Log.Error("recording quit", "err", err)
		}
	}
	return errors.Join(errs...)
}

// each runs one phase for every target at once (inParallel) and joins
// their errors.
func (r *run) each(name string, ts []*Target, do func(*Target) error) error {
	return errors.Join(r.inParallel(name, ts, do)...)
}

// inParallel runs one phase for every target at once, each timed under
// its VM's row, and returns their errors, index for index.
func (r *run) inParallel(name string, ts []*Target, do func(*Target) error) []error {
	errs := make([]error, len(ts))
	var wg sync.WaitGroup
	for i, t := range ts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = r.timed(name, t.Name(), func() error { return do(t) })
		}()
	}
	wg.Wait()
	return errs
}

// prepare records what a restart needs and takes over the inherited fds
// that must outlive the old QEMU (taps are made persistent).
func (r *run) prepare(t *Target, o SaveOptions) (*manifest.VM, error) {
	p := t.Proc
	// /proc shows the binary and working directory from our root; a QEMU
	// chrooted in r.Root sees them without that prefix.
	cwd := r.Root.QEMU(hostpath.Local(p.Cwd))
	rec := &manifest.VM{
		Name: t.Name(), PID: p.PID, Binary: r.Root.QEMU(hostpath.Local(p.Exe)), Argv: p.Argv, Cwd: cwd, Env: p.Env,
		UID: p.UID, GID: p.GID, Groups: p.Groups, Cgroup: p.Cgroup, NetNS: t.NetNS,
		QMP: hostpath.QEMU(t.Facts.QMPPath), MachineType: strings.TrimSuffix(t.Facts.MachineType, "-machine"),
		QEMUVersion: fmt.Sprintf("%d.%d.%d", t.Facts.Version[0], t.Facts.Version[1], t.Facts.Version[2]),
		StateFile:   hostpath.QEMU(preflight.StateFile(string(r.stateDir), t.Name())),
		WasRunning:  t.Facts.Status == "running",
		Status:      manifest.StatusPlanned,
	}
	if o.QEMUBinary != "" {
		rec.Binary = hostpath.QEMU(o.QEMUBinary)
	}
	if maps, err := os.ReadFile(filepath.Join(r.ProcRoot, strconv.Itoa(p.PID), "maps")); err == nil {
		for _, f := range qemuproc.CodeFiles(string(maps)) {
			rec.Code = append(rec.Code, r.Root.QEMU(hostpath.Local(f)))
		}
	}
	rec.CopyRAM = o.CopyRAM
	if cg, err := os.ReadFile(filepath.Join(r.ProcRoot, strconv.Itoa(p.PID), "cgroup")); err == nil {
		hs := qemuproc.Hierarchies(string(cg))
		if len(hs) > 1 { // more than v2's "0::" alone
			rec.Hierarchies = hs
		}
		rec.Placement = r.readPlacement(p.PID, t.Facts.Vcpus, hs)
	}
	if t.Libvirt != "" {
		b, err := os.ReadFile(t.Libvirt)
		if err != nil {
			return nil, fmt.Errorf("reading libvirt's record of the guest: %w", err)
		}
		rec.Libvirt = &manifest.Libvirt{Status: r.Root.QEMU(hostpath.Local(t.Libvirt)), Record: string(b)}
	}
	if a := guestagent.ProcessSocket(p); a != "" {
		rec.Agent = hostpath.Arg(cwd, a)
	}
	ram, err := p.Cmdline.RAM()
	if err != nil {
		return nil, err
	}
	rec.RAM = ram.Backends

	// Number the inherited fds 3, 4, … in order of first appearance.
	fdMap := map[int]int{}
	var olds []int
	kinds := map[int]qemuargv.FdRef{}
	for _, ref := range p.Cmdline.FdRefs() {
		if _, ok := fdMap[ref.Num]; ok {
			continue
		}
		fdMap[ref.Num] = firstFd + len(olds)
		olds = append(olds, ref.Num)
		kinds[ref.Num] = ref
	}
	t.files = map[int]*os.File{}
	for _, old := range olds {
		ref := kinds[old]
		fd := manifest.Fd{Num: fdMap[old], Kind: ref.Kind}
		switch ref.Kind {
		case qemuargv.FdTap:
			f, err := tapdev.DupFromProcess(p.PID, old)
			if err != nil {
				return nil, fmt.Errorf("taking over tap fd %d: %w", old, err)
			}
			name, flags, err := tapdev.Info(f)
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("tap fd %d: %w", old, err)
			}
			fd.TapName, fd.TapFlags = name, flags
			fd.TapPersist = flags&unix.IFF_PERSIST != 0
			if !fd.TapPersist {
				if err := tapdev.SetPersist(f, true); err != nil {
					f.Close()
					return nil, fmt.Errorf("keeping tap %s alive: %w", name, err)
				}
			}
			t.files[fd.Num] = f
		case qemuargv.FdChardev:
			f, err := tapdev.DupFromProcess(p.PID, old)
			if err != nil {
				return nil, fmt.Errorf("taking over socket fd %d: %w", old, err)
			}
			fd.SocketPath = hostpath.QEMU(p.Fds[old].SocketPath) // as bound: QEMU's view
			t.files[fd.Num] = f
		case qemuargv.FdFile:
			// The very open file goes to the new QEMU: same offset, same
			// flags (libvirt's logs are O_APPEND). Its name and flags are
			// recorded to open it again after a kexec.
			// QEMU holds it under another number now (query-fdsets).
			set, opaque, nth := p.Cmdline.FdsetOf(ref)
			held, ok := t.Facts.FdsetFile(set, opaque, nth)
			if !ok {
				return nil, fmt.Errorf("-add-fd fd=%d of fdset %d: QEMU does not hold it any more", old, set)
			}
			f, err := tapdev.DupFromProcess(p.PID, held.Fd)
			if err != nil {
				return nil, fmt.Errorf("taking over fd %d of fdset %d: %w", held.Fd, set, err)
			}
			fd.Flags = held.Flags
			if filepath.IsAbs(held.Target) { // a pipe (virtlogd's) has no name to open again
				fd.Path = r.Root.QEMU(hostpath.Local(held.Target))
			} else if f := libvirtFdsetFile(rec, opaque); f != "" {
				// …but the file virtlogd writes it to: after a kexec
				// the new QEMU appends to it itself.
				fd.Path, fd.Flags = hostpath.QEMU(f), unix.O_WRONLY|unix.O_APPEND
			}
			t.files[fd.Num] = f
		case qemuargv.FdMemfd:
			// The guest's RAM: the new QEMU gets this very memfd (a
			// restart), or the kernel keeps it across the kexec under a
			// token (an update).
			f, err := tapdev.DupFromProcess(p.PID, old)
			if err != nil {
				return nil, fmt.Errorf("taking over the RAM fd %d of backend %q: %w", old, ref.Owner, err)
			}
			st, err := f.Stat()
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("RAM fd %d of backend %q: %w", old, ref.Owner, err)
			}
			fd.Backend, fd.Size = ref.Owner, st.Size()
			if o.KeepRAM != nil {
				if fd.Token, err = o.KeepRAM.Keep(rec.Name, ref.Owner, f); err != nil {
					f.Close()
					return nil, fmt.Errorf("preserving the RAM of backend %q: %w", ref.Owner, err)
				}
			}
			t.ramFd = true
			t.files[fd.Num] = f
		case qemuargv.FdVhost:
			// A vhost-net fd is bound to the old QEMU's memory: the new
			// QEMU gets a fresh one.
		default:
			return nil, fmt.Errorf("fd %d (%s) cannot be re-created", old, ref.Kind)
		}
		rec.Fds = append(rec.Fds, fd)
	}
	sort.Slice(rec.Fds, func(i, j int) bool { return rec.Fds[i].Num < rec.Fds[j].Num })
	cl := p.Cmdline
	if t.Facts.VNC != nil {
		cl = cl.WithVNCAt(*t.Facts.VNC) // a twin given its VNC port after its start
	}
	n, err := cl.ForRestart(qemuargv.RestartOptions{MachineType: rec.MachineType, FdMap: fdMap})
	if err != nil {
		return nil, err
	}
	rec.RestartArgv = n.Argv()
	if err := r.planTransfer(t, rec, o); err != nil {
		return nil, err
	}
	return rec, nil
}

// migrateSetup sets the capabilities and mode both sides of CPR use:
// shared RAM stays where it is unless the VM's RAM is to be copied.
func migrateSetup(ctx context.Context, c *qmp.Client, vm *manifest.VM) error {
	mode, ignoreShared := "cpr-reboot", !vm.CopyRAM
	if vm.Transfer != nil {
		// cpr-transfer leaves all RAM in place by itself, and the new
		// QEMU, reached only once the stream flows, keeps QEMU's default.
		mode, ignoreShared = "cpr-transfer", false
	}
	return setMigration(ctx, c, manifest.Migration{
		Capabilities: map[string]bool{"x-ignore-shared": ignoreShared, "events": true},
		Mode:         mode,
	})
}

// qemuDefaults is a fresh QEMU's migration set-up, as far as migrateSetup
// changes it.
var qemuDefaults = manifest.Migration{
	Capabilities: map[string]bool{"x-ignore-shared": false, "events": false},
	Mode:         "normal",
}

// queryMigration reads the part of a QEMU's migration set-up that
// migrateSetup changes.
func queryMigration(ctx context.Context, c *qmp.Client) (*manifest.Migration, error) {
	var caps []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := c.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return nil, err
	}
	var params struct {
		Mode string `json:"mode"`
	}
	if err := c.Execute(ctx, "query-migrate-parameters", nil, &params); err != nil {
		return nil, err
	}
	m := &manifest.Migration{Capabilities: maps.Clone(qemuDefaults.Capabilities), Mode: params.Mode}
	for _, c := range caps {
		if _, ours := m.Capabilities[c.Capability]; ours {
			m.Capabilities[c.Capability] = c.State
		}
	}
	if m.Mode == "" {
		m.Mode = qemuDefaults.Mode
	}
	return m, nil
}

// setMigration applies m to c's QEMU.
func setMigration(ctx context.Context, c *qmp.Client, m manifest.Migration) error {
	var caps []map[string]any
	for _, name := range slices.Sorted(maps.Keys(m.Capabilities)) {
		caps = append(caps, map[string]any{"capability": name, "state": m.Capabilities[name]})
	}
	if err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return err
	}
	return c.Execute(ctx, "migrate-set-parameters", map[string]any{"mode": m.Mode}, nil)
}

// giveBackMigration sets the QEMU that runs vm's guest from now on (the old
// one after a rollback, a new one after a restore) to the VM's own
// migration set-up again. An old QEMU whose set-up was never recorded was
// never changed (it is recorded before it is changed) and is left alone; a
// new QEMU always had cpr-reboot's, and gets QEMU's defaults then. The guest
// runs either way, so a failure is only logged, saying what it means.
func (r *run) giveBackMigration(ctx context.Context, c *qmp.Client, vm *manifest.VM, isNew bool) {
	m := qemuDefaults
	switch {
	case vm.Migration != nil:
		m = *vm.Migration
	case !isNew:
		return
	}
	if err := setMigration(ctx, c, m); err != nil {
		r.Log.Warn("the QEMU running the guest keeps cpr-reboot's migration set-up: before migrating it elsewhere, set migrate-set-parameters mode and the x-ignore-shared capability back",
			"vm", vm.Name, "mode", m.Mode, "err", err)
	}
	if err := setDiscardData(ctx, c, vm, true); err != nil {
		r.Log.Warn("the QEMU running the guest keeps discard-data=off: its RAM file stays when it quits", "vm", vm.Name, "err", err)
	}
}

// setupAll sets every old QEMU up for the save. What it changes — each
// QEMU's own migration set-up, the discard-data of its RAM — is read and
// recorded in the manifest first: a run that dies half-way still gives
// each QEMU its own back (recover). Its inverse is giveBackAll.
func (r *run) setupAll(ctx context.Context, ts []*Target) error {
	if err := r.each("migrate-read", ts, func(t *Target) error { return r.readSetup(ctx, t) }); err != nil {
		return err
	}
	if err := r.write(); err != nil {
		return fmt.Errorf("recording the migration set-up: %w", err)
	}
	return r.each("migrate-setup", ts, func(t *Target) error { return r.setupOne(ctx, t) })
}

// readSetup records an old QEMU's own migration set-up.
func (r *run) readSetup(ctx context.Context, t *Target) error {
	ctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	defer cancel()
	own, err := queryMigration(ctx, t.QMP)
	if err != nil {
		return fmt.Errorf("%s: reading its migration set-up: %w", t.Name(), err)
	}
	r.mu.Lock()
	t.rec.Migration = own
	r.mu.Unlock()
	return nil
}

// setupOne sets an old QEMU up for the save: cpr-reboot's migration
// set-up, and discard-data off on its RAM — a QEMU with discard-data=on
// punches its RAM file out as it quits, and the guest's RAM is what the
// restart keeps. Its inverse is giveBackMigration.
func (r *run) setupOne(ctx context.Context, t *Target) error {
	ctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	defer cancel()
	if err := setDiscardData(ctx, t.QMP, t.rec, false); err != nil {
		return fmt.Errorf("%s: %w", t.Name(), err)
	}
	if err := migrateSetup(ctx, t.QMP, t.rec); err != nil {
		return fmt.Errorf("%s: %w", t.Name(), err)
	}
	return nil
}

// setDiscardData sets discard-data on every RAM backend of vm's that has it
// on its command line.
func setDiscardData(ctx context.Context, c *qmp.Client, vm *manifest.VM, on bool) error {
	for _, b := range vm.RAM {
		if !b.DiscardData {
			continue
		}
		if err := c.Execute(ctx, "qom-set", map[string]any{"path": "/objects/" + b.ID, "property": "discard-data", "value": on}, nil); err != nil {
			return fmt.Errorf("setting discard-data=%v on memory backend %q: %w", on, b.ID, err)
		}
	}
	return nil
}

// waitMigration waits until the migration on c completed, failing on
// "failed"/"cancelled". It listens to MIGRATION events and, as a fallback,
// polls query-migrate.
func waitMigration(ctx context.Context, c *qmp.Client, what string) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	from := 0
	for {
		evctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		ev, i, err := c.WaitEvent(evctx, "MIGRATION", from, nil)
		cancel()
		status := ""
		if err == nil {
			from = i + 1
			status, _ = ev.Data["status"].(string)
		} else {
			if ctx.Err() != nil {
				return fmt.Errorf("waiting for %s to complete: %w", what, ctx.Err())
			}
			if errors.Is(err, qmp.ErrDisconnected) {
				return fmt.Errorf("waiting for %s: QEMU closed its monitor (did it exit?): %w", what, err)
			}
			var q struct {
				Status    string `json:"status"`
				ErrorDesc string `json:"error-desc"`
			}
			if qerr := c.Execute(ctx, "query-migrate", nil, &q); qerr == nil {
				status = q.Status
				if status == "failed" && q.ErrorDesc != "" {
					return fmt.Errorf("%s failed: %s", what, q.ErrorDesc)
				}
			}
		}
		switch status {
		case "completed":
			return nil
		case "failed", "cancelled":
			var q struct {
				ErrorDesc string `json:"error-desc"`
			}
			c.Execute(ctx, "query-migrate", nil, &q)
			if q.ErrorDesc == "" {
				return fmt.Errorf("%s %s (QEMU gave no reason over QMP)", what, status)
			}
			return fmt.Errorf("%s %s: %s", what, status, q.ErrorDesc)
		}
	}
}

// saveOne migrates one VM's device state to its state file.
func (r *run) saveOne(ctx context.Context, t *Target) error {
	ctx, cancel := context.WithTimeout(ctx, r.SaveTimeout)
	defer cancel()
	// Its threads but the vCPUs, and the migration thread it starts, at
	// real-time priority for the save; given back before anything else (a
	// failed save's undo continues the guest).
	raised := r.raiseQEMU(t.Name(), t.Proc.PID, t.Facts.Vcpus, true)
	defer r.lower(t.Name(), raised)
	if t.rec.Transfer != nil && t.early {
		if fellBack, err := r.saveTransfer(ctx, t); !fellBack || err != nil {
			return err
		}
	}
	c := t.QMP
	mark := len(c.Events())
	lowerVCPUs := r.raiseVCPUsAtStop(ctx, t, mark)
	defer lowerVCPUs() // first of the defers: before the guest may go on
	if err := c.Execute(ctx, "migrate", map[string]any{"uri": "file:" + t.rec.StateFile}, nil); err != nil {
		return fmt.Errorf("%s: %w", t.Name(), err)
	}
	if err := waitMigration(ctx, c, "saving "+t.Name()); err != nil {
		return err
	}
	for _, ev := range c.Events()[mark:] {
		if ev.Name == "STOP" {
			t.rec.Stopped = ev.Time
			break
		}
	}
	if st, err := os.Stat(r.local(t.rec.StateFile)); err == nil {
		t.rec.StateSize = st.Size()
	}
	// QEMU creates it 0660 less its umask: the guest's device state is
	// the host's business only.
	os.Chmod(r.local(t.rec.StateFile), 0o600)
	r.Log.Info("saved", "vm", t.Name(), "state_bytes", t.rec.StateSize)
	return nil
}

// releaseTaps puts back the persistence each tap had before prepare.
func (r *run) releaseTaps(ts []*Target) {
	for _, t := range ts {
		if t.rec == nil {
			continue
		}
		for _, fd := range t.rec.Fds {
			if f := t.files[fd.Num]; f != nil && fd.Kind == qemuargv.FdTap && !fd.TapPersist {
				tapdev.SetPersist(f, false)
			}
		}
		for _, f := range t.files {
			f.Close()
		}
		t.files = nil
	}
}

// quitOne quits an old QEMU that has saved, and waits for it to exit. If it
// does not exit in time it is killed: its state is already saved.
func (r *run) quitOne(ctx context.Context, t *Target) error {
	h, err := qemuproc.Open(t.Proc.PID)
	if err != nil && !errors.Is(err, qemuproc.ErrGone) {
		return fmt.Errorf("%s: %w", t.Name(), err)
	}
	// A listening socket passed by fd (libvirt's monitor) goes on to the new
	// QEMU, but the old one unlinks its path as it quits: the path is moved
	// aside over the quit and back after.
	var moved []string
	for _, fd := range t.rec.Fds {
		if fd.Kind == qemuargv.FdChardev && fd.SocketPath != "" {
			if p := r.local(fd.SocketPath); os.Rename(p, p+asideSuffix) == nil {
				moved = append(moved, p)
			}
		}
	}
	defer putBack(moved)
	qctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	err = t.QMP.Execute(qctx, "quit", nil, nil)
	cancel()
	if err != nil && !errors.Is(err, qmp.ErrDisconnected) {
		r.Log.Warn("quit command", "vm", t.Name(), "err", err)
	}
	t.QMP.Close()
	if h != nil {
		defer h.Close()
		if !h.WaitExit(r.QuitTimeout) {
			r.Log.Warn("old QEMU did not exit after quit; killing it (its state is saved)", "vm", t.Name(), "pid", t.Proc.PID)
			h.Kill()
			if !h.WaitExit(5 * time.Second) {
				return fmt.Errorf("%s: old QEMU pid %d does not exit", t.Name(), t.Proc.PID)
			}
		}
	}
	t.rec.Status = manifest.StatusQuit
	r.mu.Lock()
	r.exited[t.Name()] = true
	r.mu.Unlock()
	return nil
}

// fillDisk fills dir's filesystem (fault injection: a full disk).
func fillDisk(dir string) {
	f, err := os.Create(filepath.Join(dir, ".fault-fill"))
	if err != nil {
		return
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			return
		}
	}
}
