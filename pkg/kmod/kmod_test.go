package kmod

import (
	"os"
	"path/filepath"
	"reflect"
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
	var mu sync.Mutex // kmodule probes independent dependencies in parallel
	prober, err := kmodule.NewProber(kmodule.ProbeOpts{RootDir: root, KVer: string(ver[:len(ver)-1]), IgnoreProcMods: true,
		DryRunCB: func(p string) { mu.Lock(); order = append(order, filepath.Base(p)); mu.Unlock() }})
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
