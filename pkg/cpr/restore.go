package cpr

import (
	"context"
	"errors"
	"fmt"
	"github.com/liveupdate/liveupdate/pkg/fault"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/cgroupv2"
	"github.com/liveupdate/liveupdate/pkg/guestagent"
	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Restore starts every VM of m that is not running yet, in parallel, and
// loads its saved state. held are fds the caller still holds for a VM (from
// the old QEMU, in restart-qemu), by VM name and new fd number; fds not held
// are re-created. A VM that fails keeps its RAM and state files and is
// marked failed in the manifest, so Restore can be run again.
func (e *Engine) Restore(ctx context.Context, m *manifest.Manifest, held map[string]map[int]*os.File) error {
	return e.restore(ctx, m, held, nil)
}

// restore restores the VMs of m that need it — only those in only, when
// only is not nil.
func (e *Engine) restore(ctx context.Context, m *manifest.Manifest, held map[string]map[int]*os.File, only map[string]bool) error {
	e.man = m
	e.StateDir = m.StateDir
	var wg sync.WaitGroup
	errs := make([]error, len(m.VMs))
	for i := range m.VMs {
		vm := &m.VMs[i]
		if only != nil && !only[vm.Name] {
			continue
		}
		switch vm.Status {
		case manifest.StatusRunning, manifest.StatusResumed:
			continue // nothing to do: idempotent
		case manifest.StatusPlanned:
			errs[i] = fmt.Errorf("%s: was never saved (its old QEMU should still run): not restoring", vm.Name)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := e.timed("restore", vm.Name, func() (err error) {
				// A bug here must not take the caller (PID 1) down.
				defer func() {
					if r := recover(); r != nil {
						err = fmt.Errorf("internal error: %v", r)
					}
				}()
				return e.restoreOne(ctx, vm, held[vm.Name])
			})
			if err != nil {
				vm.Status = manifest.StatusFailed
				vm.Error = err.Error()
				e.Log.Error("restore failed; RAM and state files kept", "vm", vm.Name, "err", err)
				errs[i] = fmt.Errorf("%s: %w", vm.Name, err)
			}
		}()
	}
	wg.Wait()
	if err := e.writeManifest(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// restoreOne starts one VM's new QEMU and loads its state.
func (e *Engine) restoreOne(ctx context.Context, vm *manifest.VM, held map[int]*os.File) error {
	ctx, cancel := context.WithTimeout(ctx, e.RestoreTimeout)
	defer cancel()
	q := e.takeEarly(vm.Name) // started before the save, if it was
	if err := e.checkGuestFiles(vm); err != nil {
		if q != nil {
			q.stop()
		}
		return err
	}
	if q == nil {
		var err error
		if q, err = e.startQEMU(ctx, vm, held, vm.RestartArgv); err != nil {
			return err
		}
	}
	fail := func(err error) error {
		q.stop()
		vm.NewPID = 0
		return fmt.Errorf("%w (QEMU log: %s)", err, e.logPath(vm))
	}
	defer q.c.Close()
	c := q.c
	err := e.timed("load", vm.Name, func() error {
		if !q.setUp {
			if err := migrateSetup(ctx, c, vm); err != nil {
				return err
			}
		}
		if err := c.Execute(ctx, "migrate-incoming", map[string]any{"uri": "file:" + vm.StateFile}, nil); err != nil {
			return err
		}
		return waitMigration(ctx, c, "loading "+vm.Name)
	})
	if err == nil {
		err = fault.At("load")
	}
	if err != nil {
		return fail(err)
	}
	vm.Status = manifest.StatusRestored

	var st struct {
		Running bool
		Status  string
	}
	if vm.WasRunning {
		// Straight to cont, no query-status first: the new QEMU runs with
		// -S, so it is paused, and a round trip here is in the blackout.
		// (cont on a running guest does no harm.)
		if err := e.timed("cont", vm.Name, func() error { return c.Execute(ctx, "cont", nil, nil) }); err != nil {
			return fail(err)
		}
		ev, _, err := c.WaitEvent(ctx, "RESUME", 0, nil)
		if err != nil {
			return fail(err)
		}
		vm.Resumed = ev.Time
		if err := c.Execute(ctx, "query-status", nil, &st); err != nil || !st.Running {
			return fail(fmt.Errorf("guest is %q after restore, not running (%v)", st.Status, err))
		}
	}

	// Outside the blackout: the new QEMU gets the VM's own migration set-up.
	e.giveBackMigration(ctx, c, vm)

	// Confirmed: the state file is done with; keep it for inspection.
	vm.Status = manifest.StatusRunning
	vm.Error = ""
	if err := os.Rename(e.HostPath(vm.StateFile), e.HostPath(vm.StateFile)+".done"); err != nil {
		e.Log.Warn("marking state file done", "vm", vm.Name, "err", err)
	}
	for _, fd := range vm.Fds {
		if fd.Kind == qemuargv.FdTap && !fd.TapPersist {
			if err := tapdev.SetPersist(q.files[fd.Num-firstFd], false); err != nil {
				e.Log.Warn("restoring tap persistence", "vm", vm.Name, "tap", fd.TapName, "err", err)
			}
		}
	}
	e.Log.Info("restored", "vm", vm.Name, "pid", vm.NewPID, "blackout", vm.Blackout())
	if e.ClockAsync {
		e.clocks.Add(1)
		go func() {
			defer e.clocks.Done()
			e.fixClock(context.WithoutCancel(ctx), vm)
			if err := e.writeManifest(); err != nil {
				e.Log.Warn("recording the clock fix", "vm", vm.Name, "err", err)
			}
		}()
	} else {
		e.fixClock(ctx, vm)
	}
	return nil
}

// checkGuestFiles checks that a VM's state file is there and its RAM
// files are whole before a QEMU is started on them.
func (e *Engine) checkGuestFiles(vm *manifest.VM) error {
	if _, err := os.Stat(e.HostPath(vm.StateFile)); err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	for _, b := range vm.RAM {
		if b.MemPath == "" {
			continue
		}
		st, err := os.Stat(e.HostPath(b.MemPath))
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
	cmd     *exec.Cmd
	exited  chan struct{} // closed when it exits; waitErr then says how
	waitErr error
	c       *qmp.Client
	files   []*os.File // its inherited fds 3, 4, …
	setUp   bool       // migration capabilities already set
	aside   []string   // started early: the old QEMU's sockets, moved aside (early.go)
}

// startQEMU starts a VM's new QEMU on argv (in its network namespace,
// cgroup and credentials) and connects to its monitor. Its inverse is stop.
func (e *Engine) startQEMU(ctx context.Context, vm *manifest.VM, held map[int]*os.File, argv []string) (*newQEMU, error) {
	q := &newQEMU{exited: make(chan struct{})}
	var opened []*os.File
	defer func() {
		for _, f := range opened {
			f.Close() // QEMU has its copies
		}
	}()
	err := tapdev.InNetNS(vm.NetNS, func() error {
		var err error
		q.files, opened, err = e.openFds(vm, held)
		if err != nil {
			return err
		}
		q.cmd, err = e.command(vm, argv, q.files)
		if err != nil {
			return err
		}
		err = e.timed("qemu-start", vm.Name, q.cmd.Start)
		if q.cmd.SysProcAttr.UseCgroupFD {
			unix.Close(q.cmd.SysProcAttr.CgroupFD) // the child has its cgroup
		}
		if err == nil {
			if ferr := fault.At("qemu-start"); ferr != nil {
				q.cmd.Process.Kill()
				q.cmd.Wait()
				return ferr
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting QEMU: %w", err)
	}
	vm.NewPID = q.cmd.Process.Pid
	if e.OnStart != nil {
		e.OnStart(vm.NewPID)
	}
	go func() { q.waitErr = q.cmd.Wait(); close(q.exited) }()
	// QEMU's own start-up: until its QMP socket answers.
	err = e.timed("qemu-init", vm.Name, func() (err error) {
		q.c, err = dialUntil(ctx, e.HostPath(vm.QMP), q.exited, func() error { return q.waitErr })
		return err
	})
	if err != nil {
		q.stop()
		vm.NewPID = 0
		return nil, fmt.Errorf("%w (QEMU log: %s)", err, e.logPath(vm))
	}
	return q, nil
}

// stop ends a new QEMU (asking first) and waits until it is gone.
func (q *newQEMU) stop() {
	q.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-q.exited:
	case <-time.After(5 * time.Second):
		q.cmd.Process.Kill()
		<-q.exited
	}
	if q.c != nil {
		q.c.Close()
	}
}

// WaitClocks waits for the clock fixes started by an asynchronous restore.
func (e *Engine) WaitClocks() { e.clocks.Wait() }

// fixClock puts the guest's clock right through its guest agent: it stood
// still while the guest was stopped. A guest without an agent is reported.
func (e *Engine) fixClock(ctx context.Context, vm *manifest.VM) {
	if !vm.WasRunning {
		return
	}
	setClock := func(s string) { // the manifest may be being written meanwhile
		e.mu.Lock()
		vm.Clock = s
		e.mu.Unlock()
	}
	if vm.Agent == "" {
		setClock("no guest agent")
		e.Log.Warn("guest has no agent channel: its clock is behind by the blackout", "vm", vm.Name)
		return
	}
	var offset time.Duration
	err := e.timed("clock-fix", vm.Name, func() error {
		// The agent may still be waking up in the guest, and it answers
		// only after hwclock -w: both slow under emulation.
		actx, cancel := context.WithTimeout(ctx, e.ClockTimeout)
		defer cancel()
		var err error
		offset, err = guestagent.SyncClock(actx, e.HostPath(vm.Agent), 20*time.Second)
		return err
	})
	if err != nil {
		setClock("not corrected: " + err.Error())
		e.Log.Warn("guest clock not corrected", "vm", vm.Name, "err", err)
		return
	}
	e.mu.Lock()
	vm.ClockOffset = offset
	e.mu.Unlock()
	setClock("corrected")
	e.Log.Info("guest clock corrected", "vm", vm.Name, "offset", offset.Round(time.Microsecond))
}

// ClockFixTimeout is the default bound on putting one guest's clock right
// after restore (Engine.ClockTimeout).
const ClockFixTimeout = 3 * time.Minute

// openFds returns the files to pass as fds 3, 4, … and those of them this
// function opened (the caller closes them once QEMU has its copies).
func (e *Engine) openFds(vm *manifest.VM, held map[int]*os.File) (files, opened []*os.File, err error) {
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
				f, err = listenUnix(e.HostPath(fd.SocketPath))
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

func listenUnix(path string) (*os.File, error) {
	os.Remove(path) // a stale socket from the old QEMU
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("re-creating socket %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	return l.File()
}

func (e *Engine) logPath(vm *manifest.VM) string {
	return e.HostPath(filepath.Join(e.StateDir, vm.Name+".qemu.log"))
}

// command builds the new QEMU process: same cwd, environment, credentials
// and cgroup as the old one, detached into its own session.
func (e *Engine) command(vm *manifest.VM, argv []string, files []*os.File) (*exec.Cmd, error) {
	log, err := os.OpenFile(e.logPath(vm), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "--- liveupdate restore %s: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(argv, " "))
	cmd := &exec.Cmd{
		Path: vm.Binary, Args: argv, Dir: vm.Cwd, Env: vm.Env,
		Stdout: log, Stderr: log, ExtraFiles: files,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	if e.Root != "" && e.Root != "/" {
		cmd.SysProcAttr.Chroot = e.Root
		// exec.Cmd looks Path up before the chroot applies: give the
		// binary's path inside the root as argv[0]'s resolution.
		cmd.Path = vm.Binary
	}
	if vm.UID != 0 || vm.GID != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: vm.UID, Gid: vm.GID, Groups: vm.Groups}
	}
	if fd, ok := e.cgroupFD(vm); ok {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	return cmd, nil
}

// cgroupFD opens (creating if needed) the VM's recorded cgroup v2 directory,
// so the new QEMU is cloned straight into it.
func (e *Engine) cgroupFD(vm *manifest.VM) (int, bool) {
	if vm.Cgroup == "" || vm.Cgroup == "/" || !cgroupv2.Mounted(hoststate.CgroupRoot) {
		return 0, false
	}
	fd, err := cgroupv2.OpenDir(hoststate.CgroupRoot, vm.Cgroup)
	if err != nil {
		e.Log.Warn("starting QEMU outside its cgroup", "vm", vm.Name, "err", err)
		return 0, false
	}
	return fd, true
}

// dialUntil connects to a new QEMU's QMP socket as soon as it listens. A
// connection, once made, is waited on until QEMU greets it or exits: giving
// up on a handshake half-way and dialling again is what leaves a stale reply
// in QEMU's monitor for the next connection (see qmp.Dial).
func dialUntil(ctx context.Context, path string, exited <-chan struct{}, why func() error) (*qmp.Client, error) {
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-dctx.Done():
		}
	}()
	for {
		c, err := qmp.Dial(dctx, path)
		if err == nil {
			return c, nil
		}
		select {
		case <-exited:
			return nil, fmt.Errorf("new QEMU exited before its QMP socket answered: %v", why())
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for new QEMU's QMP socket %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}
