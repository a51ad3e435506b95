// Package cgroupv2 reads the part of a cgroup v2 tree that holds the guests'
// QEMUs — each cgroup on the way from the root, with its enabled controllers
// and its limits, as manifest.Cgroup records them — and re-creates it in a
// new kernel, top-down, before the QEMUs are cloned straight into their
// cgroups.
package cgroupv2

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// Capture records path and its ancestors (root first) under the cgroup2
// mount at root ("/sys/fs/cgroup").
func Capture(root, path string) ([]manifest.Cgroup, error) {
	path = filepath.Clean("/" + path)
	var chain []string
	for p := path; ; p = filepath.Dir(p) {
		chain = append([]string{p}, chain...)
		if p == "/" {
			break
		}
	}
	var out []manifest.Cgroup
	for _, p := range chain {
		dir := filepath.Join(root, p)
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
		if err != nil {
			return nil, fmt.Errorf("reading cgroup %s: %w", p, err)
		}
		cg := manifest.Cgroup{Path: p, Controllers: strings.Fields(string(b)), Limits: map[string]string{}}
		if p != "/" {
			for _, f := range manifest.LimitFiles {
				b, err := os.ReadFile(filepath.Join(dir, f))
				if err != nil {
					continue // controller not enabled here
				}
				v := strings.TrimSpace(string(b))
				if isDefault(f, v) {
					continue
				}
				cg.Limits[f] = v
			}
		}
		out = append(out, cg)
	}
	return out, nil
}

// isDefault tells whether a limit file holds the kernel's default, which
// need not be written back (and for cpuset means "inherit").
func isDefault(file, v string) bool {
	switch file {
	case "cpu.max":
		return strings.HasPrefix(v, "max ")
	case "cpu.weight", "io.weight":
		return v == "100" || v == "default 100"
	case "cpu.idle", "memory.min", "memory.low":
		return v == "0"
	case "memory.high", "memory.max", "memory.swap.max", "pids.max":
		return v == "max"
	case "cpuset.cpus", "cpuset.mems", "io.max":
		return v == ""
	}
	return false
}

// Merge combines recorded chains (one per VM) into one list, parents first,
// each path once.
func Merge(chains ...[]manifest.Cgroup) []manifest.Cgroup {
	byPath := map[string]manifest.Cgroup{}
	for _, ch := range chains {
		for _, c := range ch {
			byPath[c.Path] = c
		}
	}
	var out []manifest.Cgroup
	for _, c := range byPath {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool {
		di, dj := strings.Count(out[i].Path, "/"), strings.Count(out[j].Path, "/")
		if out[i].Path == "/" || out[j].Path == "/" {
			return out[i].Path == "/" && out[j].Path != "/"
		}
		if di != dj {
			return di < dj
		}
		return out[i].Path < out[j].Path
	})
	return out
}

// Apply re-creates the cgroups under root, parents first: mkdir, enable the
// recorded controllers in cgroup.subtree_control, write the limits. It goes
// on past errors and returns them all.
func Apply(root string, cgs []manifest.Cgroup) error {
	var errs []error
	for _, c := range Merge(cgs) {
		dir := filepath.Join(root, filepath.Clean("/"+c.Path))
		if c.Path != "/" {
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				errs = append(errs, fmt.Errorf("creating cgroup %s: %w", c.Path, err))
				continue
			}
		}
		// cpuset first: a cgroup with an empty cpuset takes no tasks.
		files := make([]string, 0, len(c.Limits))
		for f := range c.Limits {
			files = append(files, f)
		}
		sort.Slice(files, func(i, j int) bool {
			ci, cj := strings.HasPrefix(files[i], "cpuset."), strings.HasPrefix(files[j], "cpuset.")
			if ci != cj {
				return ci
			}
			return files[i] < files[j]
		})
		for _, f := range files {
			if err := os.WriteFile(filepath.Join(dir, f), []byte(c.Limits[f]), 0); err != nil {
				errs = append(errs, fmt.Errorf("cgroup %s: writing %s=%q: %w", c.Path, f, c.Limits[f], err))
			}
		}
		if len(c.Controllers) > 0 {
			var b strings.Builder
			for _, ctl := range c.Controllers {
				fmt.Fprintf(&b, "+%s ", ctl)
			}
			if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.TrimSpace(b.String())), 0); err != nil {
				errs = append(errs, fmt.Errorf("cgroup %s: enabling controllers %v: %w", c.Path, c.Controllers, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Verify reads every recorded limit and controller back from the files under
// root and reports the differences. It returns what it read.
func Verify(root string, cgs []manifest.Cgroup) ([]manifest.Cgroup, error) {
	var got []manifest.Cgroup
	var errs []error
	for _, c := range Merge(cgs) {
		dir := filepath.Join(root, filepath.Clean("/"+c.Path))
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
		if err != nil {
			errs = append(errs, fmt.Errorf("cgroup %s: %w", c.Path, err))
			continue
		}
		rb := manifest.Cgroup{Path: c.Path, Controllers: strings.Fields(string(b)), Limits: map[string]string{}}
		for _, ctl := range c.Controllers {
			if !slices.Contains(rb.Controllers, ctl) {
				errs = append(errs, fmt.Errorf("cgroup %s: controller %s not enabled (have %v)", c.Path, ctl, rb.Controllers))
			}
		}
		for f, want := range c.Limits {
			v, err := os.ReadFile(filepath.Join(dir, f))
			if err != nil {
				errs = append(errs, fmt.Errorf("cgroup %s: %w", c.Path, err))
				continue
			}
			rb.Limits[f] = strings.TrimSpace(string(v))
			if rb.Limits[f] != want {
				errs = append(errs, fmt.Errorf("cgroup %s: %s is %q, recorded %q", c.Path, f, rb.Limits[f], want))
			}
		}
		got = append(got, rb)
	}
	return got, errors.Join(errs...)
}

// Mounted tells whether root is a cgroup v2 mount.
func Mounted(root string) bool {
	var st unix.Statfs_t
	return unix.Statfs(root, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// OpenDir opens (creating it if needed) the cgroup at path under root, for
// cloning a process straight into it (SysProcAttr.UseCgroupFD). The caller
// closes the fd once the process has started.
func OpenDir(root, path string) (int, error) {
	dir := filepath.Join(root, filepath.Clean("/"+path))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return -1, fmt.Errorf("creating cgroup %s: %w", path, err)
	}
	fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening cgroup %s: %w", path, err)
	}
	return fd, nil
}
