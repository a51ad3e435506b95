// Package preflight decides, per VM, whether a CPR save/restore can keep the
// guest alive, and says why not in words an operator can act on. It is a pure
// function of what discovery and QMP found, so every verdict is unit-tested.
package preflight

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// MinQEMU is the oldest QEMU with cpr-reboot.
var MinQEMU = [2]int{8, 2}

// StateReserve is the room the state directory must have per VM: device
// state is small (well under 1 MiB for a plain guest) but video RAM and
// ROMs that are not in a shared backend are written to it too.
const StateReserve = 64 << 20

// Memdev is one entry of QMP query-memdev.
type Memdev struct {
	ID    string `json:"id"`
	Size  uint64 `json:"size"`
	Share bool   `json:"share"`
}

// Facts is what QMP told about a running QEMU.
type Facts struct {
	QMPPath     string
	QMPErr      error // non-nil when QMP could not be reached
	Version     [3]int
	Package     string
	MachineType string // QOM type of /machine, e.g. "pc-i440fx-10.0-machine"
	Status      string // query-status "status"
	KVM         bool   // the guest runs under KVM (query-kvm "enabled")
	Memdevs     []Memdev
	// Fdsets are the files of -add-fd sets as QEMU holds them now
	// (query-fdsets): QEMU dups each fd it is given and closes the number
	// on its command line, which then means something else.
	Fdsets []FdsetFd
	// Runtime is QEMU's devices and block graph (nil: not asked, as in
	// tests that are not about them); RuntimeErr, why they could not be.
	Runtime    *Runtime
	RuntimeErr error
	// VNC is where QEMU's VNC server listens now (query-vnc), nil when it
	// does not: a QEMU started "-vnc none" and given its port later
	// (display-update, as liveupdate's early twins are) listens where its
	// command line does not say.
	VNC *qemuargv.VNCAddr
	// AnsweredBy is the pid of the QEMU whose monitor answered, told by
	// its vCPU threads, for a monitor passed by fd (0: not asked): two
	// QEMUs of one guest (an interrupted early start) accept on the same
	// listening socket, and either may answer a connection.
	AnsweredBy int
	// Vcpus is each vCPU's thread id (query-cpus-fast), by cpu-index.
	Vcpus map[int]int
}

// FdsetFd is one fd of an fdset, as QEMU holds it, with what it is.
type FdsetFd struct {
	Set    int    `json:"set"`
	Fd     int    `json:"fd"`
	Opaque string `json:"opaque,omitempty"`
	Target string `json:"target"` // readlink of /proc/PID/fd/Fd
	Flags  int    `json:"flags"`  // fdinfo flags
}

// FdsetFile is the fd QEMU holds now for the ref-th -add-fd of set (its
// order among the -add-fd options of that set, or its opaque when given).
func (f Facts) FdsetFile(set int, opaque string, nth int) (FdsetFd, bool) {
	var inSet []FdsetFd
	for _, x := range f.Fdsets {
		if x.Set == set {
			if opaque != "" && x.Opaque == opaque {
				return x, true
			}
			inSet = append(inSet, x)
		}
	}
	if opaque == "" && nth < len(inSet) {
		return inSet[nth], true
	}
	return FdsetFd{}, false
}

// Input is everything a verdict depends on.
type Input struct {
	Proc         *discover.Process
	Facts        Facts
	StateDir     string
	StateDirFree uint64 // bytes available to root in StateDir
	NetNSErr     error  // the VM's network namespace cannot be re-entered
	// ProcRoot is the process's root directory as this process sees it
	// (/proc/PID/root), through which its files are checked; "" means "/".
	ProcRoot string
	// Libvirt is libvirt's record of this QEMU (/run/libvirt/qemu/NAME.xml
	// naming its pid), "" when libvirt does not manage it.
	Libvirt string
	// LibvirtDaemons are the libvirt daemons running now (libvirt.Daemons).
	LibvirtDaemons []libvirt.Daemon
	// Maps is the process's /proc/PID/maps, by which a RAM file is known
	// to be the one QEMU maps ("": not checked).
	Maps string
	// MemNode finds the NUMA node of a RAM file's memory (nil: MemNode).
	MemNode func(local string) (node int, dev string, ok bool)
}

// Verdict is the answer for one VM.
type Verdict struct {
	VM       string   `json:"vm"`
	PID      int      `json:"pid"`
	OK       bool     `json:"ok"`
	Problems []string `json:"problems,omitempty"`
	// RAM is each memory backend and what keeps its RAM across a restart.
	RAM []Backend `json:"ram,omitempty"`
	// UpdateProblems refuse an update across kexec but not restart-qemu
	// (a memfd's RAM, which cpr-transfer hands over and a kexec loses).
	UpdateProblems []string `json:"update_problems,omitempty"`
	Notes          []string `json:"notes,omitempty"`
}

// Backend is one memory backend as plan reports it.
type Backend struct {
	ID string `json:"id"`
	// Kind: "file" (a shared file a new QEMU opens again: on PMEM for an
	// update), "memfd" (handed over by cpr-transfer only), or the backend
	// type QEMU was given (refused).
	Kind string `json:"kind"`
	Path string `json:"path,omitempty"` // mem-path, for a file
}

// path is where a file of the VM's command line is, as we see it: relative
// to QEMU's working directory, through the process's root.
func (in Input) path(p *discover.Process, f string) string {
	if !filepath.IsAbs(f) {
		f = filepath.Join(p.Cwd, f)
	}
	if in.ProcRoot != "" {
		f = filepath.Join(in.ProcRoot, f)
	}
	return f
}

// mappingProblem says, from the process's maps, whether the file now at
// mem-path (local, as we see it) is one QEMU maps: a RAM file deleted and
// made again under the same name (a clean-up script, a second guest's
// set-up) would give a new QEMU other RAM than the guest's. "" when it is
// mapped, or when maps is empty (not known).
func mappingProblem(b qemuargv.MemoryBackend, local, maps string) string {
	if maps == "" {
		return ""
	}
	var st unix.Stat_t
	if err := unix.Stat(local, &st); err != nil {
		return "" // ramFileProblem's to say
	}
	for _, l := range strings.Split(maps, "\n") {
		// address perms offset dev inode pathname
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		var major, minor uint32
		if _, err := fmt.Sscanf(f[3], "%x:%x", &major, &minor); err != nil {
			continue
		}
		if ino, err := strconv.ParseUint(f[4], 10, 64); err == nil && ino == st.Ino && ino != 0 &&
			major == unix.Major(st.Dev) && minor == unix.Minor(st.Dev) {
			return ""
		}
	}
	return fmt.Sprintf("QEMU does not map the file now at mem-path %s (device %d:%d, inode %d): the guest's RAM is another file, deleted or replaced after QEMU opened it, and a new QEMU would start on the wrong RAM. Nothing can bring that RAM back by name; keep the guest on its QEMU", b.MemPath, unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
}

// inheritedRAMProblem says why RAM QEMU opened through an inherited fd
// (mem-path=/proc/self/fd/N) cannot be handed on, or "" when it can: the
// fd must be a memfd of shared memory — the kind a restart hands to the
// new QEMU and an update has the kernel keep (LUO), found again by its
// token. Any other file has a name to give mem-path instead; a hugetlb
// memfd is one the kernel refuses to preserve.
func inheritedRAMProblem(p *discover.Process, b qemuargv.MemoryBackend) string {
	n := qemuargv.InheritedFd(b.MemPath)
	fi, ok := p.Fds[n]
	switch {
	case !ok || fi.Target == "":
		return fmt.Sprintf("mem-path %s names fd %d, which QEMU does not hold any more: its RAM cannot be found", b.MemPath, n)
	case !fi.Memfd():
		return fmt.Sprintf("mem-path %s is fd %d, %s, not a memfd: give mem-path the file's name instead, so that a new QEMU can open it again", b.MemPath, n, fi.Target)
	case fi.Hugetlb:
		return fmt.Sprintf("mem-path %s is fd %d, a hugetlb memfd (%s): the kernel's Live Update Orchestrator preserves only shmem memfds. Create the guest's memfd without MFD_HUGETLB", b.MemPath, n, fi.Target)
	}
	return ""
}

// ramFileProblem says why a backend's RAM could not be found again by its
// mem-path after its QEMU is gone, or "" when it can. local is mem-path as
// we see it.
func ramFileProblem(b qemuargv.MemoryBackend, local string) string {
	if b.MemPath == "" {
		return "has no mem-path: its RAM has no name to be found again by"
	}
	st, err := os.Stat(local)
	switch {
	case err != nil:
		return fmt.Sprintf("its RAM file %s cannot be found (%v): deleted while QEMU runs? Its RAM cannot be found again by name", b.MemPath, err)
	case st.IsDir():
		return fmt.Sprintf("mem-path %s is a directory: QEMU keeps the RAM in an unlinked file inside it (hugetlbfs' usual form), which no new QEMU can open again. Give mem-path a file name, e.g. mem-path=%s", b.MemPath, filepath.Join(b.MemPath, b.ID+".ram"))
	}
	// A regular file, or a device such as /dev/dax0.0: found again by name.
	return ""
}

// StateFile is where a VM's device state is saved.
func StateFile(stateDir, vm string) string { return filepath.Join(stateDir, vm+".state") }

// Check returns the verdict for one VM.
func Check(in Input) Verdict {
	p := in.Proc
	v := Verdict{VM: p.Name(), PID: p.PID}
	bad := func(format string, a ...any) { v.Problems = append(v.Problems, fmt.Sprintf(format, a...)) }
	note := func(format string, a ...any) { v.Notes = append(v.Notes, fmt.Sprintf(format, a...)) }
	c := p.Cmdline

	// The name becomes the VM's file names and its manifest key: the rule
	// the manifest is read back with after a kexec.
	if err := manifest.CheckVMName(p.Name()); err != nil {
		bad("%v", err)
	}

	// An option we do not know may have taken the next word as its value
	// or not: the rest of the command line cannot be trusted.
	for _, n := range c.UnknownOptions() {
		bad("-%s: an option liveupdate does not know; it cannot tell whether -%s takes a value, so it cannot read the rest of the command line nor restart the QEMU with it. Remove it from the VM's command line, or add it to pkg/qemuargv's option table", n, n)
	}

	// Guest RAM must survive the restart in place.
	ram, err := c.RAM()
	if err != nil {
		bad("cannot read the memory options: %v", err)
	}
	if ram.Implicit != "" {
		bad("guest RAM is %s: it would be lost. Back it with -object memory-backend-file,id=ID,share=on,mem-path=FILE and -machine memory-backend=ID (or -numa node,memdev=ID)", ram.Implicit)
	}
	argvIDs := map[string]bool{}
	for _, b := range ram.Backends {
		argvIDs[b.ID] = true
		switch b.Type {
		case "memory-backend-file":
			kind := "file"
			if qemuargv.InheritedFd(b.MemPath) >= 0 {
				kind = "memfd-fd"
			}
			v.RAM = append(v.RAM, Backend{ID: b.ID, Kind: kind, Path: b.MemPath})
		case "memory-backend-memfd":
			v.RAM = append(v.RAM, Backend{ID: b.ID, Kind: "memfd"})
		default:
			v.RAM = append(v.RAM, Backend{ID: b.ID, Kind: b.Type})
		}
		use := ram.Used[b.ID]
		if use == "" {
			use = "unused"
		}
		switch {
		case b.Type == "memory-backend-memfd" && b.Share:
			if why := noTransfer(in); why != "" {
				bad("memory backend %q (memory-backend-memfd, %s): its RAM dies with its QEMU, and only QEMU's cpr-transfer hands a memfd to a new one — which this guest cannot use: %s. Start it with -machine aux-ram-share=on (QEMU ≥ 10.0, outside libvirt) for restart-qemu, or back its RAM with a file (memory-backend-file,share=on,mem-path=FILE)", b.ID, use, why)
				break
			}
			v.UpdateProblems = append(v.UpdateProblems, fmt.Sprintf("memory backend %q (memory-backend-memfd, %s): restart-qemu hands it over by cpr-transfer, but a kexec loses a memfd's RAM (PMEM backend: memory-backend-file,share=on,mem-path= on the PMEM filesystem; the LUO backend that keeps memfds is docs/luo.md)", b.ID, use))
		case b.Type != "memory-backend-file":
			bad("memory backend %q (%s, %s) is not a memory-backend-file: its RAM dies with QEMU and would be lost", b.ID, b.Type, use)
		case !b.Share:
			bad("memory backend %q (%s, mem-path %s) has share=off: QEMU's copy-on-write RAM would be lost; start the guest with share=on", b.ID, use, b.MemPath)
		case qemuargv.InheritedFd(b.MemPath) >= 0:
			// Not a name to find the RAM again by: the fd of the process
			// that opens it. Checking the path from here would look at our
			// own fd of that number; QEMU's is in its fd table.
			if pr := inheritedRAMProblem(p, b); pr != "" {
				bad("memory backend %q (%s): %s", b.ID, use, pr)
			}
		default:
			if pr := ramFileProblem(b, in.path(p, b.MemPath)); pr != "" {
				bad("memory backend %q (%s): %s", b.ID, use, pr)
			} else if pr := mappingProblem(b, in.path(p, b.MemPath), in.Maps); pr != "" {
				bad("memory backend %q (%s): %s", b.ID, use, pr)
			}
			memNode := in.MemNode
			if memNode == nil {
				memNode = MemNode
			}
			if pr := numaProblem(b, in.path(p, b.MemPath), memNode); pr != "" {
				bad("memory backend %q (%s): %s", b.ID, use, pr)
			}
			if b.DiscardData {
				note("memory backend %q has discard-data=on: liveupdate clears it on the old QEMU before the save (QEMU would punch the RAM file out as it quits) and gives it back to whichever QEMU runs the guest", b.ID)
			}
		}
	}
	for _, m := range in.Facts.Memdevs {
		if !argvIDs[m.ID] {
			bad("memory backend %q was added at run time (object-add) and is not on the command line: a restarted QEMU would not have it", m.ID)
		} else if !m.Share {
			bad("memory backend %q is not shared according to QEMU (query-memdev): its RAM would be lost", m.ID)
		}
	}

	// QMP, version, run state.
	if in.Facts.QMPErr != nil && !errors.Is(in.Facts.QMPErr, libvirt.ErrDaemonRuns) { // said in checkLibvirt
		bad("QMP: %v", in.Facts.QMPErr)
	} else {
		ver := in.Facts.Version
		if ver[0] < MinQEMU[0] || ver[0] == MinQEMU[0] && ver[1] < MinQEMU[1] {
			bad("QEMU %d.%d.%d has no cpr-reboot mode: need %d.%d or newer", ver[0], ver[1], ver[2], MinQEMU[0], MinQEMU[1])
		}
		switch in.Facts.Status {
		case "running", "paused", "suspended", "prelaunch":
		default:
			bad("VM is in state %q: only a running or paused VM can be saved", in.Facts.Status)
		}
		if in.Facts.MachineType == "" {
			bad("QEMU did not report its machine type")
		}
	}
	if len(c.QMPEndpoints()) == 0 {
		bad("no QMP unix socket on the command line: add -qmp unix:PATH,server=on,wait=off")
	}

	// Devices that cannot be carried over.
	for _, d := range c.Devices() {
		if strings.HasPrefix(d, "vfio") {
			bad("device %s (VFIO passthrough) is not supported yet: its state cannot be saved by cpr-reboot without suspending the guest", d)
		}
	}
	checkDrift(in, bad, note)
	noteTransfer(in, note)
	if len(c.Find("snapshot")) > 0 {
		bad("-snapshot: the guest's disk writes live in a temporary overlay that quitting QEMU discards")
	}

	// Inherited fds must be re-creatable.
	for _, r := range c.FdRefs() {
		fi := p.Fds[r.Num]
		switch {
		case r.Kind == qemuargv.FdMemfd:
			// guest RAM: inheritedRAMProblem judged it
		case r.Num < 0:
			bad("-%s %s=%s… names an fd by name or fdset: it cannot be passed to a new QEMU", c.Opts[r.Opt].Name, r.Key, r.Owner)
		case r.Kind == qemuargv.FdOther:
			bad("inherited fd %d (-%s %s of %q) is of a kind liveupdate cannot re-create", r.Num, c.Opts[r.Opt].Name, r.Key, r.Owner)
		case fi.Target == "" && r.Kind != qemuargv.FdFile:
			bad("the command line names fd %d (%s of %q) but QEMU has no such fd open", r.Num, r.Key, r.Owner)
		case r.Kind == qemuargv.FdTap && fi.TapName == "":
			bad("fd %d of netdev %q is %s, not a tap device", r.Num, r.Owner, fi.Target)
		case r.Kind == qemuargv.FdFile:
			// QEMU closed the number on its command line; what it holds is
			// in query-fdsets (Facts.Fdsets).
			if in.Facts.QMPErr != nil {
				break
			}
			set, opaque, nth := c.FdsetOf(r)
			f, ok := in.Facts.FdsetFile(set, opaque, nth)
			switch {
			case !ok:
				bad("-add-fd fd=%d of fdset %d: QEMU does not hold it any more (query-fdsets): it cannot be handed to a new QEMU", r.Num, set)
			case strings.HasPrefix(f.Target, "pipe:"):
				// libvirt's serial and log files: a pipe to virtlogd. A
				// restart hands the very pipe over; a kexec cannot (the
				// update's plan refuses it).
				note("-add-fd fd=%d of fdset %d is a pipe (libvirt's virtlogd): handed to the new QEMU as it is", r.Num, set)
			case !filepath.IsAbs(f.Target):
				bad("-add-fd fd=%d of fdset %d is %s, not a file or a pipe: it cannot be handed over", r.Num, set, f.Target)
			}
		case r.Kind == qemuargv.FdChardev && fi.SocketPath == "":
			bad("fd %d of chardev %q is not a bound unix socket (%s)", r.Num, r.Owner, fi.Target)
		}
	}
	// Files QEMU opens at start must be found again from its working
	// directory (a QEMU started with -daemonize has changed to "/").
	for _, f := range c.InputFiles() {
		if qemuargv.InheritedFd(f.Path) >= 0 {
			continue // QEMU's own fd (RAM in a memfd: inheritedRAMProblem), not one of ours
		}
		if _, err := os.Stat(in.path(p, f.Path)); err != nil {
			hint := ""
			if !filepath.IsAbs(f.Path) {
				hint = fmt.Sprintf(" (relative to QEMU's working directory %s", p.Cwd)
				if len(c.Find("daemonize")) > 0 {
					hint += "; -daemonize changed it to /"
				}
				hint += "): start QEMU with absolute paths"
			}
			bad("%s %s cannot be found%s: a restarted QEMU would not start", f.Option, f.Path, hint)
		}
	}
	if in.NetNSErr != nil {
		bad("%v", in.NetNSErr)
	}
	if in.Libvirt != "" {
		checkLibvirt(in, &v, bad, note)
	}

	// Room and leftovers in the state directory.
	if in.StateDirFree < StateReserve {
		bad("state directory %s has %d MiB free, need at least %d MiB", in.StateDir, in.StateDirFree>>20, StateReserve>>20)
	}
	if _, err := os.Stat(StateFile(in.StateDir, v.VM)); err == nil {
		bad("%s exists: an earlier save of this VM was not restored. Run 'liveupdate restore' or move the file away", StateFile(in.StateDir, v.VM))
	}
	if in.Facts.Status != "running" && in.Facts.QMPErr == nil {
		note("VM is %s: it will be restored %s, not resumed", in.Facts.Status, in.Facts.Status)
	}
	v.OK = len(v.Problems) == 0
	return v
}

// LibvirtXML is what makes a libvirt guest's RAM a shared file that a
// restart keeps (in the domain's XML, under <domain>).
const LibvirtXML = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"

// checkLibvirt: libvirt manages the guest. Its daemon, when it starts,
// reconnects to the QEMU its record (/run/libvirt/qemu/NAME.xml) names and
// takes a guest whose recorded QEMU is gone for stopped — and cleans up
// after it, removing its memory-backing directory. So liveupdate and the
// daemon take turns: the run happens while no libvirt daemon runs (it holds
// the guest's monitor and owns the record), and rewrites the record for
// the new QEMU before the daemon is started again.
func checkLibvirt(in Input, v *Verdict, bad, note func(string, ...any)) {
	if ram, err := in.Proc.Cmdline.RAM(); err == nil {
		for _, b := range ram.Backends {
			if b.Type != "memory-backend-file" || !b.Share {
				bad("libvirt manages this guest (%s): to make its RAM a shared file that a restart keeps, add %s to its domain XML (virsh edit %s; for a kernel update also set memory_backing_dir in /etc/libvirt/qemu.conf to a directory on the PMEM filesystem), then start it again", in.Libvirt, LibvirtXML, v.VM)
				break
			}
		}
	}
	stop, start := libvirt.StopHint(in.LibvirtDaemons)
	if len(in.LibvirtDaemons) > 0 {
		var names []string
		for _, d := range in.LibvirtDaemons {
			names = append(names, d.String())
		}
		bad("libvirt manages this guest (%s) and its daemon runs: %s. liveupdate and libvirt take turns — the daemon holds the guest's monitor and owns its record. Stop the daemon for the run (the guests keep running): `%s`; run liveupdate again; then `%s`", in.Libvirt, strings.Join(names, ", "), stop, start)
		return
	}
	note("libvirt manages this guest (%s): its record is rewritten for the new QEMU; start libvirt's daemon again after the run (e.g. `systemctl start libvirtd.service`)", in.Libvirt)
}

// withoutAuxRAMShare is noTransfer's answer for the one cause the operator
// can change on the guest's command line.
const withoutAuxRAMShare = "it was started without -machine aux-ram-share=on"

// noTransfer says why QEMU's cpr-transfer is not open to the guest, or "".
// (cpr's whyNoTransfer decides for the run itself; this is the part plan
// can tell from the running QEMU.)
func noTransfer(in Input) string {
	switch {
	case in.Libvirt != "":
		return "libvirt manages it"
	case in.Facts.Version[0] < 10:
		return fmt.Sprintf("QEMU %d.%d has no cpr-transfer (10.0 and later)", in.Facts.Version[0], in.Facts.Version[1])
	case !in.Proc.Cmdline.AuxRAMShare():
		return withoutAuxRAMShare
	}
	return ""
}

// noteTransfer tells how restart-qemu will take the guest: by QEMU's
// cpr-transfer when it was started with -machine aux-ram-share=on (no state
// file, the shortest blackout), else the cpr-reboot way — and, then, what
// starting it with that option would gain. Nothing where the option would
// not help (libvirt has no setting for it; QEMU before 10.0).
func noteTransfer(in Input, note func(string, ...any)) {
	switch noTransfer(in) {
	case "":
		note("started with -machine aux-ram-share=on: restart-qemu hands it over by QEMU's cpr-transfer (no state file; --no-transfer for cpr-reboot); an update saves it the cpr-reboot way")
	case withoutAuxRAMShare:
		note("restart-qemu takes it the cpr-reboot way (state file); started with -machine aux-ram-share=on it would be handed over by QEMU's cpr-transfer instead, with a shorter blackout (docs/benchmarks.md, P1t)")
	}
}
