package qmp

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dqmp "github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"
)

// TestMain: with QMP_TEST_RELISTEN=1 this binary is a process that was
// given a listening socket as fd 3 (as libvirt gives QEMU its monitor) and
// calls listen() on it, as QEMU does, then waits.
func TestMain(m *testing.M) {
	if os.Getenv("QMP_TEST_RELISTEN") == "1" {
		if err := unix.Listen(3, 8); err != nil {
			os.Stdout.WriteString("listen: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("ready\n")
		time.Sleep(30 * time.Second)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// DialPeer accepts the monitor of the process it is told of, and refuses,
// before sending anything, one served by any other.
func TestDialPeer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pid     int
		wantErr string
	}{
		{"served by the QEMU", os.Getpid(), ""},
		{"served by another process", 1, "is served by pid " + strconv.Itoa(os.Getpid()) + ", not by QEMU pid 1: not trusted"},
		{"no pid", 0, "no QEMU pid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeMonitor(t, []string{`{"return": {}}`}, "")
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			c, err := DialPeer(ctx, path, tc.pid)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("DialPeer = %v, want %q", err, tc.wantErr)
			}
			var pe *PeerError
			if tc.pid > 0 && (!errors.As(err, &pe) || pe.Peer != os.Getpid() || pe.Path != path) {
				t.Errorf("err %v is not the *PeerError", err)
			}
		})
	}
}

// TestPeerPIDReadsTheConnection: peerPID reaches go-qemu's connection, and
// the kernel credits a listening socket to the process that last called
// listen() on it — so a monitor passed by fd to QEMU, which listens on it
// again, is served by QEMU, not by whoever made it.
func TestPeerPIDReadsTheConnection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	peerOf := func() int {
		t.Helper()
		mon, err := dqmp.NewSocketMonitor("unix", path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer mon.Disconnect()
		pid, err := peerPID(mon)
		if err != nil {
			t.Fatal(err)
		}
		return pid
	}
	if got := peerOf(); got != os.Getpid() {
		t.Fatalf("peer = %d, want this process %d", got, os.Getpid())
	}
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "QMP_TEST_RELISTEN=1")
	cmd.ExtraFiles = []*os.File{f}
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		t.Fatalf("child: %q", line)
	}
	if got := peerOf(); got != cmd.Process.Pid {
		t.Errorf("peer after the child's listen() = %d, want the child %d", got, cmd.Process.Pid)
	}
}

// DialPeerCheck's accept gives a mismatched peer a second chance.
func TestDialPeerCheck(t *testing.T) {
	for _, tc := range []struct {
		name   string
		accept func(int) bool
		ok     bool
	}{
		{"refused", func(int) bool { return false }, false},
		{"accepted", func(peer int) bool { return peer == os.Getpid() }, true},
		{"nil", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeMonitor(t, []string{`{"return": {}}`}, "")
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			c, err := DialPeerCheck(ctx, path, 1, tc.accept)
			if (err == nil) != tc.ok {
				t.Fatalf("DialPeerCheck = %v, want ok %v", err, tc.ok)
			}
			if c != nil {
				c.Close()
			}
		})
	}
}
