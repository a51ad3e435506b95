// Package update is the live kernel update of a host: plan and preflight,
// load the new kernel, save every guest (CPR), record the manifest, sync and
// remount filesystems read-only (the state directory's last), and reboot into the new kernel
// with kexec. PID 1 of the new kernel (package pid1) restores the guests.
//
// Run is a table of steps, each with its undo (package phase):
//
//	kexec-load    load the new kernel               ↔ unload it
//	luo-session   a LUO session for memfd RAM       ↔ close it (drops what it kept)
//	save-guests   save every guest, quit its QEMU   ↔ recover the guests here
//	              (one whose RAM the session keeps: kept, paused, until the kexec)
//	remount-ro    every filesystem but the state's  ↔ read-write again
//	kexec-record  the manifest records the kexec
//	state-ro      the state directory's (PMEM), last ↔ read-write again
//	reboot        kexec (no way back: the old kernel is gone)
//
// Any failure before the reboot runs the undos in reverse order, so every
// guest ends up running on the old kernel. Recover is the same way back for
// an update that died before its kexec: the host's changes undone, then the
// CPR engine's Recover.
package update

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/kernelconfig"
	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/crossclock"
	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/hostmods"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/kexec"
	"github.com/liveupdate/liveupdate/pkg/luo"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"github.com/liveupdate/liveupdate/pkg/phase"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// Options describe one update.
type Options struct {
	Kernel string // new kernel image, as the host root has it
	Initrd string // this project's initramfs for that kernel
	// Append, when set, is the new kernel's command line instead of the
	// running one's (lu.* parameters are added either way).
	Append string
	// ProcCmdline is the running kernel's command line file.
	ProcCmdline string
	// MountsFile is the mount table (/proc/mounts).
	MountsFile string
	// KeepControl carries lu.control (a root shell on a serial line) into
	// the new kernel's command line. Without it lu.control is dropped,
	// from the running command line and from Append alike: a shell that
	// automation opened once must not outlive the kernel it was asked on.
	KeepControl bool
}

// Plan is what an update would do, and what stops it.
type Plan struct {
	VMs        []preflight.Verdict `json:"vms"`
	Kernel     string              `json:"kernel"`
	Initrd     string              `json:"initrd"`
	Cmdline    string              `json:"cmdline"`
	PMEMDevice string              `json:"pmem_device"`
	PMEMMount  string              `json:"pmem_mount"`
	StateDir   string              `json:"state_dir"`
	// StateMount is the mount point of the state directory's filesystem:
	// the PMEM one, or (a host whose guests' RAM is all in memfds kept by
	// LUO) the root's or another disk filesystem PID 1 mounts.
	StateMount   string   `json:"state_mount"`
	KernelConfig string   `json:"kernel_config,omitempty"`
	Problems     []string `json:"problems,omitempty"`
	// Notes are what the plan could not check, and why; none stops it.
	Notes []string `json:"notes,omitempty"`

	targets []*cpr.Target
	start   crossclock.Stamp // first of the two stamps that calibrate the TSC
	phases  []manifest.Phase // timed while planning
}

// OK tells whether the update may go ahead.
func (p *Plan) OK() bool { return len(p.Problems) == 0 }

// Close releases the plan's QMP connections.
func (p *Plan) Close() {
	for _, t := range p.targets {
		t.Close()
	}
}

func (o Options) withDefaults() Options {
	if o.ProcCmdline == "" {
		o.ProcCmdline = "/proc/cmdline"
	}
	if o.MountsFile == "" {
		o.MountsFile = "/proc/mounts"
	}
	return o
}

// MakePlan checks everything an update needs without touching anything.
func MakePlan(ctx context.Context, e *cpr.Engine, o Options) (*Plan, error) {
	o = o.withDefaults()
	p := &Plan{Kernel: o.Kernel, Initrd: o.Initrd, StateDir: string(e.StateDir), start: crossclock.Now()}
	bad := func(format string, a ...any) { p.Problems = append(p.Problems, fmt.Sprintf(format, a...)) }
	local := func(q string) string { return string(e.Root.Local(hostpath.QEMU(q))) }
	qemuView := func(l string) string { return string(e.Root.QEMU(hostpath.Local(l))) }

	t0 := time.Now()
	ts, err := e.Plan(ctx, nil)
	ph := manifest.Phase{Name: "plan", Start: t0, End: time.Now()}
	if err != nil {
		return nil, err
	}
	p.phases = append(p.phases, ph)
	p.targets = ts
	for _, t := range ts {
		// What refuses only an update (a memfd's RAM) refuses this one.
		v := t.Verdict
		if len(v.UpdateProblems) > 0 {
			v.Problems = append(slices.Clip(v.Problems), v.UpdateProblems...)
			v.UpdateProblems, v.OK = nil, false
		}
		p.VMs = append(p.VMs, v)
		for _, pr := range v.Problems {
			bad("%s: %s", t.Name(), pr)
		}
		for _, f := range t.Facts.Fdsets {
			if !filepath.IsAbs(f.Target) && t.LibvirtFdsetFile(f.Opaque) == "" { // libvirt's: its file is written instead
				bad("%s: fd %d of -add-fd set %d is %s (libvirt's virtlogd pipe, for one): it does not survive the kexec; a QEMU restart (restart-qemu) hands it over", t.Name(), f.Fd, f.Set, f.Target)
			}
		}
		for _, pr := range kexecLosses(t.Proc, t.NetNS, filepath.Join(e.ProcRoot, fmt.Sprint(t.Proc.PID), "root")) {
			bad("%s: %s", t.Name(), pr)
		}
	}

	fstab, err := mounts.ReadFstab(local("/"))
	if err != nil {
		bad("reading the host's fstab (PID 1 mounts its local filesystems before the restore): %v", err)
	}
	// The state directory is on a DAX filesystem on PMEM; or, when no
	// guest keeps its RAM in a file, on any filesystem PID 1 mounts.
	hostState := local(string(e.StateDir))
	m, err := mounts.Holding(o.MountsFile, hostState)
	switch {
	case err != nil:
		bad("state directory %s: %v", e.StateDir, err)
	case mounts.HasDAX(m.Opts) && strings.HasPrefix(m.Source, "/dev/pmem"):
		p.PMEMDevice = m.Source
		p.PMEMMount = qemuView(m.Dir)
		p.StateMount = p.PMEMMount
	default:
		p.Problems = append(p.Problems, stateDirProblems(string(e.StateDir), m, fileRAMGuests(ts), unreachable(
			[]qemuargv.FileRef{{Option: "--state-dir", Path: string(e.StateDir)}}, o.MountsFile, local, local("/"), "", fstab, resolveLink, nil))...)
		p.StateMount = qemuView(m.Dir)
	}
	// Every guest's RAM must be on that filesystem, or on another PMEM
	// DAX filesystem PID 1 mounts from the fstab.
	if p.PMEMMount != "" {
		table, _ := mounts.Table(o.MountsFile)
		pmem := pmemFilesystems(table, fstab, p.PMEMMount, qemuView)
		for _, t := range ts {
			ram, _ := t.Proc.Cmdline.RAM()
			for _, b := range ram.Backends {
				if b.File() == "" {
					continue // a memfd: the LUO session keeps it (luoProblems)
				}
				if !slices.ContainsFunc(pmem, func(d string) bool { return manifest.Within(b.MemPath, d) }) {
					bad("%s: RAM of backend %q is in %s, not on a PMEM filesystem (%s; another one counts when it is mounted with dax and listed in /etc/fstab): it would not survive the kexec", t.Name(), b.ID, b.MemPath, strings.Join(pmem, ", "))
				}
			}
		}
	}

	// Every file a guest opens must be on a filesystem PID 1 mounts: the
	// host root, PMEM, or a local disk filesystem of the host's fstab.
	for _, t := range ts {
		files := guestFiles(t.Proc, t.Facts.Runtime)
		for _, pr := range unreachable(files, o.MountsFile, local, local("/"), p.PMEMDevice, fstab, resolveLink, inMemory(t.Proc, o.MountsFile, local)) {
			bad("%s: %s", t.Name(), pr)
		}
	}

	// Kernel and initramfs.
	for _, f := range []struct{ what, path string }{{"kernel", o.Kernel}, {"initramfs", o.Initrd}} {
		if f.path == "" {
			bad("no %s given", f.what)
			continue
		}
		fh, err := os.Open(local(f.path))
		if err != nil {
			bad("%s: %v", f.what, err)
			continue
		}
		fh.Close()
	}
	if o.Initrd != "" {
		needs, err := hostmods.Host{}.Read()
		if err != nil {
			p.Notes = append(p.Notes, fmt.Sprintf("this host's own modules were not checked against the initramfs: %v", err))
		} else {
			probs, notes := initramfsProblems(needs, local(o.Initrd), o.Initrd)
			p.Problems, p.Notes = append(p.Problems, probs...), append(p.Notes, notes...)
		}
	}
	var newConfig map[string]string // nil: none found beside the kernel
	if cfg := configFor(local(o.Kernel)); cfg != "" {
		p.KernelConfig = qemuView(cfg)
		if f, err := os.Open(cfg); err == nil {
			c, err := kernelconfig.ParseConfig(f)
			f.Close()
			if err != nil {
				bad("kernel config %s: %v", p.KernelConfig, err)
			}
			for _, pr := range kernelconfig.Check(c, kernelconfig.Requirements()) {
				if pr.Option == "CONFIG_KVM" && !needsKVM(ts, local("/dev/kvm")) {
					continue // an emulating host (TCG), as the nested tests'
				}
				bad("new kernel's config %s: %s", p.KernelConfig, pr)
			}
			newConfig = c
		}
	}

	// The new command line.
	cur, err := os.ReadFile(o.ProcCmdline)
	if err != nil {
		return nil, err
	}
	cmdline, probs := buildCmdline(string(cur), o.Append, p.PMEMDevice, p.PMEMMount, string(e.StateDir), o.KeepControl)
	if p.PMEMDevice == "" && !strings.Contains(" "+cmdline, " lu.root=") {
		probs = append(probs, fmt.Sprintf("the state directory %s is not on PMEM, and the new command line has no lu.root (nor a root=UUID=…, LABEL=… or /dev/… to take it from): PID 1 of the new kernel would not find the manifest. Add lu.root=… with --append", e.StateDir))
	}
	p.Problems = append(p.Problems, probs...)
	p.Cmdline = cmdline
	p.Problems = append(p.Problems, luoProblems(memfdGuests(ts), luo.Device, newConfig, p.KernelConfig, cmdline)...)
	return p, nil
}

// buildCmdline makes the new kernel's command line from the running one's (or
// base), keeping the PMEM reservation exactly and setting the lu.*
// parameters PID 1 reads: those of base, parsed, with the PMEM device, its
// mount and the manifest set, and the one-time ones (lu.format_pmem,
// lu.rescue) dropped, written back by bootparams.Params.Words. lu.control
// (a root shell on a serial line) is dropped too unless keepControl.
func buildCmdline(current, base, pmemDev, pmemMount, stateDir string, keepControl bool) (string, []string) {
	var probs []string
	curWords := bootparams.Split(current)
	if base == "" {
		base = current
	}
	var words, luWords []string
	rootSpec := ""
	for _, w := range bootparams.Split(base) {
		k, v, _ := strings.Cut(w, "=")
		switch {
		case k == "BOOT_IMAGE" || k == "initrd":
			continue // the boot loader's, not the kernel's
		case strings.HasPrefix(k, "lu."):
			luWords = append(luWords, bootparams.Quote(w))
			continue
		case k == "root":
			rootSpec = v
		}
		words = append(words, w)
	}
	// The PMEM reservation must be carried over exactly: guest RAM is there.
	curMemmap, newMemmap := memmaps(curWords), memmaps(words)
	if !slices.Equal(curMemmap, newMemmap) {
		switch {
		case len(newMemmap) == 0:
			probs = append(probs, fmt.Sprintf("the new command line drops %s, which reserves the PMEM holding the guests' RAM: keep it exactly", strings.Join(curMemmap, " ")))
		default:
			probs = append(probs, fmt.Sprintf("the new command line changes the PMEM reservation from %q to %q: the guests' RAM is in the old one; keep it exactly", strings.Join(curMemmap, " "), strings.Join(newMemmap, " ")))
		}
	}
	lu, err := bootparams.Parse(strings.Join(luWords, " "))
	if err != nil {
		probs = append(probs, fmt.Sprintf("the new command line would stop PID 1: %v", err))
		return strings.Join(append(quoteAll(words), luWords...), " "), probs
	}
	lu.FormatPMEM, lu.Rescue = false, false // once, on the boot that asked
	if !keepControl {
		lu.Control = "" // a root shell: only when asked for (--keep-control)
	}
	lu.Manifest = filepath.Join(stateDir, manifest.FileName)
	if pmemDev != "" {
		lu.PMEM, lu.PMEMMount = pmemDev, pmemMount
	} else {
		// The state directory on the host root (or a disk of its fstab):
		// PID 1 reads the manifest there, and mounts no PMEM of its own.
		lu.PMEM, lu.PMEMMount = "", bootparams.DefaultPMEMMount
	}
	if lu.Root == "" && (strings.HasPrefix(rootSpec, "UUID=") || strings.HasPrefix(rootSpec, "LABEL=") || strings.HasPrefix(rootSpec, "/dev/")) {
		lu.Root = rootSpec
	}
	words = append(words, lu.Words()...)
	cmdline := strings.Join(quoteAll(words), " ")
	if _, err := bootparams.Parse(cmdline); err != nil {
		probs = append(probs, fmt.Sprintf("the new command line would stop PID 1: %v", err))
	}
	return cmdline, probs
}

func quoteAll(words []string) []string {
	out := make([]string, len(words))
	for i, w := range words {
		out[i] = bootparams.Quote(w)
	}
	return out
}

func memmaps(words []string) []string {
	var out []string
	for _, w := range words {
		if strings.HasPrefix(w, "memmap=") {
			out = append(out, w)
		}
	}
	return out
}

// initramfsProblems says which modules this host needs for its guests to
// come back (its disks', PMEM's, KVM's, its bridges' uplink NICs') the
// initramfs at file (shown as shown) lacks: its PID 1 loads only what the
// initramfs holds, so a missing disk driver would stop the boot at the
// rescue shell with every guest down, a missing KVM module fail every KVM
// guest's restore, a missing NIC driver leave the guests cut off.
func initramfsProblems(needs hostmods.Needs, file, shown string) (problems, notes []string) {
	have, err := hostmods.InitramfsModules(file)
	if err != nil {
		return nil, []string{fmt.Sprintf("the initramfs's modules were not checked against this host's: %v", err)}
	}
	for _, m := range needs.Missing(have) {
		problems = append(problems, fmt.Sprintf("the initramfs %s lacks module %s, which this host needs for its guests to come back, and its PID 1 loads only what it holds: build it on this host (initramfs/build.sh KERNEL_VERSION / %s adds this host's own modules, `liveupdate host-modules`)", shown, m, shown))
	}
	return problems, nil
}

// needsKVM tells whether the new kernel must have KVM: a guest runs under
// it, or this host has it (/dev/kvm, at kvmDev): guests started after the
// update will want it too. A host that only emulates (TCG) does not.
func needsKVM(ts []*cpr.Target, kvmDev string) bool {
	if _, err := os.Stat(kvmDev); err == nil {
		return true
	}
	return slices.ContainsFunc(ts, func(t *cpr.Target) bool { return t.Facts.KVM })
}

// resolveLink follows a path's symbolic links ("" if it cannot).
func resolveLink(path string) string {
	r, err := filepath.EvalSymlinks(path)
	if err != nil {
		return ""
	}
	return r
}

// configFor finds the config of a kernel image: /boot/config-VER next to
// /boot/vmlinuz-VER. "" if there is none.
func configFor(kernel string) string {
	base := filepath.Base(kernel)
	ver, ok := strings.CutPrefix(base, "vmlinuz-")
	if !ok {
		return ""
	}
	c := filepath.Join(filepath.Dir(kernel), "config-"+ver)
	if _, err := os.Stat(c); err != nil {
		return ""
	}
	return c
}

// kexecClock stamps the moment of the kexec and calibrates the TSC since
// the plan's stamp, for the new kernel to carry the time across.
func kexecClock(start crossclock.Stamp, log *slog.Logger) *manifest.KexecClock {
	kc := &manifest.KexecClock{Start: start, Kexec: crossclock.Now()}
	hz, err := crossclock.Rate(kc.Start, kc.Kexec)
	if err != nil {
		log.Warn("no TSC rate: the new kernel's wall clock will be as the RTC sets it (±1 s)", "err", err)
	}
	kc.TSCHz = hz
	return kc
}

// Run carries out a plan that is OK. It returns only on failure (after
// putting every guest back to running on this kernel) — on success the
// machine is running the new kernel.
func Run(ctx context.Context, e *cpr.Engine, p *Plan, o Options) (*manifest.Manifest, error) {
	o = o.withDefaults()
	if !p.OK() {
		return nil, fmt.Errorf("refusing to update: %s", strings.Join(p.Problems, "; "))
	}
	if err := fault.At("plan"); err != nil {
		return nil, fmt.Errorf("no guest was touched: %w", err)
	}
	u := &updateRun{e: e, p: p, o: o, phases: slices.Clone(p.phases)}
	// A manifest damaged after it is written (tests: PID 1 must stop in
	// the rescue shell, touching nothing); the intact one is kept beside.
	fault.On("corrupt", func(string, string) { corruptManifest(u.local(filepath.Join(string(e.StateDir), manifest.FileName))) })
	// A memfd the new kernel will not hand back (tests: that guest alone
	// fails, named, its state kept; the others run).
	fault.On("losetoken", func(string, string) {
		loseTokens(u.local(filepath.Join(string(e.StateDir), manifest.FileName)), os.Getenv("LIVEUPDATE_FAULT_VM"))
	})
	err := phase.Run(ctx, u.record,
		// The kernel first: one the running kernel refuses is found out
		// before any guest is touched.
		phase.Step{Name: "kexec-load", Do: u.loadKernel, Undo: u.unloadKernel},
		// The session that keeps memfd RAM across the kexec, when a guest
		// has such RAM; closed again (all it kept dropped) on any failure.
		phase.Step{Name: "luo-session", Do: u.openSession, Undo: u.closeSession},
		// What is dirty written back while the guests still run: the
		// sync inside the blackout (remount-ro) is left with what the
		// last moments dirtied.
		phase.Step{Name: "write-back", Do: u.writeBack},
		phase.Step{Name: "save-guests", Do: u.saveGuests, Undo: u.recoverGuests},
		phase.Step{Name: "remount-ro", Do: u.remountOthers, Undo: u.remountRW},
		phase.Step{Name: "kexec-record", Do: u.recordKexec},
		phase.Step{Name: "state-ro", Do: u.remountState, Undo: u.remountRW},
		phase.Step{Name: "reboot", Do: u.reboot},
	)
	return u.m, u.abandoned(err)
}

// abandoned says what a failed update means for the guests.
func (u *updateRun) abandoned(err error) error {
	var pe *phase.Error
	if !errors.As(err, &pe) {
		return err
	}
	cause := errors.Join(pe.Err, pe.UndoErr)
	switch {
	case pe.Step == "kexec-load" || pe.Step == "luo-session":
		return fmt.Errorf("no guest was touched: %w", cause)
	case pe.Step == "save-guests" && !u.recovered:
		return fmt.Errorf("update abandoned: %w", cause)
	}
	return fmt.Errorf("update abandoned, guests restored on the running kernel: %w", cause)
}

// updateRun is the state of one update.
type updateRun struct {
	e         *cpr.Engine
	p         *Plan
	o         Options
	m         *manifest.Manifest // from the save on
	phases    []manifest.Phase   // timed before the manifest was made
	remounted []string           // read-only now, in that order
	recovered bool               // the undo of the save brought guests back
	keeper    *luoKeeper         // the LUO session keeping memfd RAM (nil: none)
}

// record puts a step into the manifest (or keeps it for the save to put
// there).
func (u *updateRun) record(name string, start, end time.Time, err error) {
	ph := manifest.Phase{Name: name, Start: start, End: end}
	if err != nil {
		ph.Error = err.Error()
	}
	if u.m != nil {
		u.m.Phases = append(u.m.Phases, ph)
	} else {
		u.phases = append(u.phases, ph)
	}
}

func (u *updateRun) local(p string) string { return string(u.e.Root.Local(hostpath.QEMU(p))) }

func (u *updateRun) loadKernel(context.Context) error {
	return kexec.Load(u.local(u.p.Kernel), u.local(u.p.Initrd), u.p.Cmdline)
}

func (u *updateRun) unloadKernel(context.Context) error {
	if err := kexec.Unload(); err != nil {
		u.e.Log.Error("unloading the new kernel", "err", err)
	}
	return nil
}

// writeBack writes every filesystem's dirty data back (sync(2)), before
// any guest stops.
func (u *updateRun) writeBack(context.Context) error {
	unix.Sync()
	return nil
}

// saveGuests saves every guest and quits its QEMU (with no guests, it
// records a manifest with none: PID 1 still rebuilds the host from it).
func (u *updateRun) saveGuests(ctx context.Context) error {
	o := cpr.SaveOptions{Phases: u.phases}
	if u.keeper != nil {
		o.KeepRAM = u.keeper
	}
	m, err := u.e.Save(ctx, u.p.targets, o)
	u.m, u.phases = m, nil
	return err
}

// recoverGuests brings back here the guests whose old QEMU the save quit
// (Save itself resumed them on their old QEMUs when it failed before that).
func (u *updateRun) recoverGuests(ctx context.Context) error {
	if u.m == nil || !cpr.AnyQuit(u.m) {
		return nil
	}
	u.recovered = true
	// An old QEMU still running (a memfd guest's, kept as its RAM's holder)
	// answers one monitor client at a time: ours goes, Recover dials it.
	for _, t := range u.p.targets {
		t.CloseMonitor()
	}
	_, err := u.e.Recover(ctx, u.m, cpr.Held(u.p.targets))
	return err
}

// remountOthers syncs and remounts read-only every filesystem but the state
// directory's (the manifest is written there next).
func (u *updateRun) remountOthers(context.Context) error {
	done, err := remountRO(u.o.MountsFile, u.local(u.p.StateMount), false, u.e.Log)
	u.remounted = append(u.remounted, done...)
	return err
}

// recordKexec records in the manifest what was remounted and the moment
// of the kexec, for PID 1 (clock) and for a recover after a crash here.
func (u *updateRun) recordKexec(context.Context) error {
	u.m.Remounted = slices.Clone(u.remounted)
	u.m.KexecClock = kexecClock(u.p.start, u.e.Log)
	u.m.Phases = append(u.m.Phases, manifest.Phase{Name: "kexec", Start: u.m.KexecClock.Kexec.Wall})
	if err := manifest.WriteWith(u.local(filepath.Join(string(u.e.StateDir), manifest.FileName)), u.m,
		manifest.WriteOptions{Durable: true, BeforeRename: func() error { return fault.At("manifest-write") }}); err != nil {
		return fmt.Errorf("writing the manifest: %w", err)
	}
	return nil
}

// corruptManifest is the fault action "corrupt": the manifest at path is
// copied to path+".intact" and cut to its first 300 bytes, durably.
func corruptManifest(path string) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 300 {
		return
	}
	os.WriteFile(path+".intact", b, 0o600)
	os.WriteFile(path, b[:300], 0o600)
	unix.Sync()
}

// loseTokens is the fault action "losetoken": the manifest at path is
// rewritten, durably, with vm's LUO tokens moved to ones no session keeps.
func loseTokens(path, vm string) {
	m, err := manifest.Read(path)
	if err != nil {
		return
	}
	for i := range m.VMs {
		if m.VMs[i].Name != vm {
			continue
		}
		for j := range m.VMs[i].Fds {
			if m.VMs[i].Fds[j].Token != 0 {
				m.VMs[i].Fds[j].Token += 1 << 20
			}
		}
	}
	manifest.Write(path, m)
}

// remountState remounts the state directory's filesystem (PMEM, or the
// root of an all-LUO host) read-only, last.
func (u *updateRun) remountState(context.Context) error {
	done, err := remountRO(u.o.MountsFile, u.local(u.p.StateMount), true, u.e.Log)
	u.remounted = append(u.remounted, done...)
	return err
}

// remountRW is the undo of both remounts: what is read-only goes back to
// read-write, newest first (each undo takes what is left).
func (u *updateRun) remountRW(context.Context) error {
	err := remountRW(u.remounted)
	u.remounted = nil
	return err
}

func (u *updateRun) reboot(context.Context) error {
	u.e.Log.Info("rebooting into the new kernel", "kernel", u.p.Kernel, "cmdline", u.p.Cmdline)
	return fmt.Errorf("kexec reboot: %w", kexec.Reboot())
}

// remountRO syncs and remounts read-only every writable block-device
// filesystem but the one mounted on stateMount — or, with stateOnly, that
// one alone (it goes last). It returns what it remounted.
func remountRO(mountsFile, stateMount string, stateOnly bool, log *slog.Logger) ([]string, error) {
	unix.Sync()
	ms, err := mounts.Table(mountsFile)
	if err != nil {
		return nil, err
	}
	order := remountOrder(ms, stateMount, stateOnly)
	var done []string
	for _, d := range order {
		if err := unix.Mount("", d, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			log.Warn("cannot remount read-only (synced instead)", "mount", d, "err", err)
			continue
		}
		done = append(done, d)
	}
	unix.Sync()
	return done, nil
}

// remountOrder is what remountRO remounts, in order, from the mount table
// ms: each writable block-device filesystem once (by its last mount, the
// newest first), the state's apart.
func remountOrder(ms []mounts.Entry, stateMount string, stateOnly bool) []string {
	// The state's filesystem by its device: mounted elsewhere too (bound
	// into the host root, say), it is still the one to keep for last.
	stateSource := ""
	for _, m := range ms {
		if m.Dir == stateMount {
			stateSource = m.Source
		}
	}
	var order []string
	seen := map[string]bool{}
	stateDir := ""
	for i := len(ms) - 1; i >= 0; i-- {
		m := ms[i]
		if !strings.HasPrefix(m.Source, "/dev/") || seen[m.Source] || !slices.Contains(strings.Split(m.Opts, ","), "rw") {
			continue
		}
		seen[m.Source] = true
		if m.Source == stateSource {
			stateDir = m.Dir
			continue
		}
		order = append(order, m.Dir)
	}
	if stateOnly {
		if stateDir == "" {
			return nil
		}
		return []string{stateDir}
	}
	return order
}

// remountRW is remountRO's inverse.
func remountRW(dirs []string) error {
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := unix.Mount("", dirs[i], "", unix.MS_REMOUNT, ""); err != nil {
			errs = append(errs, fmt.Errorf("remounting %s read-write: %w", dirs[i], err))
		}
	}
	return errors.Join(errs...)
}

// fileRAMGuests names the guests with RAM in a file (PMEM's shape): their
// state directory must be on PMEM with the RAM.
func fileRAMGuests(ts []*cpr.Target) []string {
	var out []string
	for _, t := range ts {
		ram, _ := t.Proc.Cmdline.RAM()
		if slices.ContainsFunc(ram.Backends, func(b qemuargv.MemoryBackend) bool { return b.File() != "" }) {
			out = append(out, t.Name())
		}
	}
	return out
}

// stateDirProblems judges a state directory not on PMEM (m is its
// filesystem): right for a host whose guests' RAM is all in memfds kept
// by LUO, when PID 1 of the new kernel mounts that filesystem (reach: what
// unreachable says of it); wrong when some guest's RAM is in a file.
func stateDirProblems(stateDir string, m mounts.Entry, fileRAM, reach []string) []string {
	if len(fileRAM) > 0 {
		return []string{fmt.Sprintf("state directory %s is on %s (%s, %s), not on PMEM mounted with dax, and %s keep RAM in files: their RAM and state would not survive the kexec. Use --state-dir on the PMEM filesystem (a state directory elsewhere is for hosts whose guests' RAM is all in memfds kept by LUO)",
			stateDir, m.Dir, m.Source, m.Opts, strings.Join(fileRAM, ", "))}
	}
	var out []string
	for _, r := range reach {
		out = append(out, "state directory: "+r)
	}
	if m.FSType == "tmpfs" || m.FSType == "ramfs" {
		out = append(out, fmt.Sprintf("state directory %s is on %s (%s): memory, lost at the kexec. Use --state-dir on the host's root filesystem, another local disk filesystem of /etc/fstab, or PMEM", stateDir, m.Dir, m.FSType))
	}
	return out
}
