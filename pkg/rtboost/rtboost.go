// Package rtboost runs the threads a guest's blackout waits on at real-time
// priority (SCHED_FIFO, priority 1) for the milliseconds of a save or a
// load, and then gives every thread back the scheduling it had.
//
// Why: a save or a load needs a few milliseconds of CPU, but on a host whose
// CPUs are busy — other guests' vCPUs — a thread that wakes up waits in the
// run queue behind them, again at each of its dozens of wake-ups. Measured
// on a 2-CPU host with 16 guests (docs/benchmarks.md, P2e): the new QEMU's
// main thread ran 6–9 ms of a 60–110 ms load and waited for a CPU the rest.
// A real-time thread is picked before every normal one, and the cgroups'
// CPU weights (libvirt's machine.slice) do not hold it back either.
//
// A running guest's vCPU threads are never raised (Threads' callers pass
// them as skip): a busy guest at real-time priority would keep its CPU
// from everything else, its own QEMU's main loop included. Only raises
// them while their guest does not run, and the caller lowers them before
// it does. Its other threads are: the main
// loop (the load is one of its coroutines, cont and QMP commands run
// there), the monitor's I/O thread (every QMP command and reply goes
// through it), the migration thread that does a save, and the iothreads
// and workers that drain a disk's requests at the STOP. The priority is
// the lowest real-time one, so the host's own real-time work still comes
// first, and the kernel keeps 5 % of each second for normal threads
// whatever runs at real-time priority (sched_rt_runtime_us): a raised
// thread that spins cannot hang the host.
package rtboost

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Raised is one process's threads, raised, with what each had before.
type Raised struct {
	pid  int
	proc string                 // /proc/PID/task
	was  map[int]unix.SchedAttr // each raised thread's scheduling before
	seen map[int]bool           // every thread there when raised
}

// Threads raises every thread of process pid (seen under procRoot, "/proc"
// by default) but those in skip. With inherit, threads the process starts
// while raised are raised too (an old QEMU's migration thread, started by
// its main loop at `migrate`, does the save); without, they start with
// normal scheduling.
func Threads(procRoot string, pid int, skip map[int]bool, inherit bool) (*Raised, error) {
	return threads(procRoot, pid, func(tid int) bool { return !skip[tid] }, inherit)
}

// Only raises the threads in only of process pid, never inherited. For a
// QEMU's vCPU threads while its guest does not run (an old QEMU's after its
// STOP, a new one's before its cont), and nothing else: they have no guest
// code to spin on there, only the work the save or the load hands them and
// waits for.
func Only(procRoot string, pid int, only map[int]bool) (*Raised, error) {
	return threads(procRoot, pid, func(tid int) bool { return only[tid] }, false)
}

// Self raises every thread of the calling process, never inherited: the
// QEMUs and threads it starts get normal scheduling.
func Self() (*Raised, error) {
	return threads("/proc", os.Getpid(), func(int) bool { return true }, false)
}

// threads raises the threads of process pid that pick chooses. A thread
// that cannot be raised is an error; the ones raised stay raised until
// Restore.
func threads(procRoot string, pid int, pick func(tid int) bool, inherit bool) (*Raised, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	r := &Raised{pid: pid, proc: filepath.Join(procRoot, strconv.Itoa(pid), "task"), was: map[int]unix.SchedAttr{}, seen: map[int]bool{}}
	tids, err := r.tids()
	if err != nil {
		return r, err
	}
	raise := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 1}
	if !inherit {
		raise.Flags = unix.SCHED_FLAG_RESET_ON_FORK
	}
	var errs []error
	for _, tid := range tids {
		r.seen[tid] = true
		if !pick(tid) {
			continue
		}
		a, err := unix.SchedGetAttr(tid, 0)
		if errors.Is(err, unix.ESRCH) {
			continue // ended meanwhile
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("thread %d: reading its scheduling: %w", tid, err))
			continue
		}
		if a.Policy == unix.SCHED_FIFO || a.Policy == unix.SCHED_RR || a.Policy == unix.SCHED_DEADLINE {
			continue // already real-time, set by its owner: leave it so
		}
		if err := unix.SchedSetAttr(tid, &raise, 0); err != nil {
			if !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("thread %d: %w", tid, err))
			}
			continue
		}
		r.was[tid] = *a
	}
	return r, errors.Join(errs...)
}

// Restore gives each raised thread back its scheduling. A thread started
// while raised, which inherited the raise, gets what the main thread had.
// Threads gone meanwhile are no error. Restore may be called more than
// once.
func (r *Raised) Restore() error {
	if r == nil || len(r.was) == 0 {
		return nil
	}
	base, ok := r.was[r.pid]
	if !ok {
		cur, err := unix.SchedGetAttr(r.pid, 0)
		if err != nil {
			return nil // the process is gone
		}
		base = *cur
	}
	var errs []error
	set := func(tid int, a unix.SchedAttr) {
		a.Size = unix.SizeofSchedAttr
		if err := unix.SchedSetAttr(tid, &a, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("thread %d: %w", tid, err))
		}
	}
	// A raised thread may start another (which inherits the raise) until
	// it is lowered: passes until one has nothing left to lower.
	for pass := 0; pass < 8; pass++ {
		tids, err := r.tids()
		if err != nil {
			break // the process is gone
		}
		lowered := 0
		for _, tid := range tids {
			if a, ok := r.was[tid]; ok {
				set(tid, a)
				delete(r.was, tid)
				lowered++
				continue
			}
			if r.seen[tid] {
				continue // not picked, real-time by its owner, or done
			}
			r.seen[tid] = true
			// Started since: lowered if it inherited the raise.
			if cur, err := unix.SchedGetAttr(tid, 0); err == nil && cur.Policy == unix.SCHED_FIFO && cur.Priority == 1 {
				set(tid, base)
				lowered++
			}
		}
		if lowered == 0 {
			break
		}
	}
	r.was = nil
	return errors.Join(errs...)
}

// Count is how many threads are raised.
func (r *Raised) Count() int {
	if r == nil {
		return 0
	}
	return len(r.was)
}

func (r *Raised) tids() ([]int, error) {
	ents, err := os.ReadDir(r.proc)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, tid)
		}
	}
	return out, nil
}
