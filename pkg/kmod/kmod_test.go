package kmod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/u-root/u-root/pkg/kmodule"
	"golang.org/x/sys/unix"
)

func TestReadList(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       []Group
	}{
		{"one group", "ext4\n  nd_pmem \n", []Group{{Names: []string{"ext4", "nd_pmem"}}}},
		{"groups", "# pmem\nnd_pmem\next4\n\n# net\ntun\nbridge\n", []Group{{Names: []string{"nd_pmem", "ext4"}}, {Names: []string{"tun", "bridge"}}}},
		{"comment stanzas are no group", "# header\n# more\n\n\next4\n\n# trailer\n", []Group{{Names: []string{"ext4"}}}},
		{"a comment inside a group keeps it", "a\n# why b\nb\n", []Group{{Names: []string{"a", "b"}}}},
		{"no final newline", "a\n\nb", []Group{{Names: []string{"a"}}, {Names: []string{"b"}}}},
		{"empty", "", nil},
		{"a phase", "ext4\n\n# net\n@network\ntun\nbridge\n", []Group{{Names: []string{"ext4"}}, {Phase: "network", Names: []string{"tun", "bridge"}}}},
		{"a phase after a comment", "# net\n@network\ntun", []Group{{Phase: "network", Names: []string{"tun"}}}},
		{"a phase with every module built in is no group", "@network\n\next4\n", []Group{{Names: []string{"ext4"}}}},
		{"a phase at the end with nothing", "ext4\n\n@network\n", []Group{{Names: []string{"ext4"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "m")
			os.WriteFile(p, []byte(tc.text), 0o644)
			got, err := ReadList(p)
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ReadList = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestParseListErrors(t *testing.T) {
	for _, tc := range []struct{ name, text, want string }{
		{"phase after a name", "tun\n@network\nbridge\n", "line 2: \"@network\": a phase opens a group"},
		{"two phases", "@network\n@network\ntun\n", "line 2"},
		{"empty phase", "@\ntun\n", "want @PHASE"},
		{"phase with a space", "@host filesystems\ntun\n", "want @PHASE"},
		{"two names on a line", "tun bridge\n", "one module name per line"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseList(tc.text)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseList(%q) = %v, want an error with %q", tc.text, err, tc.want)
			}
		})
	}
}

// FuzzParseList: the list is an operator's file (initramfs/modules.txt via
// build.sh): never a panic, and every group it gives has names, none empty
// or with blanks, and a phase without blanks.
func FuzzParseList(f *testing.F) {
	for _, s := range []string{"", "ext4\n\n@network\ntun\n", "# c\n@\n", "a\n\n\nb\n@x\n", "@network\n\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		groups, err := ParseList(text)
		if err != nil {
			return
		}
		for _, g := range groups {
			if len(g.Names) == 0 || strings.ContainsAny(g.Phase, " \t") {
				t.Fatalf("group %+v from %q", g, text)
			}
			for _, n := range g.Names {
				if n == "" || strings.ContainsAny(n, " \t") || strings.HasPrefix(n, "#") || strings.HasPrefix(n, "@") {
					t.Fatalf("name %q from %q", n, text)
				}
			}
		}
	})
}

// fakeModules is a modules.dep tree with modules a…f, none depending on
// another, for Start without loading anything (loadFileFn is replaced).
func fakeModules(t *testing.T) kmodule.ProbeOpts {
	root := t.TempDir()
	dir := filepath.Join(root, "lib/modules/0.0-test")
	os.MkdirAll(dir, 0o755)
	var dep strings.Builder
	for _, m := range []string{"a", "b", "c", "d", "e", "f"} {
		fmt.Fprintf(&dep, "kernel/%s.ko:\n", m)
	}
	os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep.String()), 0o644)
	return kmodule.ProbeOpts{RootDir: root, KVer: "0.0-test", IgnoreProcMods: true}
}

// TestStartWait: Wait gives the results of one phase's groups, in list
// order, whatever order they finished in; a module not in modules.dep is an
// error of its own; a group needed later loads at LaterNice, the first
// group at the caller's priority, and the other groups needed first at
// BesideNice.
func TestStartWait(t *testing.T) {
	opts := fakeModules(t)
	var mu sync.Mutex
	nice := map[string]int{}
	release := make(chan struct{})
	loadFileFn = func(p string) error {
		if filepath.Base(p) == "e.ko" {
			<-release // the later group is still loading while the first is waited for
		}
		prio, err := unix.Getpriority(unix.PRIO_PROCESS, 0) // this thread
		if err != nil {
			return err
		}
		mu.Lock()
		nice[filepath.Base(p)] = 20 - prio // the raw syscall's value
		mu.Unlock()
		return nil
	}
	t.Cleanup(func() { loadFileFn = loadFile })
	before, _ := unix.Getpriority(unix.PRIO_PROCESS, 0)

	l := Start([]Group{{Names: []string{"a", "b"}}, {Phase: "network", Names: []string{"e", "f"}}, {Names: []string{"c", "nope"}}}, opts)
	first, err := l.Wait(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range first {
		names = append(names, r.Name)
		if (r.Err != nil) != (r.Name == "nope") {
			t.Errorf("%s: error %v", r.Name, r.Err)
		}
	}
	if want := []string{"a", "b", "c", "nope"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("first phase's results %v, want %v", names, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := l.Wait(ctx, "network"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait for a group still loading = %v, want the context's deadline", err)
	}
	close(release)
	later, err := l.Wait(context.Background(), "network")
	if err != nil || len(later) != 2 || later[0].Name != "e" || later[1].Name != "f" || later[0].Err != nil {
		t.Fatalf("network phase's results %+v, %v", later, err)
	}
	if r, err := l.Wait(context.Background(), "other"); err != nil || r != nil {
		t.Fatalf("a phase with no group: %v, %v", r, err)
	}
	mu.Lock()
	defer mu.Unlock()
	for m, want := range map[string]int{"a.ko": 20 - before, "b.ko": 20 - before, "c.ko": BesideNice, "e.ko": LaterNice, "f.ko": LaterNice} {
		if nice[m] != want {
			t.Errorf("%s loaded at nice %d, want %d (all: %v)", m, nice[m], want, nice)
		}
	}
	if got, _ := unix.Getpriority(unix.PRIO_PROCESS, 0); got != before {
		t.Errorf("the test's own thread changed priority: %d → %d", before, got)
	}
}

func TestPhases(t *testing.T) {
	got := Phases([]Group{{Names: []string{"a"}}, {Phase: "network", Names: []string{"b"}}, {Names: []string{"c"}}, {Phase: "network", Names: []string{"d"}}})
	if want := []string{"", "network"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Phases = %q, want %q", got, want)
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

// TestNoDevice: a module whose init says its hardware is not there (ENODEV;
// EOPNOTSUPP, as kvm_intel on an AMD CPU) is skipped, not an error; any
// other refusal is one, and so is a dependency's "no device".
func TestNoDevice(t *testing.T) {
	opts := fakeModules(t)
	// b depends on a: a's refusal is b's error, whatever it is.
	dir := filepath.Join(opts.RootDir, "lib/modules/0.0-test")
	os.WriteFile(filepath.Join(dir, "modules.dep"), []byte("kernel/a.ko:\nkernel/b.ko: kernel/a.ko\nkernel/c.ko:\nkernel/d.ko:\n"), 0o644)
	refuse := map[string]error{"a.ko": unix.ENODEV, "c.ko": unix.EOPNOTSUPP, "d.ko": unix.EPERM}
	loadFileFn = func(p string) error { return refuse[filepath.Base(p)] }
	t.Cleanup(func() { loadFileFn = loadFile })
	for _, tc := range []struct {
		name     string
		noDevice bool
		err      bool
	}{{"a", true, false}, {"b", false, true}, {"c", true, false}, {"d", false, true}} {
		r := Load([]string{tc.name}, opts)[0]
		if r.NoDevice != tc.noDevice || (r.Err != nil) != tc.err {
			t.Errorf("%s: NoDevice %v, error %v; want %v, an error %v", tc.name, r.NoDevice, r.Err, tc.noDevice, tc.err)
		}
	}
}
