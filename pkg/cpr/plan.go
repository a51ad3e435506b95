// Package cpr is the CPR engine: it saves running QEMUs' device state with
// QEMU's cpr-reboot migration mode (guest RAM stays in place in shared
// memory-backend-files, x-ignore-shared), quits them, and starts them again
// from their preserved command lines, reloading the state.
//
// The engine's phases, each with its inverse:
//
//	Plan       discover QEMUs, ask QMP, preflight   (no inverse: touches nothing)
//	Save       migrate to a state file, all VMs     ↔ Resume (cont on the old QEMU)
//	Quit       quit the old QEMUs                   ↔ Restore
//	Restore    start new QEMUs, load state, cont
//
// Any failure during Save resumes every VM on its old QEMU; a failure after
// Quit leaves the VM's RAM and state files in place and recorded in the
// manifest, from which Restore can be run again.
package cpr

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Engine carries the settings of one run.
type Engine struct {
	StateDir string // where state files and the manifest go, as QEMU sees it
	ProcRoot string // "/proc"
	// Root is the directory QEMU runs chrooted in ("" or "/": none). PID 1
	// after kexec runs the host's QEMU from the mounted host root; every
	// path in the manifest is relative to Root.
	Root string
	// OnStart, if set, is told the pid of every QEMU the engine starts
	// (PID 1's reaper leaves those to the engine).
	OnStart func(pid int)
	Log     *slog.Logger // never nil after New

	QMPTimeout     time.Duration // connect + each query during planning
	SaveTimeout    time.Duration // one VM's migrate to file
	QuitTimeout    time.Duration // old QEMU to exit after quit
	RestoreTimeout time.Duration // new QEMU start → running
	ClockTimeout   time.Duration // one guest's clock fix through its agent

	// ClockAsync: Restore returns once the guests run, and their clocks
	// are corrected afterwards (PID 1 must not wait for slow agents).
	ClockAsync bool
	clocks     sync.WaitGroup

	mu      sync.Mutex // guards man, pending and the manifest's writes
	man     *manifest.Manifest
	pending []manifest.Phase    // phases timed before Save created the manifest
	early   map[string]*newQEMU // new QEMUs started before the save, by VM (early.go)
}

// New returns an engine with default timeouts.
func New(stateDir string, log *slog.Logger) *Engine {
	if log == nil {
		log = slog.Default()
	}
	return &Engine{
		StateDir: stateDir, ProcRoot: "/proc", Log: log,
		QMPTimeout: 5 * time.Second, SaveTimeout: 120 * time.Second,
		QuitTimeout: 20 * time.Second, RestoreTimeout: 120 * time.Second,
		ClockTimeout: ClockFixTimeout,
		early:        map[string]*newQEMU{},
	}
}

// Target is one VM the engine works on: the live process, its QMP
// connection, and its verdict.
type Target struct {
	Proc    *discover.Process
	QMP     *qmp.Client // nil if unreachable
	Facts   preflight.Facts
	Verdict preflight.Verdict
	NetNS   string // named netns to start the new QEMU in ("" = ours)

	rec   *manifest.VM
	files map[int]*os.File // fds taken from the old QEMU, by their new number
	early bool             // its new QEMU was started before the save (early.go)
	dying int              // pidfd of the old QEMU once killed (early start), else 0
}

// Name is the VM's name.
func (t *Target) Name() string { return t.Proc.Name() }

// Close releases the QMP connection and any fds held for the VM.
func (t *Target) Close() {
	if t.QMP != nil {
		t.QMP.Close()
	}
	for _, f := range t.files {
		f.Close()
	}
	t.files = nil
}

// Plan discovers QEMU processes (all, or those named), connects to each one's
// QMP socket, gathers facts and gives a verdict. It changes nothing.
func (e *Engine) Plan(ctx context.Context, names []string) ([]*Target, error) {
	return e.plan(ctx, names, false)
}

// plan is Plan; twins allows two QEMUs of one name (recover looks for the
// new QEMU an interrupted restart started beside the old one).
func (e *Engine) plan(ctx context.Context, names []string, twins bool) ([]*Target, error) {
	procs, err := discover.All(e.ProcRoot)
	if err != nil {
		return nil, err
	}
	var sel []*discover.Process
	seen := map[string]bool{}
	for _, p := range procs {
		n := p.Name()
		if len(names) > 0 && !slices.Contains(names, n) && !slices.Contains(names, fmt.Sprint(p.PID)) {
			continue
		}
		if seen[n] && !twins {
			return nil, fmt.Errorf("two QEMU processes are both called %q: give each VM a unique -name (or, if a restart was interrupted, run 'liveupdate recover')", n)
		}
		seen[n] = true
		sel = append(sel, p)
	}
	for _, n := range names {
		found := false
		for _, p := range sel {
			found = found || p.Name() == n || fmt.Sprint(p.PID) == n
		}
		if !found {
			return nil, fmt.Errorf("no running QEMU is called %q (see 'liveupdate plan')", n)
		}
	}
	free := stateDirFree(e.HostPath(e.StateDir))
	ts := make([]*Target, len(sel))
	var wg sync.WaitGroup
	for i, p := range sel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := &Target{Proc: p}
			t.QMP, t.Facts = e.gatherFacts(ctx, p)
			var nsErr error
			t.NetNS, nsErr = tapdev.NamedNetNS(p.NetNS)
			t.Verdict = preflight.Check(preflight.Input{Proc: p, Facts: t.Facts, StateDir: e.HostPath(e.StateDir), StateDirFree: free,
				NetNSErr: nsErr, ProcRoot: filepath.Join(e.ProcRoot, fmt.Sprint(p.PID), "root")})
			ts[i] = t
		}()
	}
	wg.Wait()
	return ts, nil
}

func stateDirFree(dir string) uint64 {
	var st unix.Statfs_t
	for d := dir; ; d = filepath.Dir(d) {
		if unix.Statfs(d, &st) == nil {
			return st.Bavail * uint64(st.Bsize)
		}
		if d == "/" || d == "." {
			return 0
		}
	}
}

// gatherFacts connects to a QEMU's QMP socket and asks what preflight needs.
func (e *Engine) gatherFacts(ctx context.Context, p *discover.Process) (*qmp.Client, preflight.Facts) {
	var f preflight.Facts
	eps := p.Cmdline.QMPEndpoints()
	if len(eps) == 0 {
		f.QMPErr = fmt.Errorf("no QMP unix socket")
		return nil, f
	}
	ep := eps[0]
	f.QMPPath = ep.Path
	if ep.FD >= 0 {
		f.QMPPath = p.Fds[ep.FD].SocketPath
	}
	if f.QMPPath == "" {
		f.QMPErr = fmt.Errorf("cannot find the path of QMP socket fd %d", ep.FD)
		return nil, f
	}
	if !filepath.IsAbs(f.QMPPath) {
		f.QMPPath = filepath.Join(p.Cwd, f.QMPPath)
	}
	// Only a socket of our own user is trusted: whoever owns it could pose
	// as QEMU, and we would hand it guests' state.
	var sst unix.Stat_t
	if err := unix.Stat(e.HostPath(f.QMPPath), &sst); err == nil && sst.Uid != uint32(os.Geteuid()) {
		f.QMPErr = fmt.Errorf("QMP socket %s is owned by uid %d, not by uid %d: not trusted", f.QMPPath, sst.Uid, os.Geteuid())
		return nil, f
	}
	cctx, cancel := context.WithTimeout(ctx, e.QMPTimeout)
	defer cancel()
	c, err := qmp.Dial(cctx, e.HostPath(f.QMPPath))
	if err != nil {
		f.QMPErr = err
		return nil, f
	}
	fail := func(err error) (*qmp.Client, preflight.Facts) {
		c.Close()
		f.QMPErr = err
		return nil, f
	}
	var ver struct {
		QEMU    struct{ Major, Minor, Micro int } `json:"qemu"`
		Package string                            `json:"package"`
	}
	if err := c.Execute(cctx, "query-version", nil, &ver); err != nil {
		return fail(err)
	}
	f.Version = [3]int{ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro}
	f.Package = ver.Package
	if err := c.Execute(cctx, "qom-get", map[string]any{"path": "/machine", "property": "type"}, &f.MachineType); err != nil {
		return fail(err)
	}
	var st struct{ Status string }
	if err := c.Execute(cctx, "query-status", nil, &st); err != nil {
		return fail(err)
	}
	f.Status = st.Status
	if err := c.Execute(cctx, "query-memdev", nil, &f.Memdevs); err != nil {
		return fail(err)
	}
	return c, f
}

// Files returns the fds held for the VM (by their number in the new QEMU).
func (t *Target) Files() map[int]*os.File { return t.files }
