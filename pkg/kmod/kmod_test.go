package kmod

import (
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"

	"github.com/u-root/u-root/pkg/kmodule"
)

func TestReadList(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       [][]string
	}{
		{"one group", "ext4\n  nd_pmem \n", [][]string{{"ext4", "nd_pmem"}}},
		{"groups", "# pmem\nnd_pmem\next4\n\n# net\ntun\nbridge\n", [][]string{{"nd_pmem", "ext4"}, {"tun", "bridge"}}},
		{"comment stanzas are no group", "# header\n# more\n\n\next4\n\n# trailer\n", [][]string{{"ext4"}}},
		{"a comment inside a group keeps it", "a\n# why b\nb\n", [][]string{{"a", "b"}}},
		{"no final newline", "a\n\nb", [][]string{{"a"}, {"b"}}},
		{"empty", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "m")
			os.WriteFile(p, []byte(tc.text), 0o644)
			got, err := ReadList(p)
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ReadList = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// TestLoadGroupsOrder: each group's results come back in its own order,
// groups one after the other, whatever order they finished in (a module
// not in modules.dep is an error of its own).
func TestLoadGroupsOrder(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "lib/modules/0.0-test"), 0o755)
	os.WriteFile(filepath.Join(root, "lib/modules/0.0-test/modules.dep"), nil, 0o644)
	res := LoadGroups([][]string{{"a", "b"}, {"c"}, {"d", "e", "f"}}, kmodule.ProbeOpts{RootDir: root, KVer: "0.0-test", IgnoreProcMods: true})
	var names []string
	for _, r := range res {
		names = append(names, r.Name)
		if r.Err == nil {
			t.Errorf("%s: no error for a module not in modules.dep", r.Name)
		}
	}
	if want := []string{"a", "b", "c", "d", "e", "f"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("results %v, want %v", names, want)
	}
}

// TestDependencyOrder resolves real modules.dep files of the set-up's Debian
// kernels without loading anything: a dry run through the same prober.
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
