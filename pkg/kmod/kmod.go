// Package kmod loads the kernel modules the host needs, in dependency order
// from modules.dep (resolved with u-root's kmodule), letting the kernel
// decompress .ko.xz itself (finit_module with MODULE_INIT_COMPRESSED_FILE)
// where it can, and falling back to kmodule's userspace decompression.
// Independent groups of modules load side by side (LoadGroups): loading is
// the kernel's work on the CPU (relocations, signatures, init), and PID 1
// waits for all of it before any guest starts.
package kmod

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/u-root/u-root/pkg/kmodule"
	"golang.org/x/sys/unix"
)

// Result says what happened to one requested module.
type Result struct {
	Name   string
	Loaded []string // module files loaded for it (dependencies first)
	// NoDevice: the module refused to load because its hardware is not
	// there (ENODEV), e.g. crc32c_intel on a CPU without SSE4.2. That is
	// not an error: a generic module covers for it.
	NoDevice bool
	Err      error
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
		if err := prober.Probe(n, ""); err != nil {
			r.Err = err
			res = append(res, r)
			continue
		}
		for _, p := range order {
			err := loadFile(p)
			if errors.Is(err, unix.ENODEV) && filepath.Base(p) == filepath.Base(order[len(order)-1]) {
				r.NoDevice = true
				break
			}
			if err != nil {
				r.Err = fmt.Errorf("loading %s: %w", filepath.Base(p), err)
				break
			}
			r.Loaded = append(r.Loaded, strings.TrimSuffix(filepath.Base(p), filepath.Ext(p)))
		}
		res = append(res, r)
	}
	return res
}

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

// LoadGroups loads the groups side by side, each with Load (its names in
// order), and returns their results, group after group. Two groups may share
// a dependency: the kernel lets one load it and tells the other it exists.
func LoadGroups(groups [][]string, opts kmodule.ProbeOpts) []Result {
	res := make([][]Result, len(groups))
	var wg sync.WaitGroup
	for i, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = Load(g, opts)
		}()
	}
	wg.Wait()
	var all []Result
	for _, r := range res {
		all = append(all, r...)
	}
	return all
}

// ReadList reads a module list file: one name per line, # comments. A blank
// line ends a group (LoadGroups loads groups side by side, the names of one
// in order); a group of comments alone is none.
func ReadList(path string) ([][]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var groups [][]string
	var g []string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "":
			if len(g) > 0 {
				groups = append(groups, g)
			}
			g = nil
		case !strings.HasPrefix(l, "#"):
			g = append(g, l)
		}
	}
	if len(g) > 0 {
		groups = append(groups, g)
	}
	return groups, nil
}
