package cgroupv2

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

func TestMerge(t *testing.T) {
	a := []manifest.Cgroup{{Path: "/"}, {Path: "/machine.slice"}, {Path: "/machine.slice/vm1"}}
	b := []manifest.Cgroup{{Path: "/"}, {Path: "/machine.slice"}, {Path: "/machine.slice/vm2"}, {Path: "/a"}}
	var got []string
	for _, c := range Merge(a, b) {
		got = append(got, c.Path)
	}
	want := []string{"/", "/a", "/machine.slice", "/machine.slice/vm1", "/machine.slice/vm2"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Merge order %v, want %v", got, want)
	}
}

func TestIsDefault(t *testing.T) {
	for _, tt := range []struct {
		f, v string
		def  bool
	}{
		{"cpu.max", "max 100000", true}, {"cpu.max", "50000 100000", false},
		{"memory.max", "max", true}, {"memory.max", "268435456", false},
		{"cpu.weight", "100", true}, {"cpu.weight", "200", false},
		{"pids.max", "max", true}, {"pids.max", "64", false},
		{"cpuset.cpus", "", true}, {"cpuset.cpus", "0-1", false},
	} {
		if got := isDefault(tt.f, tt.v); got != tt.def {
			t.Errorf("isDefault(%s, %q) = %v", tt.f, tt.v, got)
		}
	}
}

// TestCaptureApply records a real cgroup subtree with limits, removes it,
// re-creates it from the record, and reads the limits back. Needs root and
// a cgroup2 mount.
func TestCaptureApply(t *testing.T) {
	root := "/sys/fs/cgroup"
	var st unix.Statfs_t
	if os.Geteuid() != 0 || unix.Statfs(root, &st) != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Skip("needs root and cgroup2 at /sys/fs/cgroup")
	}
	avail, _ := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	for _, c := range []string{"cpu", "memory", "pids"} {
		if !strings.Contains(string(avail), c) {
			t.Skipf("controller %s not available", c)
		}
	}
	base := "/lu-cgtest"
	cleanup := func() {
		os.Remove(filepath.Join(root, base, "vm"))
		os.Remove(filepath.Join(root, base))
	}
	cleanup()
	t.Cleanup(cleanup)
	rootCtl, _ := os.ReadFile(filepath.Join(root, "cgroup.subtree_control"))
	if !strings.Contains(string(rootCtl), "memory") {
		os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+cpu +memory +pids"), 0)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(filepath.Join(root, base), 0o755))
	must(os.WriteFile(filepath.Join(root, base, "cgroup.subtree_control"), []byte("+cpu +memory +pids"), 0))
	must(os.Mkdir(filepath.Join(root, base, "vm"), 0o755))
	limits := map[string]string{"cpu.max": "50000 100000", "cpu.weight": "200", "memory.max": "268435456", "memory.high": "201326592", "pids.max": "64"}
	for f, v := range limits {
		must(os.WriteFile(filepath.Join(root, base, "vm", f), []byte(v), 0))
	}
	rec, err := Capture(root, base+"/vm")
	must(err)
	if len(rec) != 3 || rec[2].Path != base+"/vm" {
		t.Fatalf("captured %+v", rec)
	}
	if !reflect.DeepEqual(rec[2].Limits, limits) {
		t.Fatalf("captured limits %v, want %v", rec[2].Limits, limits)
	}
	cleanup()
	must(Apply(root, rec))
	for f, v := range limits {
		b, err := os.ReadFile(filepath.Join(root, base, "vm", f))
		must(err)
		if strings.TrimSpace(string(b)) != v {
			t.Errorf("%s = %q after Apply, want %q", f, b, v)
		}
	}
}
