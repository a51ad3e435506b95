package cpr

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// TestNewQEMUDiedFirst: a restore whose new QEMU was killed under it —
// its monitor gone — says so, with how it ended, instead of only the QMP
// error it saw; a living QEMU's error stays what it was.
func TestNewQEMUDiedFirst(t *testing.T) {
	start := func(t *testing.T) *newQEMU {
		p, err := qemuproc.Start(qemuproc.Spec{Binary: "/bin/sleep", Argv: []string{"sleep", "30"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		q := &newQEMU{p: p}
		t.Cleanup(q.stop)
		return q
	}
	notDelivered := fmt.Errorf("cont on qmp.sock: %w", qmp.ErrNotDelivered)
	closed := fmt.Errorf("waiting for loading vm1: %w", qmp.ErrDisconnected)
	for _, tc := range []struct {
		name       string
		kill       bool
		reaped     bool // its end seen before diedFirst (else: given a moment)
		err        error
		wantDied   bool
		wantKilled bool
	}{
		{"killed, the cont never delivered", true, false, notDelivered, true, true},
		{"killed, its monitor closed", true, false, closed, true, true},
		{"killed and gone, a load error seen", true, true, errors.New("loading vm1 failed"), true, true},
		{"killed, its start seen failing", true, true, nil, true, true}, // err: DialQMP's, saying how
		{"alive: a QEMU error", false, false, errors.New("loading vm1 failed: Unknown savevm section"), false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := start(t)
			if tc.kill {
				q.p.Kill()
			}
			if tc.reaped {
				<-q.p.Exited()
			}
			if tc.err == nil {
				tc.err = fmt.Errorf("new QEMU exited before its QMP socket answered: %w", q.p.ExitErr())
			}
			err := q.diedFirst(tc.err)
			var died *diedError
			if errors.As(err, &died) != tc.wantDied {
				t.Fatalf("diedFirst(%v) = %v: died %v, want %v", tc.err, err, !tc.wantDied, tc.wantDied)
			}
			if !errors.Is(err, tc.err) {
				t.Errorf("diedFirst(%v) = %v: the error seen is lost", tc.err, err)
			}
			if tc.wantDied && died.killed() != tc.wantKilled {
				t.Errorf("%v: killed() = %v, want %v", err, died.killed(), tc.wantKilled)
			}
			if tc.wantDied && strings.Count(err.Error(), "killed by signal") != 1 {
				t.Errorf("%q: want how it ended said once", err)
			}
		})
	}
}

// TestStartAnother: which failed restores are tried once more with another
// new QEMU — only a QEMU killed before it ran the guest, of a guest with no
// old QEMU to go on on, whose state file was never marked consumed.
func TestStartAnother(t *testing.T) {
	killed := &diedError{pid: 7, exit: &qemuproc.ExitError{Status: unix.WaitStatus(unix.SIGKILL)}, err: qmp.ErrNotDelivered}
	exited := &diedError{pid: 7, exit: &qemuproc.ExitError{Status: unix.WaitStatus(1 << 8)}, err: errors.New("load failed")}
	cases := []struct {
		name  string
		state string // the state file's suffix on disk; "-" for none
		early bool
		err   error
		want  bool
	}{
		{"killed, sequential", "", false, fmt.Errorf("vm1: %w", killed), true},
		{"killed, started early: its old QEMU goes on instead", "", true, killed, false},
		{"exited by itself (it said why in its log)", "", false, exited, false},
		{"killed, but the state was consumed: it may have run the guest", doneSuffix, false, killed, false},
		{"killed, no state file", "-", false, killed, false},
		{"a QEMU error, QEMU alive", "", false, errors.New("loading vm1 failed"), false},
		{"no error", "", false, nil, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			r := (&Engine{StateDir: hostpath.QEMU(dir)}).newRun()
			vm := &manifest.VM{Name: "vm1", StateFile: hostpath.QEMU(filepath.Join(dir, "vm1.state"))}
			if c.state != "-" {
				if err := os.WriteFile(string(vm.StateFile)+c.state, []byte("state"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if got := r.startAnother(vm, c.early, c.err); got != c.want {
				t.Errorf("startAnother(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}

// TestConsumeMark: the consumed mark, as a tmpfs marker (MarkDir) or as
// the rename: seen at once by a later run; taken back (the cont never
// reached the new QEMU) it leaves the state file as it was before its
// load — not consumed, there to be loaded again or set aside; settled
// (after cont) it is the .done rename, durable, and no marker is left; a
// marker never matches another file on the same inode.
func TestConsumeMark(t *testing.T) {
	for _, withMarker := range []bool{true, false} {
		t.Run(fmt.Sprintf("marker=%v", withMarker), func(t *testing.T) {
			dir := t.TempDir()
			marks := ""
			if withMarker {
				marks = filepath.Join(t.TempDir(), "consumed")
			}
			r := (&Engine{StateDir: hostpath.QEMU(dir), MarkDir: marks, Log: slog.Default()}).newRun()
			later := (&Engine{StateDir: hostpath.QEMU(dir), MarkDir: marks, Log: slog.Default()}).newRun() // another run, e.g. recover
			vm := &manifest.VM{Name: "vm1", StateFile: hostpath.QEMU(filepath.Join(dir, "vm1.state"))}
			sf := string(vm.StateFile)
			if err := os.WriteFile(sf, []byte("state"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := r.consume(vm); err != nil || !later.consumed(vm) {
				t.Fatalf("consume: %v, consumed %v", err, later.consumed(vm))
			}
			if withMarker != fileExists(sf) {
				t.Errorf("after consume: state file there %v, want %v (a marker leaves it in place)", fileExists(sf), withMarker)
			}
			if err := r.unconsume(vm); err != nil {
				t.Fatal(err)
			}
			if later.consumed(vm) || !fileExists(sf) {
				t.Errorf("after unconsume: consumed %v, state file there %v", later.consumed(vm), fileExists(sf))
			}
			if err := r.unconsume(vm); err == nil {
				t.Errorf("unconsume without a mark succeeded")
			}
			if err := r.consume(vm); err != nil {
				t.Fatal(err)
			}
			r.settleConsumed(vm)
			if !later.consumed(vm) || fileExists(sf) || !fileExists(sf+doneSuffix) {
				t.Errorf("after settle: consumed %v, state file there %v, .done there %v", later.consumed(vm), fileExists(sf), fileExists(sf+doneSuffix))
			}
			if withMarker {
				if left, _ := os.ReadDir(marks); len(left) != 0 {
					t.Errorf("markers left after settle: %v", left)
				}
				// A new state file of the same name (a later save) is
				// not consumed, whatever inode it gets.
				if err := os.WriteFile(sf, []byte("new state"), 0o600); err != nil {
					t.Fatal(err)
				}
				if later.consumed(vm) {
					t.Errorf("a new state file is consumed")
				}
			}
		})
	}
}

// After a kexec /run is an empty tmpfs: the directories of the sockets a
// guest's QEMU binds (libvirt's agent channel by fd, a -chardev path, a
// -qmp path) are made again under the root QEMU runs in, and the socket
// passed by fd is bound there.
func TestSocketDirsAfterKexec(t *testing.T) {
	root := t.TempDir()
	r := (&Engine{Root: hostpath.Root(root), Log: slog.New(slog.DiscardHandler)}).newRun()
	vm := &manifest.VM{Name: "g", Cwd: "/"}
	r.makeSocketDirs(vm, []string{"qemu-system-x86_64",
		"-chardev", "socket,id=c0,path=/run/libvirt/qemu/channel/1-g/agent.0,server=on,wait=off",
		"-qmp", "unix:/run/lu/g.qmp,server=on,wait=off",
		"-chardev", "socket,id=c1,path=/run/client/only.sock"}) // a client: QEMU connects, makes nothing
	for _, d := range []string{"run/libvirt/qemu/channel/1-g", "run/lu"} {
		if fi, err := os.Stat(filepath.Join(root, d)); err != nil || !fi.IsDir() {
			t.Errorf("%s not made: %v", d, err)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "run/client")); err == nil {
		t.Errorf("the directory of a client socket was made")
	}
	f, err := listenUnix(hostpath.Root(root), "/run/libvirt/qemu/channel/2-h/org.qemu.guest_agent.0")
	if err != nil {
		t.Fatalf("listenUnix in a directory that is gone: %v", err)
	}
	f.Close()
}

// TestSocketNamedAsQEMUSeesIt: a socket made for a QEMU chrooted in a host
// root (PID 1's /newroot) is bound under QEMU's own name for it — what
// /proc/net/unix shows, and discovery reads, after the handover — and is
// there in the root's filesystem; with no root it is bound at its path.
func TestSocketNamedAsQEMUSeesIt(t *testing.T) {
	for _, root := range []string{t.TempDir(), ""} {
		want := "/run/lu-test-" + strconv.Itoa(os.Getpid()) + "/mon.sock"
		if root == "" {
			want = filepath.Join(t.TempDir(), "mon.sock")
		}
		f, err := listenUnix(hostpath.Root(root), hostpath.QEMU(want))
		if err != nil {
			t.Fatal(err)
		}
		sa, err := unix.Getsockname(int(f.Fd()))
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if name := sa.(*unix.SockaddrUnix).Name; name != want {
			t.Errorf("root %q: the socket is named %q, want %q", root, name, want)
		}
		if fi, err := os.Stat(filepath.Join(root, want)); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("root %q: no socket at %s: %v", root, filepath.Join(root, want), err)
		}
	}
}
