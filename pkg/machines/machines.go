// Package machines hands the guests that this project's PID 1 restored
// after a kexec back to systemd-machined, the second half of giving them
// back to libvirt (the first is the status record cpr rewrites).
//
// libvirt's daemon, when it starts and reconnects to a running guest, finds
// the guest's cgroup named like the scope it once made
// (…/machine-qemu\x2d1\x2dNAME.scope/libvirt/emulator) and then asks
// machined for the machine's unit. A new kernel's machined knows no machine,
// so libvirt (11.3: virCgroupNewDetectMachine) fails the reconnect and stops
// the guest. Register makes each such guest a machine again, as libvirt did
// when it started it: machined's CreateMachine has systemd start the scope
// with the QEMU in it; then the cgroups libvirt had below the scope, their
// controllers and limits, are put back and every process returned to its
// own. It runs after systemd and machined are up and before libvirt's
// daemon (the unit liveupdate-machines.service).
package machines

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/cgroupv2"
	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/machined"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/phase"
)

// Machined is what Register asks of systemd-machined (machined.Conn).
type Machined interface {
	Unit(ctx context.Context, pid int) (string, error)
	Create(ctx context.Context, m machined.Machine) error
}

// Options says where things are; the zero value of each path is the host's.
type Options struct {
	ProcRoot   string // /proc
	CgroupRoot string // /sys/fs/cgroup
	RunDir     string // libvirt's records, libvirt.RunDir
	Machined   Machined
	Log        *slog.Logger
}

// Result is what became of one libvirt guest.
type Result struct {
	Guest string // the domain's name
	PID   int    // its QEMU
	Unit  string // its scope unit, as machined has it now
	// Done says what Register did: "registered", or why it left the guest
	// as it was ("already a machine", "not in a machine scope").
	Done string
}

// parkDir holds a guest's processes while their scope is re-made; it is a
// child of the root, where no controller rule keeps a process out.
const parkDir = "liveupdate-machines"

// Register makes every running libvirt guest that machined does not know a
// machine. A guest whose registration fails keeps running where it was; the
// error names it (libvirt's daemon must not start before it is solved: it
// would stop that guest).
func Register(ctx context.Context, o Options) ([]Result, error) {
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	if o.CgroupRoot == "" {
		o.CgroupRoot = "/sys/fs/cgroup"
	}
	if o.RunDir == "" {
		o.RunDir = libvirt.RunDir
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if ds := libvirt.Daemons(o.ProcRoot); len(ds) > 0 {
		return nil, fmt.Errorf("%w (%v): it reconnects to its guests itself; register them before it starts (liveupdate-machines.service is ordered before it)", libvirt.ErrDaemonRuns, ds)
	}
	records, _ := filepath.Glob(filepath.Join(o.RunDir, "*.xml"))
	sort.Strings(records)
	var out []Result
	var errs []error
	for _, rec := range records {
		r, err := registerOne(ctx, o, rec)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if r.Guest != "" {
			out = append(out, r)
		}
	}
	os.Remove(filepath.Join(o.CgroupRoot, parkDir)) // empty once every guest is back
	return out, errors.Join(errs...)
}

// guest is one libvirt guest on its way to being a machine again.
type guest struct {
	o      Options
	status *libvirt.Status
	cgroup string // the QEMU's cgroup, e.g. /machine.slice/machine-….scope/libvirt/emulator
	scope  string // its scope's cgroup, /machine.slice/machine-….scope
	// What the scope held: every cgroup below it (itself included) with
	// controllers and limits, and each process's cgroup.
	tree  []manifest.Cgroup
	procs map[int]string
}

func registerOne(ctx context.Context, o Options, rec string) (Result, error) {
	b, err := os.ReadFile(rec)
	if err != nil {
		return Result{}, fmt.Errorf("reading libvirt's record %s: %w", rec, err)
	}
	st, err := libvirt.ParseStatus(b)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w", rec, err)
	}
	res := Result{Guest: st.Name, PID: st.PID}
	g := &guest{o: o, status: st}
	if !g.runs() {
		return Result{}, nil // libvirt finds it stopped and cleans up after it
	}
	if g.cgroup, err = processCgroup(o.ProcRoot, st.PID); err != nil {
		return res, fmt.Errorf("%s: %w", st.Name, err)
	}
	g.scope = scopeOf(g.cgroup)
	if g.scope == "" {
		// libvirt validates the cgroup's name before it asks machined:
		// a guest in no scope of its naming is reconnected without one.
		res.Done = "not in a machine scope"
		return res, nil
	}
	unitName := filepath.Base(g.scope)
	if res.Unit, err = o.Machined.Unit(ctx, st.PID); err != nil {
		return res, fmt.Errorf("%s: %w", st.Name, err)
	}
	if res.Unit != "" {
		res.Done = "already a machine"
		return res, nil
	}
	steps := []phase.Step{
		{Name: "read the scope's cgroups", Do: g.capture},
		{Name: "park its processes", Do: g.park, Undo: g.unpark},
		{Name: "clear the old scope", Do: g.clear, Undo: g.remake},
		{Name: "create the machine", Do: func(ctx context.Context) error { return g.create(ctx, unitName) }},
		{Name: "put the scope's cgroups back", Do: g.rebuild},
		{Name: "check", Do: func(ctx context.Context) error { return g.check(ctx, unitName) }},
	}
	if err := phase.Run(ctx, nil, steps...); err != nil {
		return res, fmt.Errorf("registering libvirt's guest %s (QEMU pid %d) with systemd-machined: %w", st.Name, st.PID, err)
	}
	res.Unit, res.Done = unitName, "registered"
	o.Log.Info("libvirt's guest is a machine again", "vm", st.Name, "pid", st.PID, "unit", unitName, "cgroup", g.cgroup)
	return res, nil
}

// runs tells whether the record's QEMU runs: libvirt names the guest in
// QEMU's -name guest=NAME.
func (g *guest) runs() bool {
	b, err := os.ReadFile(filepath.Join(g.o.ProcRoot, strconv.Itoa(g.status.PID), "cmdline"))
	if err != nil {
		return false
	}
	for _, a := range strings.Split(string(b), "\x00") {
		for _, f := range strings.Split(a, ",") {
			if f == "guest="+g.status.Name {
				return true
			}
		}
	}
	return false
}

// processCgroup is pid's cgroup v2 path.
func processCgroup(procRoot string, pid int) (string, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", fmt.Errorf("reading the cgroup of pid %d: %w", pid, err)
	}
	if p := discover.ParseCgroup(string(b)); p != "" {
		return p, nil
	}
	return "", fmt.Errorf("pid %d is in no cgroup v2 (its /proc/%d/cgroup has no 0:: line)", pid, pid)
}

// scopeOf is the machine scope at the top of cgroup path p — slices, then
// machine-….scope — or "" if p has none.
func scopeOf(p string) string {
	parts := strings.Split(strings.Trim(p, "/"), "/")
	for i, c := range parts {
		if strings.HasSuffix(c, ".slice") {
			continue
		}
		if i > 0 && strings.HasPrefix(c, "machine-") && strings.HasSuffix(c, ".scope") {
			return "/" + strings.Join(parts[:i+1], "/")
		}
		return ""
	}
	return ""
}

// machineName is the machine a scope unit is named after: machine-NAME.scope
// with NAME systemd-escaped (`-` is `\x2d`).
func machineName(unit string) string {
	s := strings.TrimSuffix(strings.TrimPrefix(unit, "machine-"), ".scope")
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && s[i+1] == 'x' {
			if v, err := strconv.ParseUint(s[i+2:i+4], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	b, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(b) != 16 {
		return u, fmt.Errorf("libvirt's record has no valid <uuid> (%q)", s)
	}
	copy(u[:], b)
	return u, nil
}

func (g *guest) dir(p string) string { return filepath.Join(g.o.CgroupRoot, filepath.Clean("/"+p)) }

// capture reads every cgroup of the scope's subtree and the processes in it.
func (g *guest) capture(context.Context) error {
	g.procs = map[int]string{}
	var dirs []string
	err := filepath.WalkDir(g.dir(g.scope), func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, g.o.CgroupRoot), "/")
		dirs = append(dirs, rel)
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return err
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				g.procs[pid] = rel
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("reading cgroup %s: %w", g.scope, err)
	}
	var chains [][]manifest.Cgroup
	for _, d := range dirs {
		ch, err := cgroupv2.Capture(g.o.CgroupRoot, d)
		if err != nil {
			return err
		}
		chains = append(chains, ch)
	}
	for _, c := range cgroupv2.Merge(chains...) {
		if c.Path == g.scope || strings.HasPrefix(c.Path, g.scope+"/") {
			g.tree = append(g.tree, c)
		}
	}
	if g.procs[g.status.PID] == "" {
		return fmt.Errorf("QEMU pid %d is not in its scope %s", g.status.PID, g.scope)
	}
	return nil
}

// move writes pid into the cgroup at path (all its threads go with it).
func (g *guest) move(pid int, path string) error {
	if err := os.WriteFile(filepath.Join(g.dir(path), "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("moving pid %d into cgroup %s: %w", pid, path, err)
	}
	return nil
}

// park moves the scope's processes out of it, QEMU first.
func (g *guest) park(context.Context) error {
	if err := os.Mkdir(g.dir(parkDir), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("creating cgroup /%s: %w", parkDir, err)
	}
	for _, pid := range g.order() {
		if err := g.move(pid, "/"+parkDir); err != nil {
			return err
		}
	}
	return nil
}

// unpark returns every process to its cgroup.
func (g *guest) unpark(context.Context) error {
	var errs []error
	for _, pid := range g.order() {
		errs = append(errs, g.move(pid, g.procs[pid]))
	}
	return errors.Join(errs...)
}

// order is the scope's processes, QEMU first.
func (g *guest) order() []int {
	out := []int{g.status.PID}
	for pid := range g.procs {
		if pid != g.status.PID {
			out = append(out, pid)
		}
	}
	sort.Ints(out[1:])
	return out
}

// clear removes the scope's (now empty) cgroups, deepest first, so that
// systemd makes the scope afresh around the QEMU.
func (g *guest) clear(context.Context) error {
	for i := len(g.tree) - 1; i >= 0; i-- {
		if err := os.Remove(g.dir(g.tree[i].Path)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing cgroup %s: %w", g.tree[i].Path, err)
		}
	}
	return nil
}

// remake puts the scope's cgroups back as they were.
func (g *guest) remake(context.Context) error { return cgroupv2.Apply(g.o.CgroupRoot, g.tree) }

func (g *guest) create(ctx context.Context, unit string) error {
	uuid, err := parseUUID(g.status.UUID)
	if err != nil {
		return err
	}
	// As libvirt 11.3 creates it (virSystemdCreateMachine), but for its
	// After=libvirtd.service: the scope's start would wait for the daemon,
	// which waits for this (seen: the three jobs waiting on each other).
	// That ordering only makes the scope stop before the daemon at
	// shutdown; Before=virt-guest-shutdown.target, which stops guests
	// first, is kept.
	return g.o.Machined.Create(ctx, machined.Machine{
		Name: machineName(unit), UUID: uuid, Service: "libvirt-qemu", Class: "vm", Leader: g.status.PID,
		Slice:  filepath.Base(filepath.Dir(g.scope)),
		Before: []string{"virt-guest-shutdown.target"},
	})
}

// rebuild makes the cgroups below the new scope again, returns each process
// to its own, then enables their controllers and writes their limits (a
// cgroup may enable controllers for its children only once it holds no
// process itself).
func (g *guest) rebuild(context.Context) error {
	for _, c := range g.tree {
		if err := os.MkdirAll(g.dir(c.Path), 0o755); err != nil {
			return fmt.Errorf("creating cgroup %s: %w", c.Path, err)
		}
	}
	for _, pid := range g.order() {
		if err := g.move(pid, g.procs[pid]); err != nil {
			return err
		}
	}
	return cgroupv2.Apply(g.o.CgroupRoot, g.tree)
}

// check reads it all back: machined's unit for the QEMU, each process's
// cgroup, the controllers and limits.
func (g *guest) check(ctx context.Context, unit string) error {
	got, err := g.o.Machined.Unit(ctx, g.status.PID)
	if err != nil {
		return err
	}
	if got != unit {
		return fmt.Errorf("systemd-machined has the QEMU in unit %q, want %q", got, unit)
	}
	var errs []error
	for pid, want := range g.procs {
		if p, err := processCgroup(g.o.ProcRoot, pid); err != nil || p != want {
			errs = append(errs, fmt.Errorf("pid %d is in cgroup %q (%v), was in %q", pid, p, err, want))
		}
	}
	if _, err := cgroupv2.Verify(g.o.CgroupRoot, g.tree); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
