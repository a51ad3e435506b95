package pid1

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/kmod"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/phase"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// TestReadManifest: PID 1 reads the manifest the kernel command line names,
// a first boot has none, and one whose state directory is outside the PMEM
// mount stops the boot.
func TestReadManifest(t *testing.T) {
	pmem := t.TempDir()
	write := func(t *testing.T, stateDir string) string {
		dir := filepath.Join(pmem, "liveupdate")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		m := &manifest.Manifest{Schema: manifest.SchemaVersion, ID: "t", StateDir: hostpath.QEMU(stateDir), VMs: []manifest.VM{}}
		path := filepath.Join(dir, manifest.FileName)
		if err := manifest.Write(path, m); err != nil {
			t.Fatal(err)
		}
		return path
	}
	cases := []struct {
		name     string
		stateDir string // "" = no manifest
		wantErr  string
		wantRead bool
	}{
		{name: "first boot: no manifest"},
		{name: "manifest on PMEM", stateDir: filepath.Join(pmem, "liveupdate"), wantRead: true},
		{name: "state dir outside PMEM", stateDir: "/var/lib/liveupdate", wantErr: "outside the PMEM mount"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(pmem, "liveupdate", manifest.FileName)
			if c.stateDir != "" {
				path = write(t, c.stateDir)
			}
			b := &Boot{Log: slog.New(slog.DiscardHandler), Params: bootparams.Params{PMEM: "/dev/pmem0", PMEMMount: pmem, Manifest: path}}
			err := b.readManifest(context.Background())
			switch {
			case c.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Errorf("error %v, want %q", err, c.wantErr)
				}
			case err != nil:
				t.Errorf("error %v", err)
			case (b.Manifest != nil) != c.wantRead:
				t.Errorf("manifest read: %v, want %v", b.Manifest != nil, c.wantRead)
			}
		})
	}
}

// TestReadManifestMorePMEM: a guest's RAM on another PMEM filesystem is
// accepted when PID 1 mounted it from the host's fstab (another NUMA
// node's), and stops the boot otherwise.
func TestReadManifestMorePMEM(t *testing.T) {
	pmem, root := t.TempDir(), t.TempDir()
	const more = "/mnt/pmem1"
	os.MkdirAll(filepath.Join(root, more, "numa"), 0o755)
	os.WriteFile(filepath.Join(root, more, "numa/ram1"), nil, 0o600)
	dir := filepath.Join(pmem, "liveupdate")
	os.MkdirAll(dir, 0o700)
	m := &manifest.Manifest{Schema: manifest.SchemaVersion, ID: "t", StateDir: hostpath.QEMU(dir), VMs: []manifest.VM{{
		Name: "numa", Binary: "/usr/bin/qemu-system-x86_64", PID: 7, Argv: []string{"qemu-system-x86_64"}, RestartArgv: []string{"qemu-system-x86_64", "-incoming", "defer"},
		StateFile: hostpath.QEMU(filepath.Join(dir, "numa.state")), QMP: "/run/numa.qmp", Status: manifest.StatusQuit,
		RAM: []qemuargv.MemoryBackend{{ID: "ram1", MemPath: more + "/numa/ram1", Share: true}}}}}
	path := filepath.Join(dir, manifest.FileName)
	if err := manifest.Write(path, m); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		morePMEM []string
		wantErr  string
	}{
		{"RAM on the fstab's PMEM", []string{more}, ""},
		{"RAM on a filesystem PID 1 did not mount as PMEM", nil, "is outside"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := &Boot{Log: slog.New(slog.DiscardHandler), Root: root, morePMEM: c.morePMEM,
				Params: bootparams.Params{PMEM: "/dev/pmem0", PMEMMount: pmem, Manifest: path}}
			err := b.readManifest(context.Background())
			if c.wantErr == "" && (err != nil || b.Manifest == nil) {
				t.Errorf("error %v, manifest read %v", err, b.Manifest != nil)
			}
			if c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)) {
				t.Errorf("error %v, want %q", err, c.wantErr)
			}
		})
	}
}

// TestBootSteps: a failure before the restore is fatal (the boot goes to
// the rescue shell: phase.Run returns a *phase.Error), a failed restore is
// not (the other guests run), and every step is recorded.
func TestBootSteps(t *testing.T) {
	ok := func(context.Context) error { return nil }
	bad := func(context.Context) error { return errors.New("bad") }
	for _, c := range []struct {
		name      string
		mounts    func(context.Context) error
		restore   func(context.Context) error
		wantFatal bool
		wantErr   bool
		wantSteps int
	}{
		{"all well", ok, ok, false, false, 3},
		{"mounts fail: rescue", bad, ok, true, true, 1},
		{"restore fails: go on", ok, bad, false, true, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := &Boot{Log: slog.New(slog.DiscardHandler), Start: time.Now()}
			err := phase.Run(context.Background(), b.record,
				phase.Step{Name: "mounts", Do: c.mounts},
				phase.Step{Name: "restore", Do: c.restore, Optional: true},
				phase.Step{Name: "services", Do: ok, Optional: true})
			var pe *phase.Error
			if errors.As(err, &pe) != c.wantFatal || (err != nil) != c.wantErr {
				t.Errorf("error %v: fatal %v, want %v", err, errors.As(err, &pe), c.wantFatal)
			}
			if len(b.Phases) != c.wantSteps {
				t.Errorf("%d phases recorded, want %d", len(b.Phases), c.wantSteps)
			}
		})
	}
}

func TestResolveIn(t *testing.T) {
	root := t.TempDir()
	// A usr-merged Debian root, and links that try to leave it.
	for _, d := range []string{"usr/sbin", "usr/lib/systemd", "etc"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.WriteFile(filepath.Join(root, "usr/lib/systemd/systemd"), nil, 0o755)
	for link, target := range map[string]string{
		"sbin": "usr/sbin", "lib": "usr/lib", "usr/sbin/init": "/lib/systemd/systemd",
		"etc/up": "../../../usr/lib/systemd/systemd", "etc/loop": "loop", "etc/dangling": "/nowhere",
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		path, want, err string
	}{
		{path: "/sbin/init", want: "/usr/lib/systemd/systemd"},
		{path: "/usr/sbin/init", want: "/usr/lib/systemd/systemd"},
		{path: "/lib/systemd/systemd", want: "/usr/lib/systemd/systemd"},
		{path: "/etc/up", want: "/usr/lib/systemd/systemd"}, // ".." stops at the root
		{path: "/../sbin/./init", want: "/usr/lib/systemd/systemd"},
		{path: "/etc/loop", err: "too many levels of symbolic links"},
		{path: "/etc/dangling", err: "no such file or directory"},
		{path: "/sbin/nothing", err: "no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			got, err := resolveIn(root, tt.path)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("resolveIn(%s) = %q, %v; want an error with %q", tt.path, got, err, tt.err)
				}
				return
			}
			if err != nil || got != filepath.Join(root, tt.want) {
				t.Fatalf("resolveIn(%s) = %q, %v; want %s", tt.path, got, err, filepath.Join(root, tt.want))
			}
		})
	}
}

// TestRun: commands PID 1 runs to their end go through its reaper, which
// collects every child; their output and exit status are not lost to it.
func TestRun(t *testing.T) {
	b := &Boot{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go b.reaper.Run(ctx)
	tests := []struct {
		script, out, err string
	}{
		{script: "echo formatted", out: "formatted\n"},
		{script: "echo oops >&2; exit 3", out: "oops\n", err: "exit status 3"},
		{script: "kill -9 $$", err: "killed"},
	}
	for _, tt := range tests {
		t.Run(tt.script, func(t *testing.T) {
			// Many at once: a wait outside the reaper would lose some.
			for range 20 {
				out, err := b.run(exec.Command("/bin/sh", "-c", tt.script))
				if string(out) != tt.out || (err == nil) != (tt.err == "") || (err != nil && !strings.Contains(err.Error(), tt.err)) {
					t.Fatalf("run(%q) = %q, %v; want %q, error %q", tt.script, out, err, tt.out, tt.err)
				}
			}
		})
	}
}

// TestReadManifestOnRoot: with no lu.pmem (a host whose guests' RAM is all
// kept by LUO) the manifest and the state files are on the host root:
// read there, each state file resolved beneath the state directory.
func TestReadManifestOnRoot(t *testing.T) {
	const sd = "/var/lib/liveupdate"
	for _, c := range []struct {
		name    string
		escape  bool // the state file a symlink out of the state directory
		wantErr string
	}{
		{name: "state on the root"},
		{name: "a state file leading out of it", escape: true, wantErr: "does not resolve inside"},
	} {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			dir := filepath.Join(root, sd)
			os.MkdirAll(dir, 0o700)
			if c.escape {
				os.Symlink("/etc/shadow", filepath.Join(dir, "vm1.state"))
			} else {
				os.WriteFile(filepath.Join(dir, "vm1.state"), nil, 0o600)
			}
			m := &manifest.Manifest{Schema: manifest.SchemaVersion, ID: "t", StateDir: sd, LUO: &manifest.LUOSession{Name: "liveupdate-1"},
				VMs: []manifest.VM{{Name: "vm1", Binary: "/usr/bin/qemu-system-x86_64", PID: 7, Argv: []string{"qemu-system-x86_64"},
					RestartArgv: []string{"qemu-system-x86_64", "-incoming", "defer"}, StateFile: sd + "/vm1.state", QMP: "/run/vm1.qmp", Status: manifest.StatusSaved}}}
			if err := manifest.Write(filepath.Join(dir, manifest.FileName), m); err != nil {
				t.Fatal(err)
			}
			p, err := bootparams.Parse("lu.root=LABEL=host lu.manifest=" + sd + "/" + manifest.FileName)
			if err != nil {
				t.Fatal(err)
			}
			b := &Boot{Log: slog.New(slog.DiscardHandler), Root: root, Params: p}
			err = b.readManifest(context.Background())
			switch {
			case c.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Errorf("error %v, want %q", err, c.wantErr)
				}
			case err != nil || b.Manifest == nil:
				t.Errorf("error %v, manifest read %v", err, b.Manifest != nil)
			case b.manifestPath != filepath.Join(dir, manifest.FileName):
				t.Errorf("manifest read from %s", b.manifestPath)
			}
		})
	}
}

// TestInMemory: an orderly stop shuts down, rather than saves, a guest
// whose RAM is a memfd (inherited or memory-backend-memfd): power-off
// erases it. RAM in a file is saved.
func TestInMemory(t *testing.T) {
	for _, tt := range []struct {
		name    string
		backend string
		want    bool
	}{
		{"file on PMEM", "memory-backend-file,id=r,size=64M,mem-path=/mnt/pmem/r.ram,share=on", false},
		{"inherited memfd", "memory-backend-file,id=r,size=64M,mem-path=/proc/self/fd/3,share=on", true},
		{"memory-backend-memfd", "memory-backend-memfd,id=r,size=64M,share=on", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := qemuargv.Parse([]string{"qemu-system-x86_64", "-machine", "pc,memory-backend=r", "-object", tt.backend})
			if err != nil {
				t.Fatal(err)
			}
			if got := inMemory(&cpr.Target{Proc: &discover.Process{Cmdline: c}}); got != tt.want {
				t.Errorf("inMemory = %v, want %v", got, tt.want)
			}
		})
	}
}

// resident counts the pages of path in the page cache (mincore).
func resident(t *testing.T, path string) (in, all int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	// x/sys has no Mincore.
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	for _, v := range vec {
		if v&1 != 0 {
			in++
		}
	}
	return in, len(vec)
}

// TestReadAhead: files evicted from the page cache are read back in whole,
// without anyone reading them (a file far bigger than one call's worth);
// what is not a regular file, is missing, or goes past the cap is passed
// over, and the cap counts the files asked for.
func TestReadAhead(t *testing.T) {
	dir := t.TempDir()
	big, small := filepath.Join(dir, "big"), filepath.Join(dir, "small")
	for p, n := range map[string]int{big: 24 << 20, small: 1 << 20} {
		if err := os.WriteFile(p, bytes.Repeat([]byte{1}, n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	evict := func(p string) {
		f, _ := os.Open(p)
		defer f.Close()
		f.Sync()
		unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	}
	evict(big)
	evict(small)
	if in, _ := resident(t, big); in > 0 {
		t.Skipf("%s: the page cache keeps %d pages after POSIX_FADV_DONTNEED (tmpfs?): nothing to measure here", dir, in)
	}
	files, size := readAhead([]string{fifo, filepath.Join(dir, "missing"), big, small, big + "/x"}, 25<<20-1)
	if files != 1 || size != 24<<20 {
		t.Fatalf("readAhead asked for %d files, %d bytes; want the big file alone (the small one is past the cap)", files, size)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		in, all := resident(t, big)
		if in == all {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pages of the big file in the page cache 10 s after readAhead", in, all)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if in, _ := resident(t, small); in > 0 {
		t.Fatalf("the small file, past the cap, has %d pages in the page cache", in)
	}
}

// TestAwaitUplinks: the uplinks phase gives what attaching the bridges'
// ports gave, nothing when none were being attached, and a deadline error
// (never a hang) when the attaching does not end.
func TestAwaitUplinks(t *testing.T) {
	closed := func(err error) *Boot {
		b := &Boot{uplinks: make(chan struct{}), uplinkErr: err}
		close(b.uplinks)
		return b
	}
	for _, c := range []struct {
		name string
		boot *Boot
		want string // "" no error
	}{
		{"none attached", &Boot{}, ""},
		{"attached", closed(nil), ""},
		{"a port failed", closed(errors.New("bridge br0: adding port eth0: no such device")), "adding port eth0"},
		{"never ends", &Boot{uplinks: make(chan struct{})}, "deadline exceeded"},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.boot.Params.DevWait = 50 * time.Millisecond
			err := c.boot.awaitUplinks(context.Background())
			if (err == nil) != (c.want == "") || err != nil && !strings.Contains(err.Error(), c.want) {
				t.Errorf("awaitUplinks = %v, want %q", err, c.want)
			}
		})
	}
}

func TestCheckModulePhases(t *testing.T) {
	for _, tc := range []struct {
		list string
		ok   bool
	}{
		{"ext4\n\n@network\ntun\n", true},
		// A host's own list (liveupdate host-modules): KVM's before the
		// restore, the NICs' for the uplinks.
		{"ext4\n\n@restore\nkvm_intel\n\n@uplinks\ne1000e\n", true},
		{"ext4\n\n@devices\nnvme\n", false},
		{"@restore\nkvm\n\n@services\nfoo\n", false},
	} {
		groups, err := kmod.ParseList(tc.list)
		if err != nil {
			t.Fatalf("%q: %v", tc.list, err)
		}
		err = checkModulePhases(groups)
		if (err == nil) != tc.ok {
			t.Errorf("%q: %v, want ok %v", tc.list, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "@uplinks") {
			t.Errorf("%q: the error does not say which phases there are: %v", tc.list, err)
		}
	}
}
