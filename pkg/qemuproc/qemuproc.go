// Package qemuproc starts, dials, stops, kills and waits for QEMU processes,
// by pidfd: those we start (Start → Process), started through PID 1's reaper
// when there is one, and those we found running (Open → Handle).
package qemuproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/cgroupv2"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/reaper"
)

// ErrGone says the process has exited already (ESRCH).
var ErrGone = errors.New("process already gone")

// ErrRunning is ExitErr's answer while the process runs.
var ErrRunning = errors.New("process still running")

// DefaultCgroupRoot is where the cgroup v2 hierarchy is mounted.
const DefaultCgroupRoot = "/sys/fs/cgroup"

// Spec is a process to start: always in a session of its own (setsid).
type Spec struct {
	Binary string   // path of the executable, inside Root; not looked up in PATH
	Argv   []string // argv[0] included
	Dir    string   // working directory, inside Root
	Env    []string // nil: ours
	Root   string   // chroot into it first; "" or "/": none

	UID, GID uint32 // 0, 0: ours (root's credentials are not set)
	Groups   []uint32

	// Cgroup is the cgroup v2 path (under CgroupRoot, DefaultCgroupRoot
	// when empty) the process is cloned straight into; created if
	// missing. "" or "/", or no cgroup v2 at CgroupRoot: ours. A cgroup
	// that cannot be opened is not fatal: the process starts in ours and
	// Process.CgroupErr says why.
	Cgroup     string
	CgroupRoot string

	ExtraFiles []*os.File // fds 3, 4, …
	Log        *os.File   // stdout and stderr; nil: /dev/null
}

// Process is a process we started. Its pidfd, not its pid, is what it is
// signalled through, so a pid reused after it exited is never hit.
type Process struct {
	Pid       int
	CgroupErr error // the process runs outside Spec.Cgroup, for this reason

	exited chan struct{}
	status unix.WaitStatus
	err    error // a failure to wait (not how it exited)

	mu    sync.Mutex
	pidfd int // -1 once it exited
}

// Start starts spec's process on the calling goroutine's thread (so a
// caller that locked its thread into a network namespace starts it there).
// With r, the process is started through PID 1's reaper, the process' only
// waiter; with r nil, exec.Cmd.Wait waits for it. The kernel must give a
// pidfd at clone (CLONE_PIDFD, Linux 5.2) for Signal, Kill and Stop to work
// on a process started through a reaper.
func Start(spec Spec, r *reaper.Reaper) (*Process, error) {
	if len(spec.Argv) == 0 {
		return nil, errors.New("qemuproc: empty argv")
	}
	pidfd := -1
	cmd := &exec.Cmd{
		Path: spec.Binary, Args: spec.Argv, Dir: spec.Dir, Env: spec.Env,
		ExtraFiles:  spec.ExtraFiles,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true, PidFD: &pidfd},
	}
	if spec.Log != nil {
		cmd.Stdout, cmd.Stderr = spec.Log, spec.Log
	}
	if spec.Root != "" && spec.Root != "/" {
		cmd.SysProcAttr.Chroot = spec.Root
	}
	if spec.UID != 0 || spec.GID != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: spec.UID, Gid: spec.GID, Groups: spec.Groups}
	}
	p := &Process{exited: make(chan struct{}), pidfd: -1}
	if fd, err := openCgroup(spec); err != nil {
		p.CgroupErr = err
	} else if fd >= 0 {
		defer unix.Close(fd) // the child has its cgroup
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	var child *reaper.Child
	var err error
	if r != nil {
		child, err = r.Start(cmd)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		return nil, err
	}
	p.Pid = cmd.Process.Pid
	if pidfd < 0 && r == nil { // no CLONE_PIDFD; not reaped before cmd.Wait
		if pidfd, err = unix.PidfdOpen(p.Pid, 0); err != nil {
			pidfd = -1
		}
	}
	p.pidfd = pidfd
	if r != nil {
		go func() { p.finish(child.Status(), nil) }()
	} else {
		go func() {
			err := cmd.Wait()
			if cmd.ProcessState != nil {
				if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
					p.finish(unix.WaitStatus(ws), nil)
					return
				}
			}
			p.finish(0, err)
		}()
	}
	return p, nil
}

func openCgroup(spec Spec) (int, error) {
	root := spec.CgroupRoot
	if root == "" {
		root = DefaultCgroupRoot
	}
	if spec.Cgroup == "" || spec.Cgroup == "/" || !cgroupv2.Mounted(root) {
		return -1, nil
	}
	return cgroupv2.OpenDir(root, spec.Cgroup)
}

func (p *Process) finish(ws unix.WaitStatus, err error) {
	p.mu.Lock()
	if p.pidfd >= 0 {
		unix.Close(p.pidfd)
		p.pidfd = -1
	}
	p.status, p.err = ws, err
	p.mu.Unlock()
	close(p.exited)
}

// Exited is closed when the process has exited (and been reaped).
func (p *Process) Exited() <-chan struct{} { return p.exited }

// ExitErr says how the process exited: nil for exit status 0, an
// *ExitError otherwise (or why it could not be waited for); ErrRunning
// while it runs.
func (p *Process) ExitErr() error {
	select {
	case <-p.exited:
	default:
		return ErrRunning
	}
	if p.err != nil {
		return p.err
	}
	if p.status.Exited() && p.status.ExitStatus() == 0 {
		return nil
	}
	return &ExitError{Status: p.status}
}

// how is ExitErr in words, exit status 0 included.
func (p *Process) how() string {
	if err := p.ExitErr(); err != nil {
		return err.Error()
	}
	return "exit status 0"
}

// Wait waits until the process has exited, or ctx is done, and returns
// ExitErr (or ctx's error).
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.exited:
		return p.ExitErr()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Signal sends sig through the process' pidfd; ErrGone once it exited.
func (p *Process) Signal(sig unix.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pidfd < 0 {
		select {
		case <-p.exited:
			return ErrGone
		default:
			return fmt.Errorf("pid %d: no pidfd to signal it through", p.Pid)
		}
	}
	return sendSignal(p.pidfd, p.Pid, sig)
}

// Kill sends SIGKILL without waiting.
func (p *Process) Kill() error { return p.Signal(unix.SIGKILL) }

// Stop asks the process to end (SIGTERM), kills it (SIGKILL) if it has
// not after grace, and waits until it is gone.
func (p *Process) Stop(grace time.Duration) {
	p.Signal(unix.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		p.Kill()
		<-p.exited
	}
}

// ExitError is a process' exit other than with status 0.
type ExitError struct{ Status unix.WaitStatus }

func (e *ExitError) Error() string { return Describe(e.Status) }

// Describe says how a process exited, in words.
func Describe(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled() && ws.CoreDump():
		return fmt.Sprintf("killed by signal %d (%v), core dumped", ws.Signal(), ws.Signal())
	case ws.Signaled():
		return fmt.Sprintf("killed by signal %d (%v)", ws.Signal(), ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}

func sendSignal(pidfd, pid int, sig unix.Signal) error {
	err := unix.PidfdSendSignal(pidfd, sig, nil, 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ESRCH):
		return ErrGone
	}
	return fmt.Errorf("pid %d: pidfd_send_signal %v: %w", pid, sig, err)
}

// Handle is a process we did not start (an old QEMU found in /proc), held
// by pidfd: a pid reused after Open is never signalled.
type Handle struct {
	Pid   int
	pidfd int
}

// Open opens a handle on pid; (nil, ErrGone) if it has exited already.
func Open(pid int) (*Handle, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	switch {
	case err == nil:
		return &Handle{Pid: pid, pidfd: fd}, nil
	case errors.Is(err, unix.ESRCH):
		return nil, ErrGone
	}
	return nil, fmt.Errorf("pid %d: pidfd_open: %w", pid, err)
}

// Signal sends sig; ErrGone if the process has exited (and been reaped).
func (h *Handle) Signal(sig unix.Signal) error { return sendSignal(h.pidfd, h.Pid, sig) }

// Kill sends SIGKILL without waiting.
func (h *Handle) Kill() error { return h.Signal(unix.SIGKILL) }

// WaitExit waits up to d until the process has exited (a zombie counts:
// it is its parent's to reap) and tells whether it has.
func (h *Handle) WaitExit(d time.Duration) bool { return waitPidfd(h.pidfd, d) }

// Close releases the handle.
func (h *Handle) Close() error { return unix.Close(h.pidfd) }

// KillAndWait kills pid and waits up to d until it has exited. A pid gone
// already is not an error.
func KillAndWait(pid int, d time.Duration) error {
	return withHandle(pid, func(h *Handle) error {
		if err := h.Kill(); err != nil && !errors.Is(err, ErrGone) {
			return err
		}
		if !h.WaitExit(d) {
			return fmt.Errorf("pid %d, killed, does not exit after %v (stuck in the kernel?)", pid, d)
		}
		return nil
	})
}

// withHandle runs fn on a handle of pid; a pid gone already is nil.
func withHandle(pid int, fn func(*Handle) error) error {
	h, err := Open(pid)
	if errors.Is(err, ErrGone) {
		return nil
	}
	if err != nil {
		return err
	}
	defer h.Close()
	return fn(h)
}

// waitPidfd waits up to d until the process behind pidfd exits.
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

// DialQMP connects to the QMP socket at path of p, a QEMU just started, as
// soon as it listens. A connection, once made, is waited on until QEMU
// greets it or exits: giving up on a handshake half-way and dialling again
// is what leaves a stale reply in QEMU's monitor for the next connection
// (see qmp.Dial). Only p may serve it (qmp.DialPeer): a socket at path
// served by another process is dialled again until p's appears. It fails
// when p exits first, saying how, or when ctx is done.
func DialQMP(ctx context.Context, path string, p *Process) (*qmp.Client, error) {
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-p.exited:
			cancel()
		case <-dctx.Done():
		}
	}()
	var last error // the last failure not caused by the deadline itself
	for {
		c, err := qmp.DialPeer(dctx, path, p.Pid)
		if err == nil {
			return c, nil
		}
		// The deadline can be reached in the dial a moment before the
		// context says so: such an error is the deadline's, not a reason.
		if last == nil || (dctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded)) {
			last = err
		}
		select {
		case <-p.exited:
			if err := p.ExitErr(); err != nil {
				return nil, fmt.Errorf("new QEMU exited before its QMP socket answered: %w", err)
			}
			return nil, fmt.Errorf("new QEMU exited before its QMP socket answered: %s", p.how())
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for new QEMU's QMP socket %s: %w (last: %v)", path, ctx.Err(), last)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// WaitGone waits up to d for a process we did not start to exit; a pid
// that is already gone is nil.
func WaitGone(pid int, d time.Duration) error {
	return withHandle(pid, func(h *Handle) error {
		if !h.WaitExit(d) {
			return fmt.Errorf("pid %d still runs after %s", pid, d)
		}
		return nil
	})
}

// RAMMemfd makes a memfd of size bytes for guest RAM that a QEMU is given as
// an inherited fd (-object memory-backend-file,mem-path=/proc/self/fd/N,
// share=on): shmem, not hugetlb, the kind the kernel's Live Update
// Orchestrator keeps across a kexec. Close-on-exec here; ExtraFiles passes
// it on.
func RAMMemfd(name string, size int64) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create for guest RAM %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+name)
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("sizing guest RAM memfd %s to %d bytes: %w", name, size, err)
	}
	return f, nil
}
