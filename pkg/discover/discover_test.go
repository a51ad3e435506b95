package discover

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParsers(t *testing.T) {
	if got := ParseCgroup("0::/machine.slice/vm1.scope\n"); got != "/machine.slice/vm1.scope" {
		t.Errorf("ParseCgroup = %q", got)
	}
	if got := ParseCgroup("12:cpu:/x\n"); got != "" {
		t.Errorf("ParseCgroup(v1 only) = %q", got)
	}
	if got := ParseTunFdinfo("pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t1\niff:\tvnet0\n"); got != "vnet0" {
		t.Errorf("ParseTunFdinfo = %q", got)
	}
	nu := "Num       RefCount Protocol Flags    Type St Inode Path\n" +
		"0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/vm.qmp\n" +
		"0000000000000000: 00000002 00000000 00000000 0001 03 4243\n"
	m := ParseNetUnix(nu)
	if m["4242"] != "/run/vm.qmp" || len(m) != 1 {
		t.Errorf("ParseNetUnix = %v", m)
	}
	if got := parseStartTime("123 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 20"); got != 777 {
		t.Errorf("parseStartTime = %d", got)
	}
}

func TestIsQEMU(t *testing.T) {
	for _, tt := range []struct {
		exe  string
		want bool
	}{
		{"/usr/bin/qemu-system-x86_64", true},
		{"/usr/bin/qemu-system-x86_64 (deleted)", true}, // upgraded under it
		{"/usr/libexec/qemu-kvm", true},
		{"/usr/bin/bash", false},
		{"/usr/bin/qemu-img", false},
		{"/home/u/qemu-system-x86_64.sh/bash", false},
		{"", false},
	} {
		if got := IsQEMU(tt.exe); got != tt.want {
			t.Errorf("IsQEMU(%q) = %v", tt.exe, got)
		}
	}
}

// fakeProc writes a /proc tree: pid → (exe, argv).
func fakeProc(t *testing.T, procs map[int][2]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, p := range procs {
		dir := filepath.Join(root, strconv.Itoa(pid))
		must := func(err error) {
			if err != nil {
				t.Fatal(err)
			}
		}
		must(os.MkdirAll(filepath.Join(dir, "fd"), 0o755))
		must(os.WriteFile(filepath.Join(dir, "cmdline"), []byte(strings.ReplaceAll(p[1], " ", "\x00")+"\x00"), 0o644))
		must(os.WriteFile(filepath.Join(dir, "status"), []byte("Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"), 0o644))
		must(os.Symlink(p[0], filepath.Join(dir, "exe")))
		must(os.Symlink("/", filepath.Join(dir, "cwd")))
	}
	os.MkdirAll(filepath.Join(root, "self"), 0o755) // not a pid
	return root
}

// Discovery trusts the executable the kernel ran, not argv[0].
func TestAllTrustsExe(t *testing.T) {
	root := fakeProc(t, map[int][2]string{
		100: {"/usr/bin/qemu-system-x86_64", "qemu-system-x86_64 -name real"},
		101: {"/usr/bin/python3", "qemu-system-x86_64 -name impostor"},
		102: {"/usr/bin/qemu-system-x86_64", "/opt/renamed -name renamed-argv0"},
		103: {"/usr/bin/qemu-system-x86_64 (deleted)", "qemu-system-x86_64 -name upgraded"},
		104: {"/usr/libexec/qemu-kvm", "qemu-kvm -name rhel"},
		105: {"/bin/sleep", "sleep 100"},
	})
	ps, err := All(root)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range ps {
		got = append(got, p.Name())
	}
	if want := []string{"real", "renamed-argv0", "upgraded", "rhel"}; !slices.Equal(got, want) {
		t.Errorf("All found %q, want %q", got, want)
	}
}

// TestMain turns this test binary into a fake QEMU when asked to: it then
// just sleeps with whatever argv it was given.
func TestMain(m *testing.M) {
	if os.Getenv("DISCOVER_FAKE_QEMU") == "1" {
		time.Sleep(30 * time.Second)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startFakeQEMU starts this test binary as a fake QEMU with argv args
// (argv[0] a QEMU's name) and files as its fds 3, 4, …, in the temporary
// directory, and waits until it has exec'd; it is killed when t ends.
// Discovery goes by the executable's name: the binary runs under a QEMU's.
func startFakeQEMU(t *testing.T, args []string, files []*os.File) *exec.Cmd {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	fake := filepath.Join(t.TempDir(), "qemu-system-fake")
	if os.Link(exe, fake) != nil {
		b, err := os.ReadFile(exe)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(fake, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(fake)
	cmd.Args, cmd.Dir, cmd.Env, cmd.ExtraFiles = args, os.TempDir(), []string{"DISCOVER_FAKE_QEMU=1"}, files
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Until the child has exec'd, its cmdline is the test binary's.
	for i := 0; i < 200; i++ {
		if argv, _ := readArgv("/proc", cmd.Process.Pid); len(argv) > 0 && argv[0] == args[0] {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cmd
}

// TestInspectSelf inspects a real process started as a fake QEMU (this test
// binary with a QEMU argv), so /proc parsing is exercised without QEMU.
func TestInspectSelf(t *testing.T) {
	cmd := startFakeQEMU(t, []string{"qemu-system-x86_64", "-name", "fake", "-m", "64"}, nil)
	p, err := Inspect("/proc", cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if p.Name() != "fake" || p.Cwd != os.TempDir() || len(p.Env) != 1 || p.Env[0] != "DISCOVER_FAKE_QEMU=1" {
		t.Fatalf("inspected %+v", p)
	}
	if p.StartTime == 0 {
		t.Error("no start time")
	}
	all, err := All("/proc")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, q := range all {
		found = found || q.PID == cmd.Process.Pid
	}
	if !found {
		t.Error("All did not find the fake QEMU")
	}
}

// TestInspectMemfds: which of a QEMU's inherited RAM fds are memfds — a
// memfd_create one, and any shm file with no name left (as LUO hands a
// memfd back after a kexec: "/ (deleted)"; a deleted /dev/shm file stands
// for it here) — and which are not: a shm file still linked, a deleted
// file on a disk filesystem.
func TestInspectMemfds(t *testing.T) {
	if st, err := os.Stat("/dev/shm"); err != nil || !st.IsDir() {
		t.Skip("no /dev/shm")
	}
	mfd, err := unix.MemfdCreate("guest-ram", 0)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	open := func(dir, name string, unlink bool) *os.File {
		p := filepath.Join(dir, name)
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if unlink {
			os.Remove(p)
		} else {
			t.Cleanup(func() { os.Remove(p) })
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	shm := fmt.Sprintf("/dev/shm/lu-discover-%d", os.Getpid())
	os.MkdirAll(shm, 0o700)
	t.Cleanup(func() { os.RemoveAll(shm) })
	disk := t.TempDir()
	if st, err := os.Stat(disk); err != nil || !st.IsDir() {
		t.Fatal(err)
	}
	var fs unix.Statfs_t
	if unix.Statfs(disk, &fs) != nil || fs.Type == unix.TMPFS_MAGIC {
		t.Skipf("%s is on tmpfs: no disk filesystem to compare with", disk)
	}
	files := []*os.File{os.NewFile(uintptr(mfd), "memfd"), open(shm, "unlinked", true), open(shm, "linked", false), open(disk, "unlinked", true)}
	want := []bool{true, true, false, false}
	args := []string{"qemu-system-x86_64", "-name", "fake"}
	for i := range files {
		args = append(args, "-object", fmt.Sprintf("memory-backend-file,id=m%d,size=1M,mem-path=/proc/self/fd/%d,share=on", i, 3+i))
	}
	cmd := startFakeQEMU(t, args, files)
	p, err := Inspect("/proc", cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	for i, w := range want {
		fi := p.Fds[3+i]
		if fi.Memfd() != w || fi.Hugetlb {
			t.Errorf("fd %d (%s): Memfd %v (unnamed %v, hugetlb %v), want %v", 3+i, fi.Target, fi.Memfd(), fi.Unnamed, fi.Hugetlb, w)
		}
	}
}
