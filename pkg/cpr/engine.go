// Package cpr is the CPR engine: it saves running QEMUs' device state with
// QEMU's cpr-reboot migration mode (guest RAM stays in place in shared
// memory-backend-files, x-ignore-shared), quits them, and starts them again
// from their preserved command lines, reloading the state.
//
// An Engine holds settings only. Each operation — Save, Restore,
// RestartQEMU, Recover — makes a run: that operation's manifest, the new
// QEMUs it started early, its lock. Save is a table of steps, each with its
// undo next to it (package phase):
//
//	prepare        record each VM, take over its fds   ↔ give taps back their persistence
//	manifest       write the manifest                  ↔ write it again (what the undos did)
//	early-start    new QEMUs beside the old ones       ↔ stop them, put the old sockets back
//	migrate-setup  capabilities and mode, all VMs      ↔ the VM's own set-up back
//	save           device state to the state files     ↔ cancel, cont on the old QEMU
//	saved          record the saves
//	quit           quit the old QEMUs                  (the way back is Restore)
//
// Any failure before quit undoes every step begun, so every VM runs on its
// old QEMU; a failure after quit leaves the VM's RAM and state files in
// place and recorded in the manifest, from which Restore (or Recover) can
// be run again.
//
// Paths: the manifest and QEMU's command line hold paths as the guest's
// QEMU sees them (hostpath.QEMU); the engine opens them as it sees them
// (hostpath.Local), through Root.
package cpr

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/reaper"
	"github.com/liveupdate/liveupdate/pkg/rtboost"
)

// Engine carries the settings of the CPR engine. It holds nothing of any
// one run, so one Engine may run any number of operations, one after the
// other.
type Engine struct {
	StateDir hostpath.QEMU // where state files and the manifest go
	ProcRoot string        // "/proc"
	// Root is the directory QEMU runs chrooted in ("" or "/": none). PID 1
	// after kexec runs the host's QEMU from the mounted host root; every
	// path in the manifest is QEMU's view, inside Root.
	Root hostpath.Root
	// Reaper, when set, is the reaper of the process we run as (PID 1):
	// the QEMUs the engine starts are waited for through it, so that no
	// exit status is lost to it. nil: an ordinary process.
	Reaper *reaper.Reaper
	Log    *slog.Logger // never nil after New

	QMPTimeout     time.Duration // connect + each query during planning
	SaveTimeout    time.Duration // one VM's migrate to file
	QuitTimeout    time.Duration // old QEMU to exit after quit
	RestoreTimeout time.Duration // new QEMU start → running
	ClockTimeout   time.Duration // one guest's clock fix through its agent

	// ClockAsync: Restore returns once the guests run, and their clocks
	// are corrected afterwards (PID 1 must not wait for slow agents);
	// WaitClocks waits for those fixes.
	ClockAsync bool
	clockFixes sync.WaitGroup

	// MarkDir is where a loaded state file is marked consumed inside the
	// blackout (statefile.go), on tmpfs: "" renames the file instead.
	MarkDir string

	// NoRealtime keeps every thread at the scheduling it has: the threads
	// a guest's blackout waits on are not raised to real-time priority for
	// it (realtime.go).
	NoRealtime bool
}

// WaitClocks waits until the clock fixes ClockAsync left running are done,
// or ctx ends (false). PID 1 waits before it execs the host's init, which
// would end them half-way.
func (e *Engine) WaitClocks(ctx context.Context) bool {
	done := make(chan struct{})
	go func() { e.clockFixes.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

// New returns an engine with default timeouts.
func New(stateDir hostpath.QEMU, log *slog.Logger) *Engine {
	if log == nil {
		log = slog.Default()
	}
	return &Engine{
		StateDir: stateDir, ProcRoot: "/proc", Log: log, MarkDir: DefaultMarkDir,
		QMPTimeout: 5 * time.Second, SaveTimeout: 120 * time.Second,
		QuitTimeout: 20 * time.Second, RestoreTimeout: 120 * time.Second,
		ClockTimeout: ClockFixTimeout,
	}
}

// DefaultMarkDir is where consumed state files are marked inside the
// blackout (Engine.MarkDir): tmpfs on every systemd host, and in PID 1.
const DefaultMarkDir = "/run/liveupdate/consumed"

// ClockFixTimeout is the default bound on putting one guest's clock right
// after restore (Engine.ClockTimeout).
const ClockFixTimeout = 3 * time.Minute

// run is the state of one operation: its manifest, its phases, the new
// QEMUs it started early. Only the engine's operations make and use one.
type run struct {
	*Engine                // the settings, read only
	stateDir hostpath.QEMU // the run's: the engine's, or the manifest's

	mu      sync.Mutex // guards man (VMs updated by parallel phases), pending, early and the writes
	man     *manifest.Manifest
	written bool                // the manifest is on disk (Save's first write done)
	pending []manifest.Phase    // phases timed before the manifest was made
	early   map[string]*newQEMU // new QEMUs started before the save, by VM (early.go)
	exited  map[string]bool     // VMs whose old QEMU this run saw exit (quit)
	// clockLater: the restores leave the guests' clocks to fixClocks, run
	// once the old QEMUs are retired — a slow guest agent (a minute after a
	// fresh boot, seen) must not keep an old QEMU, and the VNC port it
	// holds, alive meanwhile.
	clockLater bool
	clockDue   []*manifest.VM
	// realtime: this run raises the threads a guest's blackout waits on
	// (realtime.go) — a restart-qemu, whose guests' saves and loads
	// compete with running guests for the CPUs; self holds ours, raised
	// from the first save to the last cont.
	realtime bool
	self     *rtboost.Raised
	rtWarn   sync.Once
}

// keepsRAM tells whether the kernel keeps guests' memfd RAM across this
// run's kexec (SaveOptions.KeepRAM: the manifest names its LUO session);
// the old QEMUs of such guests are then not quit: paused, they hold the
// RAM until the kexec ends them.
func (r *run) keepsRAM() bool { return r.man != nil && r.man.LUO != nil }

// newRun starts a run in the engine's state directory.
func (e *Engine) newRun() *run {
	return &run{Engine: e, stateDir: e.StateDir, early: map[string]*newQEMU{}, exited: map[string]bool{}}
}

// runOn starts a run on an existing manifest (restore, recover).
func (e *Engine) runOn(m *manifest.Manifest) *run {
	r := e.newRun()
	r.man, r.stateDir = m, m.StateDir
	return r
}

// sawExit tells whether this run saw the VM's old QEMU exit.
func (r *run) sawExit(name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.exited[name]
}

// hasEarly tells whether the VM has a new QEMU started early (its twin maps
// the same RAM by design).
func (r *run) hasEarly(name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.early[name] != nil
}

// Target is one VM the engine works on: the live process, its QMP
// connection, and its verdict.
type Target struct {
	Proc    *discover.Process
	QMP     *qmp.Client // nil if unreachable
	Facts   preflight.Facts
	Verdict preflight.Verdict
	NetNS   string // named netns to start the new QEMU in ("" = ours)
	Libvirt string // libvirt's status file naming this QEMU, as we see it ("" = not libvirt's)

	rec   *manifest.VM
	files map[int]*os.File // fds taken from the old QEMU, by their new number
	early bool             // its new QEMU was started before the save (early.go)
	dying *qemuproc.Handle // the old QEMU once killed (early start), else nil
	// forward: a rollback found its guest handed over to its new QEMU by
	// cpr-transfer and finished its restart there (rollForward); the undos
	// leave it alone.
	forward bool
	// ramFd: its RAM is a memfd its QEMU inherited (FdMemfd), which dies
	// with its last holder: the old QEMU is quit only once another QEMU
	// holds it.
	ramFd bool
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

// CloseMonitor releases the target's QMP connection alone, keeping its held
// files: QEMU's monitor takes one client at a time, and a Recover of a
// guest whose old QEMU still runs (its RAM's holder) dials it anew.
func (t *Target) CloseMonitor() {
	if t.QMP != nil {
		t.QMP.Close()
		t.QMP = nil
	}
}

// Files returns the fds held for the VM (by their number in the new QEMU).
func (t *Target) Files() map[int]*os.File { return t.files }

// CloseAll releases the targets' QMP connections and held files.
func CloseAll(ts []*Target) {
	for _, t := range ts {
		t.Close()
	}
}

// Held are the fds the targets hold from their old QEMUs, by VM name and
// new fd number: what Restore and Recover pass on instead of re-creating.
func Held(ts []*Target) map[string]map[int]*os.File {
	held := map[string]map[int]*os.File{}
	for _, t := range ts {
		held[t.Name()] = t.files
	}
	return held
}

// local is a path of the manifest or of QEMU's command line as we see it.
func (r *run) local(p hostpath.QEMU) string { return string(r.Root.Local(p)) }

// localIn resolves a path of the VM's command line (relative to its
// QEMU's working directory) as we see it.
func (r *run) localIn(vm *manifest.VM, p string) string {
	return string(r.Root.Local(hostpath.Arg(vm.Cwd, p)))
}

// timed runs fn as a named phase of the run and records it.
func (r *run) timed(name, vm string, fn func() error) error {
	start := time.Now()
	err := fn()
	r.record(name, vm, start, time.Now(), err)
	return err
}

// timedPoint is timed, then the fault point of the same name: for the
// per-VM phases that are boundaries of their own (qemu-start, load, cont).
func (r *run) timedPoint(name, vm string, fn func() error) error {
	err := r.timed(name, vm, fn)
	if err == nil {
		err = fault.AtFor(name, vm)
	}
	return err
}

// record adds one phase to the run's manifest (or keeps it until the
// manifest is made).
func (r *run) record(name, vm string, start, end time.Time, err error) {
	ph := manifest.Phase{Name: name, VM: vm, Start: start, End: end}
	if err != nil {
		ph.Error = err.Error()
	}
	r.mu.Lock()
	if r.man != nil {
		r.man.Phases = append(r.man.Phases, ph)
	} else {
		r.pending = append(r.pending, ph)
	}
	r.mu.Unlock()
}

// write writes the run's manifest into its state directory.
func (r *run) write() error { return r.writeWith(true) }

// rewrite writes the manifest again if it was written before: a rollback
// records what it did.
func (r *run) rewrite() error {
	if !r.written {
		return nil
	}
	return r.write()
}

// writeUnsynced records the manifest without waiting for the disk
// (manifest.WriteUnsynced), for records made inside the guests' blackout.
func (r *run) writeUnsynced() error { return r.writeWith(false) }

// writeWith writes the manifest, durably or not, with the fault point
// "manifest-write" just before its rename.
func (r *run) writeWith(durable bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return manifest.WriteWith(r.local(hostpath.Join(r.stateDir, manifest.FileName)), r.man,
		manifest.WriteOptions{Durable: durable, BeforeRename: func() error { return fault.At("manifest-write") }})
}

// makeManifest starts the run's manifest, with the phases timed so far.
func (r *run) makeManifest(prior []manifest.Phase) {
	host, _ := os.Hostname()
	var uts unix.Utsname
	unix.Uname(&uts)
	now := time.Now()
	m := &manifest.Manifest{
		Schema:   manifest.SchemaVersion,
		ID:       fmt.Sprintf("%s-%d", now.UTC().Format("20060102T150405Z"), os.Getpid()),
		Created:  now,
		StateDir: r.stateDir,
		Host: manifest.Host{Hostname: host, Kernel: unix.ByteSliceToString(uts.Release[:]),
			BootID: currentBootID()},
		VMs: []manifest.VM{},
	}
	r.mu.Lock()
	m.Phases = append(append(prior, r.pending...), m.Phases...)
	r.pending = nil
	r.man = m
	r.mu.Unlock()
}

func currentBootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
