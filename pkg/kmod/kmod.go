// Package kmod loads the kernel modules the host needs, with their
// dependencies from modules.dep, through u-root's kmodule prober: all the
// named modules at once, each one as soon as its dependencies are in.
package kmod

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/u-root/u-root/pkg/kmodule"
	"golang.org/x/sys/unix"
)

// Result says what happened to one requested module.
type Result struct {
	Name string
	// NoDevice: the module refused to load because its hardware is not
	// there (ENODEV), e.g. crc32c_intel on a CPU without SSE4.2. That is
	// not an error: a generic module covers for it.
	NoDevice bool
	Err      error
}

// Load loads the named modules with their dependencies, in parallel: the
// prober loads every module once, after its dependencies, and independent
// ones side by side (linking a module is CPU work: seconds of a boot under
// emulation). Soft dependencies, which kmodule does not follow, are only
// needed by the time the modules are used, and Load returns when all are
// in. Modules built in or already loaded count as loaded; a module not in
// modules.dep is an error for that module only.
func Load(names []string, opts kmodule.ProbeOpts) []Result {
	res := make([]Result, len(names))
	prober, err := kmodule.NewProber(opts)
	if err != nil {
		for i, n := range names {
			res[i] = Result{Name: n, Err: fmt.Errorf("reading modules.dep: %w", err)}
		}
		return res
	}
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i].Name = n
			switch err := prober.Probe(n, ""); {
			case errors.Is(err, unix.ENODEV):
				res[i].NoDevice = true
			case err != nil:
				res[i].Err = err
			}
		}()
	}
	wg.Wait()
	return res
}

// ReadList reads a module list file: one name per line, # comments.
func ReadList(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		out = append(out, l)
	}
	return out, nil
}
