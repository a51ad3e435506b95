// Package kmod loads the kernel modules the host needs, in dependency order
// from modules.dep (resolved with u-root's kmodule), letting the kernel
// decompress .ko.xz itself (finit_module with MODULE_INIT_COMPRESSED_FILE)
// where it can, and falling back to kmodule's userspace decompression.
//
// Independent groups of modules load side by side (Start): loading is the
// kernel's work on the CPU (relocations, signatures, init). A group says
// which boot phase first needs it; PID 1 waits for the groups of a phase
// only when it gets there (Loading.Wait), so the modules the guests' RAM and
// the host root need come first, and the network's load meanwhile, at a
// lower priority, while the disks are mounted and the manifest read.
package kmod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/u-root/u-root/pkg/kmodule"
	"golang.org/x/sys/unix"
)

// Result says what happened to one requested module.
type Result struct {
	Name   string
	Loaded []string // module files loaded for it (dependencies first)
	// NoDevice: the module refused to load because its hardware is not
	// there: ENODEV (crc32c_intel on a CPU without SSE4.2: a generic module
	// covers for it), or EOPNOTSUPP (kvm_intel on an AMD CPU, or on one
	// without VMX). That is not an error.
	NoDevice bool
	Err      error
	// Took is how long its files took to load, dependencies included
	// (where the boot's module time goes).
	Took time.Duration
}

// Load loads each named module with its dependencies, in the order given
// (the list puts soft dependencies first, which kmodule does not follow).
// Modules that are built in or already loaded count as loaded. A module
// that is not in modules.dep at all is an error for that module only.
func Load(names []string, opts kmodule.ProbeOpts) []Result {
	var mu sync.Mutex
	var order []string
	dry := opts
	dry.DryRunCB = func(p string) {
		mu.Lock()
		order = append(order, p)
		mu.Unlock()
	}
	prober, err := kmodule.NewProber(dry)
	if err != nil {
		res := make([]Result, len(names))
		for i, n := range names {
			res[i] = Result{Name: n, Err: fmt.Errorf("reading modules.dep: %w", err)}
		}
		return res
	}
	var res []Result
	for _, n := range names {
		mu.Lock()
		order = order[:0]
		mu.Unlock()
		r := Result{Name: n}
		start := time.Now()
		if err := prober.Probe(n, ""); err != nil {
			r.Err = err
			res = append(res, r)
			continue
		}
		for _, p := range order {
			err := loadFileFn(p)
			if noDevice(err) && filepath.Base(p) == filepath.Base(order[len(order)-1]) {
				r.NoDevice = true
				break
			}
			if err != nil {
				r.Err = fmt.Errorf("loading %s: %w", filepath.Base(p), err)
				break
			}
			r.Loaded = append(r.Loaded, strings.TrimSuffix(filepath.Base(p), filepath.Ext(p)))
		}
		r.Took = time.Since(start)
		res = append(res, r)
	}
	return res
}

// noDevice tells whether a module's init said its hardware is not there.
func noDevice(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EOPNOTSUPP)
}

// loadFileFn is loadFile; tests look at the thread it runs on through it.
var loadFileFn = loadFile

func loadFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	if strings.HasSuffix(path, ".xz") || strings.HasSuffix(path, ".gz") || strings.HasSuffix(path, ".zst") {
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	err = unix.FinitModule(int(f.Fd()), "", flags)
	switch {
	case err == nil, errors.Is(err, unix.EEXIST):
		return nil
	case flags != 0 && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP)):
		// The kernel cannot decompress: do it here.
		if _, err := f.Seek(0, 0); err != nil {
			return err
		}
		if err := kmodule.FileInit(f, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		return nil
	}
	return err
}

// Group is one group of the module list: its names load in order, side by
// side with the other groups.
type Group struct {
	// Phase is the boot phase that first needs the group ("" for the
	// first: nothing is looked for before such groups are loaded).
	Phase string
	Names []string
}

// LaterNice is the nice value of the threads that load the groups needed
// later (Phase != ""): the groups needed first get the CPUs first.
const LaterNice = 10

// BesideNice is the nice value of the threads that load the groups needed
// first other than the list's first group, the longest (ext4's: the kernel
// checks and links it on one CPU for longer than the others' groups take
// together, so the phase ends when it does): on a host with few CPUs, the
// others load beside it rather than ahead of it. On two emulated CPUs the
// modules phase went from 388 to 328 ms (6.1) and 582 to 511 ms (6.12),
// medians of 8 and 4 boots (docs/benchmarks.md, P5').
const BesideNice = 5

// Loading is module loading under way (Start): each group loads on its own
// goroutine, and Wait waits for the groups of one phase.
type Loading struct {
	groups []Group
	done   []chan struct{}
	res    [][]Result
}

// Start begins loading every group, side by side, and returns at once. Two
// groups may share a dependency: the kernel lets one load it and tells the
// other it exists. The list's first group loads at the caller's priority;
// every other group loads on a thread of its own at BesideNice (needed
// first) or LaterNice (needed later): the kernel's work for finit_module
// runs at the caller's priority. Such a thread ends with its group, so
// nothing else PID 1 does inherits the priority.
func Start(groups []Group, opts kmodule.ProbeOpts) *Loading {
	l := &Loading{groups: groups, done: make([]chan struct{}, len(groups)), res: make([][]Result, len(groups))}
	for i, g := range groups {
		l.done[i] = make(chan struct{})
		nice := 0
		switch {
		case g.Phase != "":
			nice = LaterNice
		case i > 0:
			nice = BesideNice
		}
		go func() {
			defer close(l.done[i])
			if nice != 0 {
				// Not unlocked: the thread exits with this goroutine.
				runtime.LockOSThread()
				_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), nice)
			}
			l.res[i] = Load(g.Names, opts)
		}()
	}
	return l
}

// Wait waits until every group that phase needs is loaded and returns their
// results, group after group in list order.
func (l *Loading) Wait(ctx context.Context, phase string) ([]Result, error) {
	var all []Result
	for i, g := range l.groups {
		if g.Phase != phase {
			continue
		}
		select {
		case <-l.done[i]:
		case <-ctx.Done():
			return all, fmt.Errorf("waiting for the modules of %q: %w", g.Names, ctx.Err())
		}
		all = append(all, l.res[i]...)
	}
	return all, nil
}

// Phases are the phases the groups name, each once, in list order ("" for
// the groups needed first included).
func Phases(groups []Group) []string {
	var ps []string
	for _, g := range groups {
		if !slices.Contains(ps, g.Phase) {
			ps = append(ps, g.Phase)
		}
	}
	return ps
}

// ReadList reads a module list file: one name per line, # comments. A blank
// line ends a group (Start loads groups side by side, the names of one in
// order); a group of comments alone is none. A group's first name may be
// preceded by "@PHASE", the boot phase that first needs it (Group.Phase); a
// group with no name left (a kernel with its modules built in) is none.
func ReadList(path string) ([]Group, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseList(string(b))
}

// ParseList parses the text of a module list (ReadList).
func ParseList(text string) ([]Group, error) {
	var groups []Group
	var g Group
	end := func() {
		if len(g.Names) > 0 {
			groups = append(groups, g)
		}
		g = Group{}
	}
	for n, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "":
			end()
		case strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "@"):
			if len(g.Names) > 0 || g.Phase != "" {
				return nil, fmt.Errorf("line %d: %q: a phase opens a group, before its first module (a blank line ends the group before)", n+1, l)
			}
			g.Phase = strings.TrimSpace(l[1:])
			if g.Phase == "" || strings.ContainsAny(g.Phase, " \t@#") {
				return nil, fmt.Errorf("line %d: %q: want @PHASE, the name of a boot phase, e.g. @network", n+1, l)
			}
		default:
			if strings.ContainsAny(l, " \t") {
				return nil, fmt.Errorf("line %d: %q: one module name per line", n+1, l)
			}
			g.Names = append(g.Names, l)
		}
	}
	end()
	return groups, nil
}
