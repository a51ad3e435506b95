package rtboost

import (
	"bufio"
	"fmt"
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
			defer r.Restore()
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

// Threads raises all but the threads in skip (a QEMU's vCPUs); Only raises
// just the threads named (a new QEMU's vCPUs before its cont). Restore
// gives each back what it had, and leaves the others alone.
func TestSkipAndOnly(t *testing.T) {
	needNice(t)
	// The test binary, a Go program, has several threads.
	pid := os.Getpid()
	tids := mustTids(t)
	if len(tids) < 2 {
		t.Skip("the test process has one thread")
	}
	for _, tc := range []struct {
		name   string
		raise  func() (*Raised, error)
		raised func(tid int) bool
	}{
		{"Threads, skip the main thread", func() (*Raised, error) { return Threads("", pid, map[int]bool{pid: true}, false) },
			func(tid int) bool { return tid != pid }},
		{"Only the main thread", func() (*Raised, error) { return Only("", pid, map[int]bool{pid: true}) },
			func(tid int) bool { return tid == pid }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := tc.raise()
			defer r.Restore()
			if err != nil {
				t.Fatal(err)
			}
			want := 0
			for _, tid := range tids {
				policy := uint32(unix.SCHED_NORMAL)
				if tc.raised(tid) {
					policy = unix.SCHED_FIFO
					want++
				}
				if a := attr(t, tid); a.Policy != policy {
					t.Errorf("thread %d: policy %d, want %d", tid, a.Policy, policy)
				}
			}
			if r.Count() < want {
				t.Errorf("Count = %d, want at least %d", r.Count(), want)
			}
			if err := r.Restore(); err != nil {
				t.Fatal(err)
			}
			for _, tid := range tids {
				if a := attr(t, tid); a.Policy != unix.SCHED_NORMAL {
					t.Errorf("thread %d after Restore: policy %d", tid, a.Policy)
				}
			}
		})
	}
}

// Threads started while a process is raised: with inherit they are raised
// too and Restore lowers them; without, they start normal. The process is
// this test binary run again as a helper (TestMain): it starts its threads
// when told to.
func TestThreadsStartedWhileRaised(t *testing.T) {
	needNice(t)
	for _, inherit := range []bool{true, false} {
		t.Run(strconv.FormatBool(inherit), func(t *testing.T) {
			c := exec.Command(os.Args[0], "-test.run=^$")
			c.Env = append(os.Environ(), "RTBOOST_HELPER=1")
			in, _ := c.StdinPipe()
			out, _ := c.StdoutPipe()
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { c.Process.Kill(); c.Wait() }()
			rd := bufio.NewReader(out)
			if l, err := rd.ReadString('\n'); err != nil || l != "ready\n" {
				t.Fatalf("helper: %q %v", l, err)
			}
			pid := c.Process.Pid
			r, err := Threads("", pid, nil, inherit)
			defer r.Restore()
			if err != nil {
				t.Fatal(err)
			}
			before := map[int]bool{}
			for _, tid := range tidsOf(t, pid) {
				before[tid] = true
			}
			fmt.Fprintln(in, "go")
			if l, err := rd.ReadString('\n'); err != nil || l != "started\n" {
				t.Fatalf("helper: %q %v", l, err)
			}
			var fresh []int
			for _, tid := range tidsOf(t, pid) {
				if !before[tid] {
					fresh = append(fresh, tid)
				}
			}
			if len(fresh) == 0 {
				t.Fatal("the helper started no thread")
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
			for _, tid := range tidsOf(t, pid) {
				if a := attr(t, tid); a.Policy != unix.SCHED_NORMAL {
					t.Errorf("thread %d after Restore: policy %d", tid, a.Policy)
				}
			}
		})
	}
}

// TestMain runs the helper of TestThreadsStartedWhileRaised when asked to:
// on "go" it starts threads (goroutines holding their OS thread while
// blocked make the runtime start new ones) and says so.
func TestMain(m *testing.M) {
	if os.Getenv("RTBOOST_HELPER") != "1" {
		os.Exit(m.Run())
	}
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	var started sync.WaitGroup
	for range 4 {
		started.Add(1)
		go func() {
			runtime.LockOSThread()
			started.Done()
			select {}
		}()
	}
	started.Wait()
	fmt.Println("started")
	select {}
}

func tidsOf(t *testing.T, pid int) []int {
	t.Helper()
	r := &Raised{proc: "/proc/" + strconv.Itoa(pid) + "/task"}
	tids, err := r.tids()
	if err != nil {
		t.Fatal(err)
	}
	return tids
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
