// Package manifest is the one contract between the two sides of a live
// update: what the saving side recorded about every guest, read by the side
// that restores them (a restarted QEMU, or PID 1 after kexec).
//
// It is data only: the types (the guests, and the host network and cgroups
// PID 1 rebuilds for them), the boot record PID 1 writes next to it after
// the kexec (Boot, boot.go), their schema versions, validation, strict
// decoding and atomic writing — no behaviour on the host. The packages that
// act (netsetup, cgroupv2, hoststate, cpr) import it, never the other way
// round.
// Nothing else writes a manifest. A manifest is written as temp file,
// fsync, rename, fsync of the directory, with mode 0600, so a crash leaves
// either the old or the new manifest, never a torn one.
package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/crossclock"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// SchemaVersion is the version this code writes and the only one it reads.
const SchemaVersion = 1

// FileName is the manifest's name inside the state directory.
const FileName = "manifest.json"

// Manifest records one save of a set of guests.
type Manifest struct {
	Schema   int           `json:"schema"`
	ID       string        `json:"id"` // unique per run
	Created  time.Time     `json:"created"`
	Host     Host          `json:"host"`
	StateDir hostpath.QEMU `json:"state_dir"`
	VMs      []VM          `json:"vms"`
	Phases   []Phase       `json:"phases,omitempty"`

	// What PID 1 rebuilds after kexec before it starts the QEMUs: the
	// cgroup v2 tree holding them and their host-side network.
	Cgroups []Cgroup `json:"cgroups,omitempty"`
	Network Network  `json:"network,omitzero"`

	// KexecClock carries time across the kexec (update only).
	KexecClock *KexecClock `json:"kexec_clock,omitempty"`
	// Remounted are the filesystems the update made read-only before its
	// last manifest write (PMEM follows): recover makes them writable
	// again if the update died before its kexec.
	Remounted []string `json:"remounted,omitempty"`
	// LUO is the kernel's Live Update Orchestrator session holding the
	// guests' memfd RAM across the kexec (update only; nil: none). Each
	// such fd's token is in its VM's Fds.
	LUO *LUOSession `json:"luo,omitempty"`
}

// LUOSession names the LUO session of an update: the new kernel hands it
// back to whoever asks for it by this name.
type LUOSession struct {
	Name string `json:"name"`
}

// KexecClock lets the new kernel's PID 1 measure the time since the kexec
// and put its wall clock right (see package crossclock).
type KexecClock struct {
	Start crossclock.Stamp `json:"start"`  // when the update was planned
	Kexec crossclock.Stamp `json:"kexec"`  // just before the reboot
	TSCHz float64          `json:"tsc_hz"` // calibrated between the two; 0 if unknown
}

// Host identifies the machine and kernel that wrote the manifest.
type Host struct {
	Hostname string `json:"hostname"`
	Kernel   string `json:"kernel"`
	BootID   string `json:"boot_id"`
}

// Status is where a guest is in the save/restore cycle.
type Status string

// The statuses a VM goes through. Only "running" means nothing is left to do.
const (
	StatusPlanned  Status = "planned"  // recorded, not yet saved
	StatusSaved    Status = "saved"    // state file complete; old QEMU may still live
	StatusQuit     Status = "quit"     // old QEMU gone; must be restored
	StatusRunning  Status = "running"  // restored (or resumed) and confirmed running
	StatusFailed   Status = "failed"   // restore failed; state and RAM files kept
	StatusResumed  Status = "resumed"  // save rolled back, old QEMU continued
	StatusRestored Status = "restored" // new QEMU loaded state; not yet confirmed running
)

// Migration is the part of a QEMU's migration set-up that CPR changes.
type Migration struct {
	Mode         string          `json:"mode"`         // migrate-set-parameters "mode"
	Capabilities map[string]bool `json:"capabilities"` // by name: x-ignore-shared, events
}

// VM is everything needed to start a saved guest again.
type VM struct {
	Name   string        `json:"name"`
	PID    int           `json:"pid"`
	Binary hostpath.QEMU `json:"binary"` // QEMU executable of the saved process
	// Code are the files the old QEMU ran code from (its binary, shared
	// libraries and QEMU modules), as QEMU sees them: after a kexec the
	// page cache is empty, and PID 1 reads them ahead while it builds the
	// host, so that the new QEMU's start-up does not wait for the disk.
	Code        []hostpath.QEMU `json:"code,omitempty"`
	Argv        []string        `json:"argv"`         // as the saved process was started
	RestartArgv []string        `json:"restart_argv"` // rewritten: -incoming defer, fds renumbered, machine pinned
	Cwd         hostpath.QEMU   `json:"cwd"`
	Env         []string        `json:"env"`
	UID         uint32          `json:"uid"`
	GID         uint32          `json:"gid"`
	Groups      []uint32        `json:"groups,omitempty"`
	Cgroup      string          `json:"cgroup,omitempty"` // cgroup v2 path, e.g. /machine.slice/vm1.scope
	NetNS       string          `json:"netns,omitempty"`  // named network namespace (/run/netns/X) if not the host's
	// Hierarchies is the old QEMU's /proc/PID/cgroup, one line per
	// hierarchy: on a cgroup v1 or hybrid host the new QEMU joins each
	// (a restart on the same boot; after a kexec PID 1 builds v2 only).
	Hierarchies []string `json:"hierarchies,omitempty"`
	// Placement is where the old QEMU's threads ran beyond what its
	// command line says (nil: nowhere special).
	Placement *Placement `json:"placement,omitempty"`

	QMP         hostpath.QEMU            `json:"qmp"` // QMP unix socket path
	MachineType string                   `json:"machine_type"`
	QEMUVersion string                   `json:"qemu_version"`
	RAM         []qemuargv.MemoryBackend `json:"ram"`
	Fds         []Fd                     `json:"fds,omitempty"`

	Agent hostpath.QEMU `json:"agent,omitempty"` // host side of the guest agent's channel
	// Clock says what became of the guest's clock after restore:
	// "corrected", "no guest agent", or "not corrected: …".
	Clock string `json:"clock,omitempty"`
	// ClockOffset is the guest's clock minus the host's, read back through
	// the agent just after it was corrected.
	ClockOffset time.Duration `json:"clock_offset_ns,omitempty"`

	CopyRAM    bool          `json:"copy_ram,omitempty"` // RAM is in the state file (no x-ignore-shared)
	StateFile  hostpath.QEMU `json:"state_file"`
	StateSize  int64         `json:"state_size,omitempty"`
	WasRunning bool          `json:"was_running"` // resume after restore only if it ran before
	// Migration is the VM's own migration set-up before liveupdate set
	// cpr-reboot's; the QEMU that runs the guest afterwards gets it back, so
	// that its next migration (libvirt's, to another host) is not a
	// cpr-reboot that leaves shared RAM behind. Nil: QEMU's defaults.
	Migration *Migration `json:"migration,omitempty"`
	// TwinVNC is the VNC port the new QEMU, started early with -vnc none,
	// takes with display-update once the old QEMU is gone (nil: none).
	TwinVNC *qemuargv.VNCAddr `json:"twin_vnc,omitempty"`
	// Libvirt is libvirt's record of the guest when libvirt manages it.
	Libvirt *Libvirt `json:"libvirt,omitempty"`
	// Transfer, when set, is a restart-qemu by QEMU's cpr-transfer: the
	// device state goes to the new QEMU over a socket and the RAM's fds
	// over another, and StateFile holds only a note (its .done rename
	// still marks the state consumed). Nil: cpr-reboot through StateFile.
	Transfer *Transfer `json:"transfer,omitempty"`

	Status  Status    `json:"status"`
	Error   string    `json:"error,omitempty"`
	Stopped time.Time `json:"stopped,omitzero"` // old QEMU's STOP event
	Resumed time.Time `json:"resumed,omitzero"` // new QEMU's RESUME event
	NewPID  int       `json:"new_pid,omitempty"`
}

// Transfer is where a cpr-transfer's two channels listen: the new QEMU's
// -incoming main (device state) and cpr (the RAM's fds) unix sockets; and
// the new QEMU's run trace, whose "(running)" line says it ran the guest
// (qemuproc.StartedGuest): from then on the old QEMU's device state is
// behind the guest's RAM and it is never continued.
type Transfer struct {
	Main  hostpath.QEMU `json:"main"`
	CPR   hostpath.QEMU `json:"cpr"`
	Trace hostpath.QEMU `json:"trace,omitempty"`
}

// Blackout is RESUME − STOP, or 0 when either is unknown.
func (v VM) Blackout() time.Duration {
	if v.Stopped.IsZero() || v.Resumed.IsZero() {
		return 0
	}
	return v.Resumed.Sub(v.Stopped)
}

// Placement is where a QEMU's threads ran, set after its start by whoever
// manages it: the CPUs they may run on (libvirt's <emulatorpin> and
// <vcpupin>, taskset), their scheduling (libvirt's <emulatorsched> and
// <vcpusched>, renice, chrt) and the cgroups of each vCPU thread
// (libvirt's …/vcpuN). The new QEMU's threads are put back there.
type Placement struct {
	CPUs  []int               `json:"cpus,omitempty"`  // the main thread's: every new thread's
	Sched *Sched              `json:"sched,omitempty"` // the main thread's: every thread's but the vCPUs'
	Vcpus map[int]ThreadPlace `json:"vcpus,omitempty"` // by vCPU index (query-cpus-fast cpu-index)
}

// ThreadPlace is one thread's CPUs and scheduling and, where they differ
// from its process's, its cgroups (/proc/PID/task/TID/cgroup lines).
type ThreadPlace struct {
	CPUs        []int    `json:"cpus,omitempty"`
	Sched       *Sched   `json:"sched,omitempty"`
	Hierarchies []string `json:"hierarchies,omitempty"`
}

// Sched is a thread's scheduling (sched_getattr): its policy (0 normal,
// 1 FIFO, 2 round-robin, 3 batch, 5 idle), its real-time priority and its
// nice value.
type Sched struct {
	Policy   uint32 `json:"policy"`
	Priority uint32 `json:"priority,omitempty"`
	Nice     int32  `json:"nice,omitempty"`
}

// Libvirt is libvirt's runtime record of a guest it manages: rewritten
// for the QEMU that runs the guest after the run, before libvirt's daemon
// starts again (which would otherwise take the guest for stopped and
// remove its memory-backing directory).
type Libvirt struct {
	Status hostpath.QEMU `json:"status"` // /run/libvirt/qemu/NAME.xml
	// Record is the status file's contents at the save: /run is tmpfs, so
	// after a kexec it is put back from here.
	Record string `json:"record"`
}

// Fd is an inherited file descriptor the restarted QEMU must be given, at
// number Num of its RestartArgv.
type Fd struct {
	Num  int             `json:"num"`
	Kind qemuargv.FdKind `json:"kind"`
	// Tap: the tap device's name, its TUN flags (IFF_*), and whether it
	// was persistent before we made it so for the restart.
	TapName    string `json:"tap_name,omitempty"`
	TapFlags   uint16 `json:"tap_flags,omitempty"`
	TapPersist bool   `json:"tap_persist,omitempty"`
	// Chardev: the unix socket path a listening socket was bound to.
	SocketPath hostpath.QEMU `json:"socket_path,omitempty"`
	// File (an -add-fd set's): the file and its open(2) flags, to open it
	// again the same way after a kexec (a restart hands the very file over).
	Path  hostpath.QEMU `json:"path,omitempty"`
	Flags int           `json:"flags,omitempty"`
	// Memfd (guest RAM its QEMU opened through this fd): the memory
	// backend, the memfd's size, and the token under which the update's
	// LUO session keeps it across the kexec (0: none, as in a restart,
	// which hands the very memfd over).
	Backend string `json:"backend,omitempty"`
	Size    int64  `json:"size,omitempty"`
	Token   uint64 `json:"luo_token,omitempty"`
}

// Phase is one timed step of a run.
type Phase struct {
	Name  string    `json:"name"`
	VM    string    `json:"vm,omitempty"`
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	Error string    `json:"error,omitempty"`
}

// Validate checks the manifest is complete and self-consistent, and that
// every file it names lies inside stateDir or one of allowedRoots (the
// mounts guest RAM may live on). An empty allowedRoots skips the RAM check.
func (m *Manifest) Validate(allowedRoots ...string) error {
	if m.Schema != SchemaVersion {
		return fmt.Errorf("manifest schema %d, this liveupdate reads %d: restore with the liveupdate that wrote it", m.Schema, SchemaVersion)
	}
	if !filepath.IsAbs(string(m.StateDir)) {
		return fmt.Errorf("manifest state_dir %q is not an absolute path", m.StateDir)
	}
	for _, c := range m.Cgroups {
		if !filepath.IsAbs(c.Path) || filepath.Clean(c.Path) != c.Path {
			return fmt.Errorf("manifest cgroup %q is not a clean absolute path", c.Path)
		}
		for f := range c.Limits {
			if !slices.Contains(LimitFiles, f) {
				return fmt.Errorf("manifest cgroup %s: %q is not a limit liveupdate writes", c.Path, f)
			}
		}
	}
	for _, t := range m.Network.Taps {
		if t.Name == "" || len(t.Name) > 15 || strings.ContainsAny(t.Name, "/ ") {
			return fmt.Errorf("manifest tap %q: not an interface name", t.Name)
		}
	}
	for _, b := range m.Network.Bridges {
		if b.Name == "" || len(b.Name) > 15 || strings.ContainsAny(b.Name, "/ ") {
			return fmt.Errorf("manifest bridge %q: not an interface name", b.Name)
		}
	}
	names := map[string]bool{}
	for i, v := range m.VMs {
		where := fmt.Sprintf("manifest vm %d (%q)", i, v.Name)
		if err := CheckVMName(v.Name); err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if names[v.Name] {
			return fmt.Errorf("%s: duplicate name", where)
		}
		names[v.Name] = true
		if len(v.RestartArgv) == 0 {
			return fmt.Errorf("%s: empty restart_argv", where)
		}
		if _, err := qemuargv.Parse(v.RestartArgv); err != nil {
			return fmt.Errorf("%s: restart_argv: %w", where, err)
		}
		if !Within(string(v.StateFile), string(m.StateDir)) {
			return fmt.Errorf("%s: state_file %q is outside the state directory %s", where, v.StateFile, m.StateDir)
		}
		if !filepath.IsAbs(string(v.QMP)) {
			return fmt.Errorf("%s: qmp socket %q is not an absolute path", where, v.QMP)
		}
		if len(allowedRoots) > 0 {
			for _, b := range v.RAM {
				if b.File() == "" {
					continue // a memfd, kept by its fd (Fds), not by a file
				}
				ok := false
				for _, r := range allowedRoots {
					ok = ok || Within(b.MemPath, r)
				}
				if !ok {
					return fmt.Errorf("%s: RAM backend %q file %q is outside %v", where, b.ID, b.MemPath, allowedRoots)
				}
			}
		}
		for _, f := range v.Fds {
			if f.Kind == qemuargv.FdMemfd && f.Token != 0 && m.LUO == nil {
				return fmt.Errorf("%s: fd %d of RAM backend %q has LUO token %d but the manifest names no LUO session", where, f.Num, f.Backend, f.Token)
			}
		}
		switch v.Status {
		case StatusPlanned, StatusSaved, StatusQuit, StatusRunning, StatusFailed, StatusResumed, StatusRestored:
		default:
			return fmt.Errorf("%s: unknown status %q", where, v.Status)
		}
	}
	return nil
}

// Within tells whether path p is dir or lies below it, lexically (no "..").
func Within(p, dir string) bool {
	if !filepath.IsAbs(p) || !filepath.IsAbs(dir) {
		return false
	}
	p, dir = filepath.Clean(p), filepath.Clean(dir)
	if p == dir {
		return true
	}
	return strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// Decode parses a manifest strictly (unknown fields are an error: a newer
// writer's data must not be silently dropped) and validates it.
func Decode(b []byte, allowedRoots ...string) (*Manifest, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("manifest does not parse: %w", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("manifest does not parse: trailing data after the JSON object")
	}
	if err := m.Validate(allowedRoots...); err != nil {
		return nil, err
	}
	return &m, nil
}

// Read reads and validates the manifest at path.
func Read(path string, allowedRoots ...string) (*Manifest, error) {
	if err := CheckPrivate(path); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	m, err := Decode(b, allowedRoots...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// Write writes m to path atomically and durably with mode 0600.
func Write(path string, m *Manifest) error {
	return WriteWith(path, m, WriteOptions{Durable: true})
}

// WriteUnsynced is Write without the fsyncs: as atomic for every process
// that reads it (the rename), but durable only once something syncs —
// the next Write, or the sync before a kexec. It is for a record made
// while guests are stopped, where each fsync (which also writes out every
// state file just saved) lengthens their blackout; a power cut then loses
// the guests anyway.
func WriteUnsynced(path string, m *Manifest) error {
	return WriteWith(path, m, WriteOptions{})
}

// WriteOptions say how WriteWith writes.
type WriteOptions struct {
	// Durable fsyncs the file before the rename and its directory after
	// (Write); without it the write is atomic only (WriteUnsynced).
	Durable bool
	// BeforeRename, if set, runs once the new manifest is complete in its
	// temp file, just before the rename (where an interrupted write leaves
	// the old manifest whole). Its error aborts the write. The CPR engine
	// puts a fault injection point here.
	BeforeRename func() error
}

// WriteWith writes m to path atomically with mode 0600, as o says. It sets
// m.Schema when unset.
func WriteWith(path string, m *Manifest, o WriteOptions) error {
	if m.Schema == 0 {
		m.Schema = SchemaVersion
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding manifest: %w", err)
	}
	b = append(b, '\n')
	return writeFileAtomic(path, b, 0o600, o.Durable, o.BeforeRename)
}

// WriteFileAtomic writes data to path through a temp file in the same
// directory: write, fsync, rename, fsync the directory.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	return writeFileAtomic(path, data, mode, true, nil)
}

// writeFileAtomic is WriteFileAtomic, its fsyncs optional, with a hook just
// before the rename (where an interrupted write leaves the old file whole).
func writeFileAtomic(path string, data []byte, mode os.FileMode, durable bool, beforeRename func() error) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if durable {
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("syncing %s: %w", path, err)
		}
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if beforeRename != nil {
		if err := beforeRename(); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming into %s: %w", path, err)
	}
	if !durable {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}

// CheckPrivate refuses a manifest (or state file) that someone else could
// have written: it must be a regular file — not a symlink — owned by this
// user (root), as must its directory, and neither may be group- or
// world-writable. A missing file passes (callers report that themselves).
func CheckPrivate(path string) error {
	euid := uint32(os.Geteuid())
	for _, p := range []string{filepath.Dir(path), path} {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil
			}
			return fmt.Errorf("checking %s: %w", p, err)
		}
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		switch {
		case p == path && st.Mode&unix.S_IFMT != unix.S_IFREG:
			return fmt.Errorf("%s is not a regular file (a symlink?): refusing it; put the real file there", p)
		case st.Uid != euid:
			return fmt.Errorf("%s is owned by uid %d, not by uid %d: refusing it (anyone who owns it could have changed it); chown it after checking it", p, st.Uid, euid)
		case st.Mode&0o022 != 0:
			want := "0600"
			if isDir {
				want = "0700"
			}
			return fmt.Errorf("%s is group- or world-writable (mode %04o): refusing it; chmod %s it after checking it", p, st.Mode&0o7777, want)
		}
	}
	return nil
}

// CheckBeneath resolves every file the manifest names that lies inside
// root (the PMEM mount) without leaving root — no symlink or ".." may lead
// out of it — through openat2(RESOLVE_BENEATH). Files that do not exist
// pass (the restore reports them).
//
// local is where the caller sees root (PID 1 sees the host's /mnt/pmem1 as
// /newroot/mnt/pmem1); it is root itself when the two views agree.
func (m *Manifest) CheckBeneath(root, local string) error {
	dir, err := unix.Open(local, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", local, err)
	}
	defer unix.Close(dir)
	for _, v := range m.VMs {
		paths := []string{string(v.StateFile)}
		for _, b := range v.RAM {
			paths = append(paths, b.File())
		}
		for _, p := range paths {
			if p == "" || !Within(p, root) {
				continue
			}
			rel, _ := filepath.Rel(root, p)
			fd, err := unix.Openat2(dir, rel, &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC,
				Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS})
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			if err != nil {
				return fmt.Errorf("%s (guest %s) does not resolve inside %s: %w; refusing to restore from a path that leads elsewhere", p, v.Name, root, err)
			}
			unix.Close(fd)
		}
	}
	return nil
}
