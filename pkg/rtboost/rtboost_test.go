package rtboost

import (
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// needNice skips where threads cannot be made real-time (no CAP_SYS_NICE):
// `make test` runs as root.
func needNice(t *testing.T) {
	t.Helper()
	a := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 1}
	c := exec.Command("sleep", "10")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { c.Process.Kill(); c.Wait() }()
	if err := unix.SchedSetAttr(c.Process.Pid, &a, 0); err != nil {
		t.Skipf("cannot set SCHED_FIFO here (%v): needs CAP_SYS_NICE", err)
	}
}

func child(t *testing.T) int {
	t.Helper()
	c := exec.Command("sleep", "60")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c.Process.Pid
}

func attr(t *testing.T, tid int) *unix.SchedAttr {
	t.Helper()
	a, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		t.Fatalf("sched_getattr %d: %v", tid, err)
	}
	return a
}

func TestRaiseAndRestore(t *testing.T) {
	needNice(t)
	for _, tc := range []struct {
		name   string
		before unix.SchedAttr // the child's scheduling before the raise
		skip   bool
		after  uint32 // its policy while raised
	}{
		{name: "normal", before: unix.SchedAttr{Policy: unix.SCHED_NORMAL}, after: unix.SCHED_FIFO},
		{name: "niced", before: unix.SchedAttr{Policy: unix.SCHED_NORMAL, Nice: 7}, after: unix.SCHED_FIFO},
		{name: "batch", before: unix.SchedAttr{Policy: unix.SCHED_BATCH, Nice: -3}, after: unix.SCHED_FIFO},
		{name: "skipped", before: unix.SchedAttr{Policy: unix.SCHED_NORMAL, Nice: 2}, skip: true, after: unix.SCHED_NORMAL},
		// Real-time by its owner (libvirt's <vcpusched>): left as it is.
		{name: "rr 5", before: unix.SchedAttr{Policy: unix.SCHED_RR, Priority: 5}, after: unix.SCHED_RR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pid := child(t)
			b := tc.before
			b.Size = unix.SizeofSchedAttr
			if err := unix.SchedSetAttr(pid, &b, 0); err != nil {
				t.Fatal(err)
			}
			var skip map[int]bool
			if tc.skip {
				skip = map[int]bool{pid: true}
			}
			r, err := Threads("", pid, skip, true)
			if err != nil {
				t.Fatal(err)
			}
			if a := attr(t, pid); a.Policy != tc.after {
				t.Fatalf("raised: policy %d, want %d", a.Policy, tc.after)
			}
			if want := map[bool]int{true: 1, false: 0}[tc.after == unix.SCHED_FIFO]; r.Count() != want {
				t.Errorf("Count = %d, want %d", r.Count(), want)
			}
			for range 2 { // Restore twice: the second does nothing
				if err := r.Restore(); err != nil {
					t.Fatal(err)
				}
				a := attr(t, pid)
				if a.Policy != tc.before.Policy || a.Nice != tc.before.Nice || a.Priority != tc.before.Priority {
					t.Fatalf("restored: policy %d nice %d prio %d, want policy %d nice %d prio %d",
						a.Policy, a.Nice, a.Priority, tc.before.Policy, tc.before.Nice, tc.before.Priority)
				}
			}
		})
	}
}

// The threads in skip (a QEMU's vCPUs) are not raised, the others are.
func TestSkip(t *testing.T) {
	needNice(t)
	// The test binary, a Go program, has several threads.
	pid := os.Getpid()
	tids := mustTids(t)
	if len(tids) < 2 {
		t.Skip("the test process has one thread")
	}
	skip := map[int]bool{pid: true}
	r, err := Threads("", pid, skip, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Restore()
	for _, tid := range tids {
		want := uint32(unix.SCHED_FIFO)
		if skip[tid] {
			want = unix.SCHED_NORMAL
		}
		if a := attr(t, tid); a.Policy != want {
			t.Errorf("thread %d: policy %d, want %d", tid, a.Policy, want)
		}
	}
	if r.Count() < len(tids)-1 {
		t.Errorf("Count = %d, want at least %d", r.Count(), len(tids)-1)
	}
}

// Threads started while a process is raised: with inherit they are raised
// too and Restore lowers them; without, they start normal.
func TestThreadsStartedWhileRaised(t *testing.T) {
	needNice(t)
	for _, inherit := range []bool{true, false} {
		t.Run(strconv.FormatBool(inherit), func(t *testing.T) {
			r, err := threads("", os.Getpid(), func(int) bool { return true }, inherit)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Restore()
			before := map[int]bool{}
			for _, tid := range mustTids(t) {
				before[tid] = true
			}
			// Goroutines that hold their OS thread while blocked make the
			// runtime start new ones.
			release := make(chan struct{})
			var started, done sync.WaitGroup
			for range 4 {
				started.Add(1)
				done.Add(1)
				go func() {
					defer done.Done()
					runtime.LockOSThread()
					started.Done()
					<-release
				}()
			}
			started.Wait()
			var fresh []int
			for _, tid := range mustTids(t) {
				if !before[tid] {
					fresh = append(fresh, tid)
				}
			}
			if len(fresh) == 0 {
				close(release)
				done.Wait()
				t.Skip("the runtime started no new thread")
			}
			want := uint32(unix.SCHED_NORMAL)
			if inherit {
				want = unix.SCHED_FIFO
			}
			for _, tid := range fresh {
				if a := attr(t, tid); a.Policy != want {
					t.Errorf("thread %d started while raised: policy %d, want %d", tid, a.Policy, want)
				}
			}
			if err := r.Restore(); err != nil {
				t.Fatal(err)
			}
			for _, tid := range mustTids(t) {
				if a := attr(t, tid); a.Policy != unix.SCHED_NORMAL {
					t.Errorf("thread %d after Restore: policy %d", tid, a.Policy)
				}
			}
			close(release)
			done.Wait()
		})
	}
}

func mustTids(t *testing.T) []int {
	t.Helper()
	r := &Raised{proc: "/proc/self/task"}
	tids, err := r.tids()
	if err != nil {
		t.Fatal(err)
	}
	return tids
}

func TestGoneProcess(t *testing.T) {
	if _, err := Threads("", 1<<30, nil, true); err == nil {
		t.Fatal("raising a process that does not exist: no error")
	}
	var r *Raised
	if err := r.Restore(); err != nil {
		t.Fatal(err)
	}
}
