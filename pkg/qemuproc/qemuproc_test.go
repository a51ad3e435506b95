package qemuproc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/reaper"
)

// modes runs fn without a reaper and with one whose loop runs for fn's
// duration. Not in parallel: while the reaper runs, it reaps every child
// of the test binary.
func modes(t *testing.T, fn func(t *testing.T, r *reaper.Reaper)) {
	t.Run("plain", func(t *testing.T) { fn(t, nil) })
	t.Run("reaper", func(t *testing.T) {
		r := &reaper.Reaper{}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { r.Run(ctx); close(done) }()
		defer func() { cancel(); <-done }()
		fn(t, r)
	})
}

func sh(script string) Spec {
	return Spec{Binary: "/bin/sh", Argv: []string{"sh", "-c", script}}
}

func wait(t *testing.T, p *Process) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := p.Wait(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("pid %d did not exit", p.Pid)
	}
	return err
}

func TestExitStatus(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		p, err := Start(sh("exit 7"), r)
		if err != nil {
			t.Fatal(err)
		}
		err = wait(t, p)
		var ee *ExitError
		if !errors.As(err, &ee) || ee.Status.ExitStatus() != 7 || err.Error() != "exit status 7" {
			t.Errorf("Wait = %v, want exit status 7", err)
		}
		if !errors.Is(p.Signal(unix.SIGTERM), ErrGone) {
			t.Error("Signal after exit is not ErrGone")
		}
		p, err = Start(Spec{Binary: "/bin/true", Argv: []string{"true"}}, r)
		if err != nil {
			t.Fatal(err)
		}
		if err := wait(t, p); err != nil {
			t.Errorf("true: %v", err)
		}
	})
}

func TestKill(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		p, err := Start(Spec{Binary: "/bin/sleep", Argv: []string{"sleep", "30"}}, r)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.ExitErr(); !errors.Is(err, ErrRunning) {
			t.Errorf("ExitErr while running = %v", err)
		}
		if err := p.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := wait(t, p); err == nil || !strings.Contains(err.Error(), "killed by signal 9") {
			t.Errorf("Wait after Kill = %v", err)
		}
	})
}

func TestStop(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		p, err := Start(Spec{Binary: "/bin/sleep", Argv: []string{"sleep", "30"}}, r)
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		p.Stop(10 * time.Second)
		if d := time.Since(t0); d > 5*time.Second {
			t.Errorf("Stop of a process that takes SIGTERM took %v", d)
		}
		if err := p.ExitErr(); err == nil || !strings.Contains(err.Error(), "signal 15") {
			t.Errorf("after Stop: %v, want killed by SIGTERM", err)
		}

		// One that ignores SIGTERM is killed after the grace period.
		ready := filepath.Join(t.TempDir(), "ready")
		p, err = Start(sh(`trap "" TERM; touch `+ready+`; sleep 30`), r)
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			if _, err := os.Stat(ready); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the shell never set its trap")
			}
		}
		t0 = time.Now()
		p.Stop(300 * time.Millisecond)
		if d := time.Since(t0); d < 300*time.Millisecond {
			t.Errorf("Stop returned after %v, before the grace period", d)
		}
		if err := p.ExitErr(); err == nil || !strings.Contains(err.Error(), "signal 9") {
			t.Errorf("after Stop of a TERM-ignoring shell: %v, want killed by SIGKILL", err)
		}
	})
}

func TestLogAndExtraFiles(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		log, err := os.Create(filepath.Join(t.TempDir(), "log"))
		if err != nil {
			t.Fatal(err)
		}
		defer log.Close()
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pr.Close()
		spec := sh("echo out; echo err >&2; echo hi >&3; pwd")
		spec.Dir, spec.Log, spec.ExtraFiles = "/", log, []*os.File{pw}
		p, err := Start(spec, r)
		pw.Close() // the child has its copy
		if err != nil {
			t.Fatal(err)
		}
		if err := wait(t, p); err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(pr)
		if string(got) != "hi\n" {
			t.Errorf("fd 3 got %q, want %q", got, "hi\n")
		}
		raw, _ := os.ReadFile(log.Name())
		if string(raw) != "out\nerr\n/\n" {
			t.Errorf("log holds %q", raw)
		}
	})
}

func TestStartErrors(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		if _, err := Start(Spec{Binary: "/nonexistent", Argv: []string{"x"}}, r); err == nil {
			t.Error("started a missing binary")
		}
		if _, err := Start(Spec{Binary: "/bin/true"}, r); err == nil {
			t.Error("started with an empty argv")
		}
	})
}

func TestOpenGone(t *testing.T) {
	p, err := Start(Spec{Binary: "/bin/true", Argv: []string{"true"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	wait(t, p) // exited and reaped: the pid is free
	if h, err := Open(p.Pid); !errors.Is(err, ErrGone) {
		if h != nil {
			h.Close()
		}
		t.Skipf("pid %d reused already (Open = %v)", p.Pid, err)
	}
	if err := KillAndWait(p.Pid, time.Second); err != nil {
		t.Errorf("KillAndWait of a dead pid = %v", err)
	}
}

func TestHandle(t *testing.T) {
	p, err := Start(Spec{Binary: "/bin/sleep", Argv: []string{"sleep", "30"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	h, err := Open(p.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if h.WaitExit(50 * time.Millisecond) {
		t.Fatal("WaitExit: a sleeping process has exited")
	}
	if err := KillAndWait(p.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if !h.WaitExit(10 * time.Second) {
		t.Error("WaitExit after KillAndWait: not exited")
	}
	wait(t, p)
	if err := h.Kill(); !errors.Is(err, ErrGone) {
		t.Errorf("Kill of a reaped process = %v, want ErrGone", err)
	}
}

// fakeQMP serves QMP's greeting and handshake on a unix socket: enough for
// qmp.Dial (qmp_capabilities, then the query-version it syncs on).
// fakeQMP serves QMP at path from this process.
func fakeQMP(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go serveQMP(l)
}

// serveQMP greets every connection and answers every command with an
// empty return carrying its id.
func serveQMP(l net.Listener) {
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			fmt.Fprintln(conn, `{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": ["oob"]}}`)
			dec := json.NewDecoder(conn)
			for {
				var cmd struct {
					Execute string          `json:"execute"`
					ID      json.RawMessage `json:"id"`
				}
				if dec.Decode(&cmd) != nil {
					return
				}
				id := string(cmd.ID)
				if id == "" {
					id = "null"
				}
				fmt.Fprintf(conn, `{"return": {}, "id": %s}`+"\n", id)
			}
		}()
	}
}

// TestMain: with QEMUPROC_FAKE_QMP=PATH this binary is a fake QEMU that,
// a little after it starts (as QEMU does), serves QMP at PATH.
func TestMain(m *testing.M) {
	if path := os.Getenv("QEMUPROC_FAKE_QMP"); path != "" {
		time.Sleep(50 * time.Millisecond)
		l, err := net.Listen("unix", path)
		if err != nil {
			os.Exit(1)
		}
		go serveQMP(l)
		time.Sleep(30 * time.Second)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestDialQMP(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		path := filepath.Join(t.TempDir(), "qmp.sock")
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		p, err := Start(Spec{Binary: exe, Argv: []string{"fake-qemu"}, Env: []string{"QEMUPROC_FAKE_QMP=" + path}}, r)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Stop(time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c, err := DialQMP(ctx, path, p)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	})
}

// TestDialQMPNotItsOwn: a socket at the path served by another process
// than the new QEMU is never taken for its monitor.
func TestDialQMPNotItsOwn(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		p, err := Start(Spec{Binary: "/bin/sleep", Argv: []string{"sleep", "30"}}, r)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Stop(time.Second)
		path := filepath.Join(t.TempDir(), "qmp.sock")
		fakeQMP(t, path) // served by this process, not by p
		// Long enough for a dial to finish under the race detector on a
		// loaded machine: the mismatch is the last error seen.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err = DialQMP(ctx, path, p)
		want := fmt.Sprintf("is served by pid %d, not by QEMU pid %d: not trusted", os.Getpid(), p.Pid)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DialQMP = %v, want %q", err, want)
		}
	})
}

func TestDialQMPExited(t *testing.T) {
	modes(t, func(t *testing.T, r *reaper.Reaper) {
		p, err := Start(sh("echo bad option >&2; exit 1"), r)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err = DialQMP(ctx, filepath.Join(t.TempDir(), "never.sock"), p)
		want := "new QEMU exited before its QMP socket answered: exit status 1"
		if err == nil || err.Error() != want {
			t.Errorf("DialQMP = %v, want %q", err, want)
		}
	})
}

// TestNoCgroupV2: a cgroup under a root that is no cgroup v2 mount is
// ignored, not an error.
func TestNoCgroupV2(t *testing.T) {
	spec := Spec{Binary: "/bin/true", Argv: []string{"true"}, Cgroup: "/machine/vm1", CgroupRoot: t.TempDir()}
	p, err := Start(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := wait(t, p); err != nil || p.CgroupErr != nil {
		t.Errorf("Wait = %v, CgroupErr = %v", err, p.CgroupErr)
	}
	if _, err := os.Stat(filepath.Join(spec.CgroupRoot, "machine")); err == nil {
		t.Error("created a cgroup directory under a root that is no cgroup v2 mount")
	}
}
