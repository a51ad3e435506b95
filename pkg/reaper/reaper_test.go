package reaper

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// run starts the reaper's loop for the test and stops it at its end.
func run(t *testing.T) *Reaper {
	t.Helper()
	r := &Reaper{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

// TestEveryStatusArrives: many children that exit at once, started from
// many goroutines while the loop reaps, each get their own exit status.
func TestEveryStatusArrives(t *testing.T) {
	r := run(t)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd, want := exec.Command("/bin/true"), 0
			if i%2 == 1 {
				cmd, want = exec.Command("/bin/sh", "-c", "exit 7"), 7
			}
			c, err := r.Start(cmd)
			if err != nil {
				errs <- err.Error()
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			ws, err := c.Wait(ctx)
			switch {
			case err != nil:
				errs <- fmt.Sprintf("pid %d: status never arrived: %v", c.Pid, err)
			case !ws.Exited() || ws.ExitStatus() != want:
				errs <- fmt.Sprintf("pid %d: status %#x, want exit %d", c.Pid, int(ws), want)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if p := r.pending(); p != 0 {
		t.Errorf("%d registrations left after every child was delivered", p)
	}
}

// TestRegisteredAfterStartIsLost is the old design's race, made certain: a
// pid registered only after its start returned (as PID 1's OnStart → manage
// did) has its status reaped by the loop and dropped if the child was quick
// to exit, and its waiter never hears of it. Start registers under the lock
// it holds across the fork, which is why TestEveryStatusArrives passes.
func TestRegisteredAfterStartIsLost(t *testing.T) {
	r := run(t)
	cmd := exec.Command("/bin/true")
	if err := cmd.Start(); err != nil { // not through the reaper
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for r.droppedCount() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the loop never reaped the child")
		}
		time.Sleep(time.Millisecond)
	}
	r.starting.RLock()
	c := r.register(cmd.Process.Pid) // too late
	r.starting.RUnlock()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := c.Wait(ctx); err == nil {
		t.Fatal("a status registered after the child was reaped arrived")
	}
}

func TestOrphanStatusDropped(t *testing.T) {
	r := run(t)
	cmd := exec.Command("/bin/sh", "-c", "exit 3")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for r.droppedCount() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("an unregistered child was not reaped")
		}
		time.Sleep(time.Millisecond)
	}
	if p := r.pending(); p != 0 {
		t.Errorf("pending = %d", p)
	}
}

func TestStartBeforeRun(t *testing.T) {
	r := &Reaper{}
	c, err := r.Start(exec.Command("/bin/sh", "-c", "exit 5"))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // exited, SIGCHLD not caught by anyone
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	ws, err := c.Wait(wctx)
	if err != nil || ws.ExitStatus() != 5 {
		t.Fatalf("Wait = %v, %v; want exit 5", ws, err)
	}
}

func TestRefusesCopyingStdio(t *testing.T) {
	r := &Reaper{}
	cmd := exec.Command("/bin/true")
	cmd.Stdout = &bytes.Buffer{}
	if _, err := r.Start(cmd); err == nil || !strings.Contains(err.Error(), "Stdout") {
		t.Errorf("Start with a bytes.Buffer stdout = %v, want a refusal naming Stdout", err)
	}
	if cmd.Process != nil {
		t.Error("the refused command was started")
	}
	cmd = exec.CommandContext(context.Background(), "/bin/true")
	if _, err := r.Start(cmd); err == nil {
		t.Error("Start accepted an exec.CommandContext command")
	}
}

func TestStartError(t *testing.T) {
	r := &Reaper{}
	if _, err := r.Start(exec.Command("/nonexistent/binary")); err == nil {
		t.Fatal("started a missing binary")
	}
	if p := r.pending(); p != 0 {
		t.Errorf("pending = %d after a failed start", p)
	}
}

func (r *Reaper) droppedCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dropped
}
