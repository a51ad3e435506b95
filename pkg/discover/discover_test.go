package discover

import (
	"os"
	"os/exec"
	"testing"
	"time"
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
		argv []string
		want bool
	}{
		{"/usr/bin/qemu-system-x86_64", nil, true},
		{"/usr/libexec/qemu-kvm", nil, true},
		{"/usr/bin/bash", []string{"bash"}, false},
		{"", []string{"/opt/qemu/bin/qemu-system-x86_64", "-m", "1"}, true},
	} {
		if got := IsQEMU(tt.exe, tt.argv); got != tt.want {
			t.Errorf("IsQEMU(%q, %q) = %v", tt.exe, tt.argv, got)
		}
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

// TestInspectSelf inspects a real process started as a fake QEMU (this test
// binary with a QEMU argv), so /proc parsing is exercised without QEMU.
func TestInspectSelf(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Args = []string{"qemu-system-x86_64", "-name", "fake", "-m", "64"}
	cmd.Dir = os.TempDir()
	cmd.Env = []string{"DISCOVER_FAKE_QEMU=1"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	// Until the child has exec'd, its cmdline is the test binary's.
	for i := 0; i < 200; i++ {
		if argv, _ := readArgv("/proc", cmd.Process.Pid); len(argv) > 0 && argv[0] == "qemu-system-x86_64" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
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
