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
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/guestagent"
	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
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
}

// firstFd is where the new QEMU's inherited fds start (after stdio).
const firstFd = 3

// Save saves every target's device state in parallel and, when all saved,
// quits the old QEMUs. On any save failure it resumes every VM on its old
// QEMU and returns an error saying what happened to each; nothing is lost.
// All targets must have an OK verdict.
func (e *Engine) Save(ctx context.Context, ts []*Target, o SaveOptions) (*manifest.Manifest, error) {
	for _, t := range ts {
		if !t.Verdict.OK {
			return nil, fmt.Errorf("VM %s is not safe to save: %s", t.Name(), strings.Join(t.Verdict.Problems, "; "))
		}
	}
	if err := os.MkdirAll(e.HostPath(e.StateDir), 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	if err := manifest.CheckPrivate(filepath.Join(e.HostPath(e.StateDir), manifest.FileName)); err != nil {
		return nil, err
	}
	prior := e.pending
	e.pending = nil
	e.man = newManifest(e.StateDir)
	e.man.Phases = prior

	// Prepare: record each VM and take over its inherited fds.
	for _, t := range ts {
		rec, err := e.prepare(t, o)
		if err != nil {
			e.releaseTaps(ts)
			return nil, fmt.Errorf("preparing %s: %w", t.Name(), err)
		}
		e.man.VMs = append(e.man.VMs, *rec)
	}
	for i, t := range ts {
		t.rec = &e.man.VMs[i]
	}
	e.man.Cgroups, e.man.Network = hoststate.Capture(hoststate.CgroupRoot, hostGuests(ts), e.Log)
	if err := e.writeManifest(); err != nil {
		e.releaseTaps(ts)
		return nil, err
	}
	fault.On("killqemu", func(string) { unix.Kill(ts[0].Proc.PID, unix.SIGKILL) })
	fault.On("fill", func(string) { fillDisk(e.HostPath(e.StateDir)) })
	if err := fault.At("manifest"); err != nil {
		e.releaseTaps(ts)
		return nil, err
	}
	if o.EarlyStart {
		e.startEarly(ctx, ts)
		if err := fault.At("early-start"); err != nil {
			for _, t := range ts {
				e.dropEarly(t.rec)
			}
			e.releaseTaps(ts)
			return nil, err
		}
	}

	// Set every old QEMU up for the migration before the first one stops:
	// these round trips then weigh on no guest's blackout.
	errs := e.inParallel("migrate-setup", ts, func(t *Target) error { return e.setupOne(ctx, t) })
	if err := errors.Join(errs...); err != nil {
		rerr := e.Resume(ts)
		return e.man, fmt.Errorf("setting up the migration failed, no VM stopped: %w", errors.Join(err, rerr))
	}

	// Save all in parallel; quit none until all have saved.
	errs = e.inParallel("save", ts, func(t *Target) error { return e.saveOne(ctx, t) })
	if err := errors.Join(errs...); err != nil {
		rerr := e.Resume(ts)
		return e.man, fmt.Errorf("save failed, every VM resumed on its old QEMU: %w", errors.Join(err, rerr))
	}
	for _, t := range ts {
		t.rec.Status = manifest.StatusSaved
	}
	if err := e.writeManifestUnsynced(); err != nil {
		rerr := e.Resume(ts)
		return e.man, fmt.Errorf("recording the save failed, every VM resumed on its old QEMU: %w", errors.Join(err, rerr))
	}
	if err := fault.At("saved"); err != nil {
		rerr := e.Resume(ts)
		return e.man, fmt.Errorf("every VM resumed on its old QEMU: %w", errors.Join(err, rerr))
	}

	// Quit: from here on the way back is Restore. An old QEMU with a new
	// one started early waits, paused, until the new one runs its guest
	// (retireOld).
	var quitting []*Target
	for _, t := range ts {
		if !t.early {
			quitting = append(quitting, t)
		}
	}
	errs = e.inParallel("quit", quitting, func(t *Target) error { return e.quitOne(ctx, t) })
	if len(quitting) > 0 {
		if err := e.writeManifest(); err != nil {
			e.Log.Error("recording quit", "err", err)
		}
	}
	if err := fault.At("quit"); err != nil {
		errs = append(errs, err)
	}
	return e.man, errors.Join(errs...)
}

// inParallel runs one phase for every target at once, each timed under
// its VM's row, and returns their errors, index for index.
func (e *Engine) inParallel(phase string, ts []*Target, do func(*Target) error) []error {
	errs := make([]error, len(ts))
	var wg sync.WaitGroup
	for i, t := range ts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = e.timed(phase, t.Name(), func() error { return do(t) })
		}()
	}
	wg.Wait()
	return errs
}

func newManifest(stateDir string) *manifest.Manifest {
	host, _ := os.Hostname()
	var uts unix.Utsname
	unix.Uname(&uts)
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	now := time.Now()
	return &manifest.Manifest{
		Schema:   manifest.SchemaVersion,
		ID:       fmt.Sprintf("%s-%d", now.UTC().Format("20060102T150405Z"), os.Getpid()),
		Created:  now,
		StateDir: stateDir,
		Host: manifest.Host{Hostname: host, Kernel: unix.ByteSliceToString(uts.Release[:]),
			BootID: strings.TrimSpace(string(boot))},
	}
}

// prepare records what a restart needs and takes over the inherited fds
// that must outlive the old QEMU (taps are made persistent).
func (e *Engine) prepare(t *Target, o SaveOptions) (*manifest.VM, error) {
	p := t.Proc
	// /proc shows the binary and working directory from our root; a QEMU
	// chrooted in e.Root sees them without that prefix.
	rec := &manifest.VM{
		Name: t.Name(), PID: p.PID, Binary: e.GuestPath(p.Exe), Argv: p.Argv, Cwd: e.GuestPath(p.Cwd), Env: p.Env,
		UID: p.UID, GID: p.GID, Groups: p.Groups, Cgroup: p.Cgroup, NetNS: t.NetNS,
		QMP: t.Facts.QMPPath, MachineType: strings.TrimSuffix(t.Facts.MachineType, "-machine"),
		QEMUVersion: fmt.Sprintf("%d.%d.%d", t.Facts.Version[0], t.Facts.Version[1], t.Facts.Version[2]),
		StateFile:   preflight.StateFile(e.StateDir, t.Name()),
		WasRunning:  t.Facts.Status == "running",
		Status:      manifest.StatusPlanned,
	}
	if o.QEMUBinary != "" {
		rec.Binary = o.QEMUBinary
	}
	rec.CopyRAM = o.CopyRAM
	if a := guestagent.Socket(p.Cmdline); a != "" {
		if !filepath.IsAbs(a) {
			a = filepath.Join(p.Cwd, a)
		}
		rec.Agent = a
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
	for _, r := range p.Cmdline.FdRefs() {
		if _, ok := fdMap[r.Num]; ok {
			continue
		}
		fdMap[r.Num] = firstFd + len(olds)
		olds = append(olds, r.Num)
		kinds[r.Num] = r
	}
	t.files = map[int]*os.File{}
	for _, old := range olds {
		r := kinds[old]
		fd := manifest.Fd{Num: fdMap[old], Kind: r.Kind}
		switch r.Kind {
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
			fd.SocketPath = p.Fds[old].SocketPath
			t.files[fd.Num] = f
		case qemuargv.FdVhost:
			// A vhost-net fd is bound to the old QEMU's memory: the new
			// QEMU gets a fresh one.
		default:
			return nil, fmt.Errorf("fd %d (%s) cannot be re-created", old, r.Kind)
		}
		rec.Fds = append(rec.Fds, fd)
	}
	sort.Slice(rec.Fds, func(i, j int) bool { return rec.Fds[i].Num < rec.Fds[j].Num })
	n, err := p.Cmdline.ForRestart(qemuargv.RestartOptions{MachineType: rec.MachineType, FdMap: fdMap})
	if err != nil {
		return nil, err
	}
	rec.RestartArgv = n.Argv()
	return rec, nil
}

// migrateSetup sets the capabilities and mode both sides of CPR use:
// shared RAM stays where it is unless the VM's RAM is to be copied.
func migrateSetup(ctx context.Context, c *qmp.Client, vm *manifest.VM) error {
	return setMigration(ctx, c, manifest.Migration{
		Capabilities: map[string]bool{"x-ignore-shared": !vm.CopyRAM, "events": true},
		Mode:         "cpr-reboot",
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
// one after a rollback, the new one after a restore) to the VM's own
// migration set-up again. The guest runs either way, so a failure is only
// logged, saying what it means.
func (e *Engine) giveBackMigration(ctx context.Context, c *qmp.Client, vm *manifest.VM) {
	m := qemuDefaults
	if vm.Migration != nil {
		m = *vm.Migration
	}
	if err := setMigration(ctx, c, m); err != nil {
		e.Log.Warn("the QEMU running the guest keeps cpr-reboot's migration set-up: before migrating it elsewhere, set migrate-set-parameters mode and the x-ignore-shared capability back",
			"vm", vm.Name, "mode", m.Mode, "err", err)
	}
}

// setupOne records an old QEMU's migration set-up in the manifest and sets
// it up for the save. Its inverse is giveBackMigration.
func (e *Engine) setupOne(ctx context.Context, t *Target) error {
	ctx, cancel := context.WithTimeout(ctx, e.QMPTimeout)
	defer cancel()
	own, err := queryMigration(ctx, t.QMP)
	if err != nil {
		return fmt.Errorf("%s: reading its migration set-up: %w", t.Name(), err)
	}
	t.rec.Migration = own
	if err := migrateSetup(ctx, t.QMP, t.rec); err != nil {
		return fmt.Errorf("%s: %w", t.Name(), err)
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
				return fmt.Errorf("waiting for %s: QEMU closed its monitor (did it exit?)", what)
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
			return fmt.Errorf("%s %s: %s", what, status, q.ErrorDesc)
		}
	}
}

// saveOne migrates one VM's device state to its state file.
func (e *Engine) saveOne(ctx context.Context, t *Target) error {
	ctx, cancel := context.WithTimeout(ctx, e.SaveTimeout)
	defer cancel()
	c := t.QMP
	mark := len(c.Events())
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
	if st, err := os.Stat(e.HostPath(t.rec.StateFile)); err == nil {
		t.rec.StateSize = st.Size()
	}
	// QEMU creates it 0660 less its umask: the guest's device state is
	// the host's business only.
	os.Chmod(e.HostPath(t.rec.StateFile), 0o600)
	e.Log.Info("saved", "vm", t.Name(), "state_bytes", t.rec.StateSize)
	return nil
}

// Resume is Save's inverse, for VMs whose old QEMU still runs: it cancels
// any migration, continues the VM if it was running, gives taps back their
// own persistence, and sets the state file aside.
func (e *Engine) Resume(ts []*Target) error {
	var errs []error
	for _, t := range ts {
		if t.rec == nil || t.QMP == nil {
			continue
		}
		e.dropEarly(t.rec)
		ctx, cancel := context.WithTimeout(context.Background(), e.QMPTimeout)
		var q struct{ Status string }
		if err := t.QMP.Execute(ctx, "query-migrate", nil, &q); err == nil && q.Status != "" &&
			q.Status != "completed" && q.Status != "failed" && q.Status != "cancelled" {
			t.QMP.Execute(ctx, "migrate_cancel", nil, nil)
		}
		if t.rec.Migration != nil { // set up for the save: undo
			e.giveBackMigration(ctx, t.QMP, t.rec)
		}
		var st struct{ Running bool }
		err := t.QMP.Execute(ctx, "query-status", nil, &st)
		if err == nil && t.rec.WasRunning && !st.Running {
			err = t.QMP.Execute(ctx, "cont", nil, nil)
		}
		cancel()
		if err != nil {
			t.rec.Status = manifest.StatusFailed
			t.rec.Error = "resuming on the old QEMU: " + err.Error()
			errs = append(errs, fmt.Errorf("%s: resuming: %w", t.Name(), err))
			e.Log.Error("could not resume", "vm", t.Name(), "err", err)
			continue
		}
		t.rec.Status = manifest.StatusResumed
		if sf := e.HostPath(t.rec.StateFile); fileExists(sf) {
			os.Rename(sf, sf+".aborted")
		}
		e.Log.Info("resumed on old QEMU", "vm", t.Name())
	}
	e.releaseTaps(ts)
	if err := e.writeManifest(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// releaseTaps puts back the persistence each tap had before prepare.
func (e *Engine) releaseTaps(ts []*Target) {
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
func (e *Engine) quitOne(ctx context.Context, t *Target) error {
	pidfd, err := unix.PidfdOpen(t.Proc.PID, 0)
	if err != nil {
		return fmt.Errorf("%s: pidfd_open: %w", t.Name(), err)
	}
	defer unix.Close(pidfd)
	qctx, cancel := context.WithTimeout(ctx, e.QMPTimeout)
	err = t.QMP.Execute(qctx, "quit", nil, nil)
	cancel()
	if err != nil && !errors.Is(err, qmp.ErrDisconnected) {
		e.Log.Warn("quit command", "vm", t.Name(), "err", err)
	}
	t.QMP.Close()
	if !waitPidfd(pidfd, e.QuitTimeout) {
		e.Log.Warn("old QEMU did not exit after quit; killing it (its state is saved)", "vm", t.Name(), "pid", t.Proc.PID)
		unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
		if !waitPidfd(pidfd, 5*time.Second) {
			return fmt.Errorf("%s: old QEMU pid %d does not exit", t.Name(), t.Proc.PID)
		}
	}
	t.rec.Status = manifest.StatusQuit
	return nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// waitPidfd waits until the process behind pidfd exits.
func waitPidfd(pidfd int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms < 0 {
			return false
		}
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, ms)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0
	}
}

// WriteManifest writes the run's manifest (after the caller added to it).
func (e *Engine) WriteManifest() error { return e.writeManifest() }

// Timed runs fn as a named phase of the run and records it in the manifest.
func (e *Engine) Timed(name, vm string, fn func() error) error { return e.timed(name, vm, fn) }

// writeManifest writes the run's manifest into the state directory.
func (e *Engine) writeManifest() error {
	return e.writeManifestWith(true)
}

// writeManifestUnsynced records the manifest without waiting for the disk
// (manifest.WriteUnsynced), for records made inside the guests' blackout.
func (e *Engine) writeManifestUnsynced() error {
	return e.writeManifestWith(false)
}

// writeManifestWith writes the manifest, durably or not, with the fault
// point "manifest-write" just before its rename.
func (e *Engine) writeManifestWith(durable bool) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return manifest.WriteWith(e.HostPath(filepath.Join(e.StateDir, manifest.FileName)), e.man,
		manifest.WriteOptions{Durable: durable, BeforeRename: func() error { return fault.At("manifest-write") }})
}

// GuestPath turns a path as this process sees it into the path as a QEMU
// chrooted in e.Root sees it (the inverse of HostPath).
func (e *Engine) GuestPath(p string) string {
	if e.Root == "" || e.Root == "/" {
		return p
	}
	rel, err := filepath.Rel(e.Root, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return p
	}
	return filepath.Join("/", rel)
}

// HostPath turns a path as QEMU sees it into the path as this process sees it.
func (e *Engine) HostPath(p string) string {
	if e.Root == "" || e.Root == "/" {
		return p
	}
	return filepath.Join(e.Root, p)
}

// timed runs fn as a named phase and records it in the manifest.
func (e *Engine) timed(name, vm string, fn func() error) error {
	start := time.Now()
	err := fn()
	ph := manifest.Phase{Name: name, VM: vm, Start: start, End: time.Now()}
	if err != nil {
		ph.Error = err.Error()
	}
	e.mu.Lock()
	if e.man != nil {
		e.man.Phases = append(e.man.Phases, ph)
	} else {
		e.pending = append(e.pending, ph) // before Save made the manifest
	}
	e.mu.Unlock()
	return err
}

// EmptyManifest starts and writes a manifest with no VMs (an update of a
// host without guests still tells PID 1 what to rebuild).
func (e *Engine) EmptyManifest() (*manifest.Manifest, error) {
	if err := os.MkdirAll(e.HostPath(e.StateDir), 0o700); err != nil {
		return nil, err
	}
	prior := e.pending
	e.pending = nil
	e.man = newManifest(e.StateDir)
	e.man.Phases = prior
	e.man.VMs = []manifest.VM{}
	return e.man, e.writeManifest()
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
