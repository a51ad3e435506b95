// Package reaper is PID 1's one child reaper: a single loop that collects
// every exited child with wait4(-1) and hands each exit status to whoever
// started that child through it; the statuses of orphans re-parented to
// PID 1, which nobody waits for, are dropped.
//
// While a Reaper runs, it is the only waiter in the process: any other wait
// (exec.Cmd.Wait, os.Process.Wait, exec.Cmd.Run/Output) may find its child
// already reaped and fail with ECHILD, its exit status lost. So children are
// started with (*Reaper).Start and waited for with (*Child).Wait — never
// with exec.Cmd.Wait — and, since nothing would run the copying goroutines
// exec.Cmd.Wait ends, their stdin, stdout and stderr must be nil or an
// *os.File.
//
// Registration is race-free: Start holds the reaper's lock (shared with
// other Starts) across the fork and the registration of the new pid, and
// the loop takes that lock (exclusively) before it delivers a status. A
// child that exits before Start returns has been reaped by then, perhaps,
// but its status waits for the lock, and the lock for the registration.
package reaper

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sync"

	"golang.org/x/sys/unix"
)

// Reaper collects exited children. Its zero value is ready to use; Run must
// be running (or run later: children that exited before it started are
// collected when it does) for any Child's Wait to return. One Reaper per
// process.
type Reaper struct {
	// starting is held shared by Start across fork and registration, and
	// exclusively by the loop while it delivers.
	starting sync.RWMutex

	mu      sync.Mutex // guards waiting and dropped
	waiting map[int]*Child
	dropped int // statuses nobody was registered for
}

// Child is a process started through a Reaper.
type Child struct {
	Pid    int
	done   chan struct{}
	status unix.WaitStatus
}

// Start starts cmd (exec.Cmd.Start, on the calling goroutine's thread) and
// registers its pid for its exit status. exec.Cmd.Wait must never be called
// on cmd: wait with the Child. Stdin, Stdout and Stderr must be nil or an
// *os.File, and cmd must not come from exec.CommandContext.
func (r *Reaper) Start(cmd *exec.Cmd) (*Child, error) {
	if err := check(cmd); err != nil {
		return nil, err
	}
	r.starting.RLock()
	defer r.starting.RUnlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return r.register(cmd.Process.Pid), nil
}

func check(cmd *exec.Cmd) error {
	for _, s := range []struct {
		name string
		v    any
	}{{"Stdin", cmd.Stdin}, {"Stdout", cmd.Stdout}, {"Stderr", cmd.Stderr}} {
		switch f := s.v.(type) {
		case nil:
		case *os.File:
			if f == nil {
				return fmt.Errorf("reaper: cmd.%s is a nil *os.File", s.name)
			}
		default:
			return fmt.Errorf("reaper: cmd.%s is a %T: only nil or an *os.File can be used, as exec.Cmd.Wait (which would end its copying goroutine) is never called under the reaper", s.name, s.v)
		}
	}
	if cmd.Cancel != nil {
		return errors.New("reaper: cmd comes from exec.CommandContext: its context is watched until exec.Cmd.Wait, which is never called under the reaper")
	}
	return nil
}

// register records pid as waited for. The caller holds r.starting.
func (r *Reaper) register(pid int) *Child {
	c := &Child{Pid: pid, done: make(chan struct{})}
	r.mu.Lock()
	if r.waiting == nil {
		r.waiting = map[int]*Child{}
	}
	r.waiting[pid] = c
	r.mu.Unlock()
	return c
}

// Run is the reaper's loop: on every SIGCHLD it collects exited children
// until none is left, and delivers their statuses. It returns when ctx is
// done (PID 1 runs it forever).
func (r *Reaper) Run(ctx context.Context) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, unix.SIGCHLD)
	defer signal.Stop(sig)
	for {
		r.drain() // also those that exited before Notify
		select {
		case <-ctx.Done():
			return
		case <-sig:
		}
	}
}

// drain collects exited children until there is none (0) or no child at
// all (ECHILD).
func (r *Reaper) drain() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		r.deliver(pid, ws)
	}
}

func (r *Reaper) deliver(pid int, ws unix.WaitStatus) {
	r.starting.Lock() // a Start that forked pid has registered it
	r.mu.Lock()
	c := r.waiting[pid]
	delete(r.waiting, pid)
	if c == nil {
		r.dropped++
	}
	r.mu.Unlock()
	r.starting.Unlock()
	if c != nil {
		c.status = ws
		close(c.done)
	}
}

// Done is closed when the child has exited and been reaped.
func (c *Child) Done() <-chan struct{} { return c.done }

// Status waits until the child has exited and says how.
func (c *Child) Status() unix.WaitStatus {
	<-c.done
	return c.status
}

// Wait waits until the child has exited, or ctx is done.
func (c *Child) Wait(ctx context.Context) (unix.WaitStatus, error) {
	select {
	case <-c.done:
		return c.status, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// pending is how many children are registered and not yet delivered.
func (r *Reaper) pending() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.waiting)
}
