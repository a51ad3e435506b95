package kmod

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/u-root/u-root/pkg/kmodule"
)

// TestLoadOrder resolves real modules.dep files of the set-up's Debian
// kernels without loading anything: a dry run through the same prober.
func TestReadList(t *testing.T) {
	p := filepath.Join(t.TempDir(), "m")
	os.WriteFile(p, []byte("# c\n\next4\n  nd_pmem \n"), 0o644)
	got, err := ReadList(p)
	if err != nil || !reflect.DeepEqual(got, []string{"ext4", "nd_pmem"}) {
		t.Fatalf("ReadList = %v, %v", got, err)
	}
}

func TestDependencyOrder(t *testing.T) {
	root := "../../.cache/kernels/new"
	ver, err := os.ReadFile(filepath.Join(root, "version"))
	if err != nil {
		t.Skip("set-up kernels not present (scripts/setup.sh)")
	}
	var order []string
	prober, err := kmodule.NewProber(kmodule.ProbeOpts{RootDir: root, KVer: string(ver[:len(ver)-1]), IgnoreProcMods: true,
		DryRunCB: func(p string) { order = append(order, filepath.Base(p)) }})
	if err != nil {
		t.Fatal(err)
	}
	if err := prober.Probe("ext4", ""); err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range order {
		pos[m] = i
	}
	if _, ok := pos["ext4.ko.xz"]; !ok {
		t.Fatalf("ext4 not in order %v", order)
	}
	if pos["jbd2.ko.xz"] > pos["ext4.ko.xz"] || pos["mbcache.ko.xz"] > pos["ext4.ko.xz"] {
		t.Fatalf("dependencies after ext4: %v", order)
	}
}

// TestLoadParallel runs Load as a dry run on the set-up kernel's
// modules.dep: every module file comes once, each after its dependencies,
// though the names are probed all at once.
func TestLoadParallel(t *testing.T) {
	root := "../../.cache/kernels/new"
	ver, err := os.ReadFile(filepath.Join(root, "version"))
	if err != nil {
		t.Skip("set-up kernels not present (scripts/setup.sh)")
	}
	var mu sync.Mutex
	var order []string
	res := Load([]string{"ext4", "bridge", "vhost_net", "nd_pmem", "no_such_module"}, kmodule.ProbeOpts{
		RootDir: root, KVer: strings.TrimSpace(string(ver)), IgnoreProcMods: true,
		DryRunCB: func(p string) { mu.Lock(); order = append(order, filepath.Base(p)); mu.Unlock() }})
	for _, r := range res[:4] {
		if r.Err != nil || r.NoDevice {
			t.Errorf("%s: %+v", r.Name, r)
		}
	}
	if res[4].Err == nil {
		t.Errorf("a module missing from modules.dep loaded")
	}
	pos := map[string]int{}
	for i, m := range order {
		if _, dup := pos[m]; dup {
			t.Errorf("%s loaded twice: %v", m, order)
		}
		pos[m] = i
	}
	for _, dep := range [][2]string{{"jbd2.ko.xz", "ext4.ko.xz"}, {"mbcache.ko.xz", "ext4.ko.xz"}, {"stp.ko.xz", "bridge.ko.xz"},
		{"llc.ko.xz", "stp.ko.xz"}, {"vhost.ko.xz", "vhost_net.ko.xz"}, {"libnvdimm.ko.xz", "nd_pmem.ko.xz"}} {
		a, okA := pos[dep[0]]
		b, okB := pos[dep[1]]
		if !okA || !okB || a > b {
			t.Errorf("%s must come before %s: %v", dep[0], dep[1], order)
		}
	}
}
