// Package pid1 is what liveupdate does as /init of the new kernel: bring the
// host up to the minimum the guests need — fast, without systemd — and
// restore every guest recorded in the manifest.
//
// The boot is a list of named phases (see Boot). PID 1 never exits and never
// panics: a failure is logged to the console and /dev/kmsg, every guest's RAM
// and state files are left as they are, and a rescue shell is started on the
// console, from which `liveupdate restore` can be run again.
package pid1

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/u-root/u-root/pkg/kmodule"
	"github.com/u-root/u-root/pkg/mount"
	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/crossclock"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/kmod"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"github.com/liveupdate/liveupdate/pkg/netsetup"
	"github.com/liveupdate/liveupdate/pkg/phase"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/reaper"
	"github.com/liveupdate/liveupdate/pkg/runlock"
)

// Paths inside the initramfs.
const (
	ModuleList = "/etc/liveupdate/modules" // written by initramfs/build.sh
	NewRoot    = "/newroot"                // where the host root is mounted
	RescueSh   = "/bin/sh"
)

// Boot is the state of one boot of PID 1.
type Boot struct {
	Params   bootparams.Params
	Log      *slog.Logger
	Start    time.Time        // when PID 1 started (monotonic)
	Stamp    crossclock.Stamp // the same instant on the TSC, to measure since the kexec
	Uptime0  float64          // kernel uptime at PID 1 start, seconds
	Phases   []Phase
	Manifest *manifest.Manifest
	Root     string        // host root mount ("" if none)
	Boot     manifest.Boot // the boot record, written next to the manifest

	manifestPath string // as PID 1 sees it

	// reaper is PID 1's one waiter for children: whatever PID 1 starts
	// (the rescue shell, control commands, QEMUs) is started through it
	// (Reaper), never waited for with exec.Cmd.Wait.
	reaper reaper.Reaper

	mu      sync.Mutex
	mounted []string // in mount order, for the orderly stop
	// morePMEM are the PMEM filesystems mounted from the host's fstab, as
	// the host (and QEMU) sees them: guest RAM may be there too.
	morePMEM []string
	// placeholders are the empty tmpfs mounts over fstab mount points that
	// failed (mountFstab), removed at the handover.
	placeholders []string
	// restorer restored the guests; their clocks are put right after
	// READY, and the handover waits for that (the host's init would end it).
	restorer *cpr.Engine
	// ram is the guests' memfd RAM from the update's LUO session (nil:
	// none); while it holds some, PID 1 does not hand over.
	ram *guestRAM
	// modules is the module list loading (the network's groups load on
	// while the phases before the network run).
	modules *kmod.Loading
	// kvmGroups are the list's @restore groups (KVM's), started apart by
	// startKVMModules: early when a guest needs them, else after READY.
	kvmGroups  []kmod.Group
	kvmModules *kmod.Loading
	kvmOnce    sync.Once
	kvmLogged  bool // a phase waited for them and logged what they gave
	// uplinks is closed once the bridges' uplink ports are attached (nil:
	// none being attached); uplinkErr is what that gave.
	uplinks   chan struct{}
	uplinkErr error
}

// Phase is one timed step of the boot.
type Phase struct {
	Name  string
	Start time.Duration // since PID 1 start
	Took  time.Duration
	Err   error
}

// Main runs PID 1. It never returns.
func Main() {
	b := &Boot{Start: time.Now(), Stamp: crossclock.Now()}
	defer func() {
		if r := recover(); r != nil {
			b.rescue(fmt.Errorf("panic: %v", r))
		}
	}()
	os.Setenv("PATH", "/bin:/sbin:/bbin:/usr/bin:/usr/sbin")
	earlyErr := mounts.Early()
	b.Uptime0 = kernelUptime()
	b.Log = newLogger()
	b.Log.Info("liveupdate PID 1 starting", "uptime_s", b.Uptime0)
	if earlyErr != nil {
		b.Log.Warn("early mounts", "err", earlyErr)
	}
	// Ctrl-Alt-Del becomes SIGINT to PID 1 (an orderly stop), not an
	// immediate reboot that would lose the guests.
	unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	go b.guard("reaper", b.reap)
	go b.guard("signals", b.handleSignals)

	cmdline, _ := os.ReadFile("/proc/cmdline")
	p, err := bootparams.Parse(string(cmdline))
	if err != nil {
		b.rescue(fmt.Errorf("kernel command line: %w", err))
	}
	b.Params = p
	if p.Control != "" {
		go b.guard("control", func() { b.controlLoop(p.Control) })
	}
	if p.Rescue {
		b.rescue(errors.New("lu.rescue=1 on the kernel command line"))
	}

	// The boot. A failure up to the restore stops at the rescue shell, the
	// guests' data untouched; the restore and the services are Optional:
	// the guests that did come back run, and the failure is reported.
	err = phase.Run(context.Background(), b.record,
		phase.Step{Name: "modules", Do: b.loadModules},
		phase.Step{Name: "devices", Do: b.waitDevices},
		phase.Step{Name: "mounts", Do: b.mountAll}, // never undone: guests' data
		phase.Step{Name: "host filesystems", Do: b.mountFstab},
		phase.Step{Name: "manifest", Do: b.readManifest},
		phase.Step{Name: "read ahead", Do: b.readAhead},
		phase.Step{Name: "clock", Do: b.setClock},
		phase.Step{Name: "network modules", Do: b.awaitNetworkModules},
		phase.Step{Name: "network", Do: b.setupNetwork},
		phase.Step{Name: "cgroups", Do: b.setupCgroups},
		phase.Step{Name: "restore modules", Do: b.awaitRestoreModules, Optional: true},
		phase.Step{Name: "restore", Do: b.restoreGuests, Optional: true},
		phase.Step{Name: "uplinks", Do: b.awaitUplinks, Optional: true},
		phase.Step{Name: "services", Do: b.startServices, Optional: true},
	)
	var restoreErr error
	if pe := (*phase.Error)(nil); errors.As(err, &pe) {
		b.rescue(err)
	} else {
		restoreErr = err
	}
	b.ready()
	b.writeBootRecord()
	// KVM's modules if no guest waited for them: QEMUs the host starts
	// later may use KVM.
	if !b.kvmLogged {
		go b.guard("KVM's modules", func() {
			res, _ := b.startKVMModules().Wait(context.Background(), RestorePhase)
			if err := b.logModules(res); err != nil {
				b.Log.Warn("KVM's modules", "err", err)
			}
		})
	}
	if restoreErr != nil {
		b.Log.Error("some guests were not restored; their RAM and state files are kept", "err", restoreErr)
		msg := fmt.Sprintf("restore failed: %v\nFix the cause, then: liveupdate recover --root %s --manifest %s\n", restoreErr, orSlash(b.Root), b.Params.Manifest)
		if p.Handover {
			msg = fmt.Sprintf("restore failed: %v\nFix the cause, then, once the host is up: liveupdate recover --manifest %s\n", restoreErr, b.Params.Manifest)
			// The host's init gives the operator a login; a shell of
			// ours would outlive the handover on the console.
			fmt.Fprintf(consoleOut(), "liveupdate: %s", msg)
		} else {
			go b.guard("rescue shell", func() { b.rescueShellLoop(msg, nil) })
		}
	}
	if p.Handover && b.ram.holding() {
		// The host's init would close what holds a guest's RAM.
		fmt.Fprintf(consoleOut(), "liveupdate: not handing over to the host's init: PID 1 alone holds the RAM (memfds from the LUO session) of guests that are not running; a rescue shell follows\n")
		go b.guard("rescue shell", func() { b.rescueShellLoop("guests' memfd RAM is held by PID 1; see the log\n", nil) })
	} else if p.Handover {
		b.waitClocks()
		if err := b.handover(); err != nil {
			b.Log.Error("handover to the host's init failed; staying as init", "err", err)
		}
	}
	b.supervise()
}

// record keeps a boot phase and logs it.
func (b *Boot) record(name string, start, end time.Time, err error) {
	ph := Phase{Name: name, Start: start.Sub(b.Start), Took: end.Sub(start), Err: err}
	b.Phases = append(b.Phases, ph)
	if err != nil {
		b.Log.Error("phase failed", "phase", name, "took", ph.Took, "err", err)
	} else {
		b.Log.Info("phase done", "phase", name, "took", ph.Took)
	}
}

// ready prints the one line tests and operators look for.
func (b *Boot) ready() {
	var parts []string
	for _, p := range b.Phases {
		parts = append(parts, fmt.Sprintf("%s=%.1fms", p.Name, float64(p.Took.Microseconds())/1000))
	}
	total := time.Since(b.Start)
	n, paused := 0, ""
	if b.Manifest != nil {
		np := 0
		for _, v := range b.Manifest.VMs {
			switch {
			case v.Status == manifest.StatusRunning && v.WasRunning:
				n++
			case v.Status == manifest.StatusRunning:
				np++ // restored and left paused, as it was before the update
			}
		}
		if np > 0 {
			paused = fmt.Sprintf("; guests paused, as before the update: %d", np)
		}
	}
	msg := fmt.Sprintf("liveupdate: READY in %.1fms after PID 1 start (kernel uptime at start %.3fs); guests running: %d%s; %s",
		float64(total.Microseconds())/1000, b.Uptime0, n, paused, strings.Join(parts, " "))
	b.Log.Info(msg)
	fmt.Fprintln(consoleOut(), msg)
}

// The phases a module list group may name (@PHASE) as the one that first
// needs it; a group with none is needed before the devices are looked for.
// Each tagged group loads at a lower priority beside the phases before.
const (
	// NetworkPhase: the guests' taps, bridges and vhost-net (and the
	// DHCP interface's NIC), before the network is built.
	NetworkPhase = "network"
	// RestorePhase: what the guests' QEMUs need besides (KVM's modules),
	// before the first QEMU starts.
	RestorePhase = "restore"
	// UplinksPhase: the drivers of the bridges' uplink NICs, awaited by
	// the attaching of the ports beside the restore, not by any QEMU.
	UplinksPhase = "uplinks"
)

// loadModules starts loading the initramfs' module list, its groups side by
// side, and waits for those needed first (the PMEM, the filesystems, the
// host root's disk), then loads lu.modules (which may need any of them). The
// network's groups go on loading while the disks are mounted and the
// manifest is read; awaitNetworkModules waits for them.
func (b *Boot) loadModules(ctx context.Context) error {
	groups, err := kmod.ReadList(ModuleList)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("module list %s: %w", ModuleList, err)
	}
	if err := checkModulePhases(groups); err != nil {
		return fmt.Errorf("module list %s: %w", ModuleList, err)
	}
	// KVM's groups wait until a guest needs them: under emulation they
	// load for 1.6 s, beside ext4's group.
	var now []kmod.Group
	for _, g := range groups {
		if g.Phase == RestorePhase {
			b.kvmGroups = append(b.kvmGroups, g)
		} else {
			now = append(now, g)
		}
	}
	b.modules = kmod.Start(now, kmodule.ProbeOpts{})
	res, err := b.modules.Wait(ctx, "")
	if err != nil {
		return err
	}
	if len(b.Params.Modules) > 0 {
		res = append(res, kmod.Load(b.Params.Modules, kmodule.ProbeOpts{})...)
	}
	return b.logModules(res)
}

// readAhead starts reading the files the guests' QEMUs run code from
// (manifest VM.Code) into the page cache, and returns at once: the kernel
// reads them while PID 1 builds the network and the cgroups, instead of the
// new QEMUs faulting them in one by one from a cold cache as they start.
// When a guest runs under KVM, it starts loading KVM's modules too.
func (b *Boot) readAhead(ctx context.Context) error {
	if b.Manifest == nil {
		return nil
	}
	if slices.ContainsFunc(b.Manifest.VMs, func(vm manifest.VM) bool { return usesKVM(vm.Argv) }) {
		b.startKVMModules()
	}
	root := hostpath.Root(b.Root)
	var paths []string
	for _, vm := range b.Manifest.VMs {
		for _, p := range append([]hostpath.QEMU{vm.Binary}, vm.Code...) {
			if l := string(root.Local(p)); p != "" && !slices.Contains(paths, l) {
				paths = append(paths, l)
			}
		}
	}
	go b.guard("read ahead", func() {
		start := time.Now()
		n, size := readAhead(paths, readAheadMax)
		b.Log.Info("read ahead: QEMU's code asked into the page cache", "files", n, "of", len(paths), "MiB", size>>20, "took", time.Since(start).Round(time.Microsecond))
	})
	return nil
}

// readAheadMax caps what readAhead asks for: code, not data.
const readAheadMax = 1 << 30

// readAhead asks the kernel to read each regular file into the page cache
// (POSIX_FADV_WILLNEED, which starts the reads and does not wait for them)
// until max bytes are asked for, and says how many files and bytes it
// asked for. The advice goes a MiB at a time: the kernel reads at most
// about that much for one call. A path that is not a regular file (a FIFO
// would block the open) or cannot be opened is passed over.
func readAhead(paths []string, max int64) (files int, bytes int64) {
	const chunk = 1 << 20
	for _, p := range paths {
		f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
		if err != nil {
			continue
		}
		fi, err := f.Stat()
		if err != nil || !fi.Mode().IsRegular() || bytes+fi.Size() > max {
			f.Close()
			continue
		}
		for off := int64(0); off < fi.Size(); off += chunk {
			if unix.Fadvise(int(f.Fd()), off, chunk, unix.FADV_WILLNEED) != nil {
				break
			}
		}
		f.Close()
		files++
		bytes += fi.Size()
	}
	return files, bytes
}

// awaitNetworkModules waits for the module groups the network needs (the
// guests' taps, bridges and vhost-net, the host's NICs), then for the DHCP
// interface, with lu.devwait as the deadline.
func (b *Boot) awaitNetworkModules(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, b.Params.DevWait)
	defer cancel()
	if err := b.awaitModules(ctx, NetworkPhase); err != nil {
		return err
	}
	if p := b.Params.DHCP; p != "" {
		if err := mounts.WaitFor(ctx, "/sys/class/net/"+p); err != nil {
			return fmt.Errorf("network interface %s: %w", p, err)
		}
	}
	return nil
}

// checkModulePhases refuses a module list with a group for a phase PID 1
// never waits in: its modules would load, and nothing would wait for them.
func checkModulePhases(groups []kmod.Group) error {
	for _, p := range kmod.Phases(groups) {
		if p != "" && p != NetworkPhase && p != RestorePhase && p != UplinksPhase {
			return fmt.Errorf("a group for phase @%s, which PID 1 does not wait in: use @%s, @%s or @%s, or no @ line for the modules needed first", p, NetworkPhase, RestorePhase, UplinksPhase)
		}
	}
	return nil
}

// awaitRestoreModules waits, when a guest to restore runs under KVM, for
// the module groups the guests' QEMUs need besides the disks and the
// network (KVM's), with lu.devwait as the deadline; guests that all run
// emulated do not wait for them (KVM's modules load for 1.6 s under
// emulation). Optional: a guest that cannot do without a module that
// failed fails in QEMU's own words ("Could not access KVM kernel module"),
// the others run.
func (b *Boot) awaitRestoreModules(ctx context.Context) error {
	if b.Manifest == nil {
		return nil
	}
	var argvs [][]string
	for _, vm := range b.Manifest.VMs {
		argvs = append(argvs, vm.Argv)
	}
	return b.awaitKVMModules(ctx, argvs)
}

// awaitKVMModules waits for the @restore module groups (KVM's), starting
// them if need be, if one of the QEMU command lines asks for KVM (or
// cannot be read).
func (b *Boot) awaitKVMModules(ctx context.Context, argvs [][]string) error {
	if !slices.ContainsFunc(argvs, usesKVM) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, b.Params.DevWait)
	defer cancel()
	res, err := b.startKVMModules().Wait(ctx, RestorePhase)
	if err != nil {
		return err
	}
	b.kvmLogged = true
	return b.logModules(res)
}

// startKVMModules starts loading the @restore groups, once, and returns
// their loading. Started after READY when no guest waits for them: QEMUs
// started on the host later may use KVM.
func (b *Boot) startKVMModules() *kmod.Loading {
	b.kvmOnce.Do(func() { b.kvmModules = kmod.Start(b.kvmGroups, kmodule.ProbeOpts{}) })
	return b.kvmModules
}

// usesKVM tells whether a QEMU command line asks for KVM; one that does
// not parse is taken to (waiting costs less than a guest that fails).
func usesKVM(argv []string) bool {
	c, err := qemuargv.Parse(argv)
	return err != nil || c.UsesKVM()
}

// awaitModules waits for the module groups tagged @phase and logs them.
func (b *Boot) awaitModules(ctx context.Context, phase string) error {
	if b.modules == nil {
		return nil
	}
	res, err := b.modules.Wait(ctx, phase)
	if err != nil {
		return err
	}
	return b.logModules(res)
}

// logModules logs what loading modules gave, each with how long it took,
// and returns their errors.
func (b *Boot) logModules(res []kmod.Result) error {
	var errs []error
	var names []string
	for _, r := range res {
		names = append(names, fmt.Sprintf("%s=%.1fms", r.Name, float64(r.Took.Microseconds())/1000))
		if r.Err != nil {
			errs = append(errs, fmt.Errorf("module %s: %w", r.Name, r.Err))
			continue
		}
		if r.NoDevice {
			b.Log.Info("module has no device here, skipped", "name", r.Name)
		}
		b.Log.Debug("module", "name", r.Name, "loaded", r.Loaded)
	}
	if len(errs) == 0 && len(names) > 0 {
		b.Log.Info("modules loaded", "count", len(names), "list", strings.Join(names, ","))
	}
	return errors.Join(errs...)
}

// waitDevices waits for the devices the boot needs, with lu.devwait as the
// deadline.
func (b *Boot) waitDevices(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, b.Params.DevWait)
	defer cancel()
	p := b.Params
	if p.PMEM != "" {
		if err := mounts.WaitFor(ctx, p.PMEM); err != nil {
			return fmt.Errorf("%w: is memmap=SIZE!OFFSET on the kernel command line, and nd_pmem loaded?", err)
		}
	}
	if p.Root != "" {
		for {
			_, err := mounts.ResolveDevice(p.Root)
			if err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("host root %s: %w", p.Root, err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return nil
}

// mountAll mounts PMEM with DAX and the host root, and makes /dev, /proc,
// /sys, /run and PMEM visible inside the host root at the same paths.
// Inverse: unmountAll.
func (b *Boot) mountAll(ctx context.Context) error {
	p := b.Params
	if p.PMEM != "" {
		if err := mounts.MountPMEM(p.PMEM, p.PMEMMount, p.FormatPMEM, b.run); err != nil {
			return err
		}
		b.mounted = append(b.mounted, p.PMEMMount)
		opts, _ := mounts.MountOptions("/proc/mounts", p.PMEMMount)
		fmt.Fprintf(consoleOut(), "liveupdate: PMEM %s mounted on %s options=%s\n", p.PMEM, p.PMEMMount, opts)
	}
	if p.Root == "" {
		return nil
	}
	dev, err := mounts.MountRoot(p.Root, p.RootFSType, p.RootFlags, p.RootRO, NewRoot)
	if err != nil {
		return err
	}
	b.Root = NewRoot
	b.mounted = append(b.mounted, NewRoot)
	binds := []string{"/dev", "/proc", "/sys", "/run"}
	if p.PMEM != "" {
		binds = append(binds, p.PMEMMount)
	}
	if err := mounts.BindInto(NewRoot, binds...); err != nil {
		return err
	}
	for _, d := range binds {
		b.mounted = append(b.mounted, filepath.Join(NewRoot, d))
	}
	b.Log.Info("host root mounted", "spec", p.Root, "dev", dev, "on", NewRoot)
	return nil
}

// mountFstab mounts, under the host root, the local disk filesystems of
// its /etc/fstab (guest images on their own disk, as on most hosts). What
// PID 1 leaves to the host's init (network filesystems, noauto, LVM) is
// logged; update's plan refuses guests whose files are there. A
// filesystem that fails to mount gets an empty read-only tmpfs over its
// mount point until the handover: a guest whose image is there fails to
// restore in QEMU's words ("No such file") and is kept for recover, the
// others run, and no QEMU opens a stale file the root filesystem holds
// under the mount point. Undone by unmountAll.
func (b *Boot) mountFstab(ctx context.Context) error {
	if b.Root == "" {
		return nil
	}
	es, err := mounts.ReadFstab(b.Root)
	if err != nil {
		return err
	}
	mounted, err := mounts.Table("/proc/mounts")
	if err != nil {
		return err
	}
	for _, e := range es {
		if why := e.NotMounted(); why != "" {
			b.Log.Info("fstab entry left to the host's init", "line", e.Line, "spec", e.Spec, "dir", e.Dir, "why", why)
			continue
		}
		// PMEM (lu.pmem=, bound into the root) or anything else already
		// there: never mounted twice, never covered.
		if slices.ContainsFunc(mounted, func(m mounts.Entry) bool { return m.Dir == filepath.Join(b.Root, e.Dir) }) {
			b.Log.Info("fstab entry already mounted", "line", e.Line, "spec", e.Spec, "dir", e.Dir)
			continue
		}
		dev, err := b.mountFstabEntry(e)
		if err != nil {
			dir := filepath.Join(b.Root, e.Dir)
			b.Log.Error("host filesystem not mounted: guests with files under it will not be restored", "nofail", e.Nofail(), "err", err)
			if perr := unix.Mount("liveupdate-unmounted", dir, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=4k,mode=0555"); perr != nil {
				return fmt.Errorf("%w; and covering its mount point %s failed: %v", err, dir, perr)
			}
			b.placeholders = append(b.placeholders, dir)
			b.mounted = append(b.mounted, dir)
			continue
		}
		b.mounted = append(b.mounted, filepath.Join(b.Root, e.Dir))
		b.Log.Info("host filesystem mounted", "spec", e.Spec, "dev", dev, "on", filepath.Join(b.Root, e.Dir), "type", e.FSType)
	}
	return nil
}

// mountFstabEntry mounts one fstab entry under the host root. A PMEM one
// (guest RAM on another NUMA node's PMEM, say) is mounted as lu.pmem is:
// DAX checked, and on a first boot with lu.format_pmem=1 formatted when
// empty — memmap= PMEM is blank after every power-on.
func (b *Boot) mountFstabEntry(e mounts.FstabEntry) (string, error) {
	if !e.PMEM() {
		return mounts.MountFstab(e, b.Root)
	}
	dir := filepath.Join(b.Root, e.Dir)
	if err := mounts.MountPMEM(e.Spec, dir, b.Params.FormatPMEM, b.run); err != nil {
		return e.Spec, fmt.Errorf("fstab line %d: %w", e.Line, err)
	}
	b.morePMEM = append(b.morePMEM, e.Dir)
	opts, _ := mounts.MountOptions("/proc/mounts", dir)
	fmt.Fprintf(consoleOut(), "liveupdate: PMEM %s mounted on %s options=%s (fstab)\n", e.Spec, dir, opts)
	return e.Spec, nil
}

// unmountAll is mountAll's and mountFstab's inverse.
func (b *Boot) unmountAll() error { return mounts.Unmount(b.mounted...) }

// readManifest reads and checks the manifest. No manifest means nothing to
// restore (a first boot); a manifest that does not parse, or names paths
// outside the PMEM mount, stops the boot.
func (b *Boot) readManifest(ctx context.Context) error {
	p := b.Params
	path := p.Manifest
	if b.Root != "" && (p.PMEM == "" || !manifest.Within(path, p.PMEMMount)) {
		path = filepath.Join(b.Root, path)
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		b.Log.Info("no manifest: no guests to restore (first boot?)", "path", path)
		return nil
	}
	// Guest RAM may be on any PMEM filesystem mounted: lu.pmem's, and the
	// fstab's (another NUMA node's, say), which update's plan accepts too.
	m, err := manifest.Read(path, append([]string{p.PMEMMount}, b.morePMEM...)...)
	if err != nil {
		return err
	}
	if p.PMEM != "" && !manifest.Within(string(m.StateDir), p.PMEMMount) {
		return fmt.Errorf("manifest state_dir %s is outside the PMEM mount %s", m.StateDir, p.PMEMMount)
	}
	switch {
	case p.PMEM != "":
		if err := m.CheckBeneath(p.PMEMMount, p.PMEMMount); err != nil {
			return err
		}
	case b.Root != "":
		// The state directory on the host root (a host whose guests' RAM
		// is all kept by LUO): its state files must resolve inside it too.
		sd := string(m.StateDir)
		if err := m.CheckBeneath(sd, filepath.Join(b.Root, sd)); err != nil {
			return err
		}
	}
	for _, dir := range b.morePMEM {
		if err := m.CheckBeneath(dir, filepath.Join(b.Root, dir)); err != nil {
			return err
		}
	}
	b.Manifest, b.manifestPath = m, path
	b.Log.Info("manifest read", "path", path, "vms", len(m.VMs), "from_kernel", m.Host.Kernel)
	return nil
}

// setClock steps the wall clock onto the old kernel's, carried across the
// kexec by the TSC: the new kernel seeded it from the RTC, which is off by
// up to a second, and the guests' clocks and blackout figures are taken
// from it. Without a usable TSC the wall clock stays as it is, and the
// boot record says how much less exact the spans across the kexec are.
func (b *Boot) setClock(ctx context.Context) error {
	b.Boot = manifest.Boot{Kernel: b.Stamp.Kernel, Start: b.Stamp.Wall, ClockSource: "rtc", Uncertainty: manifest.RTCUncertainty,
		KernelBoot: time.Duration(b.Uptime0 * float64(time.Second))}
	if b.Manifest == nil || b.Manifest.KexecClock == nil {
		return nil
	}
	kc := b.Manifest.KexecClock
	since, err := crossclock.Since(kc.Kexec, b.Stamp, kc.TSCHz)
	if err != nil {
		b.Log.Warn("wall clock left as the RTC set it (±1 s)", "err", err)
		return nil
	}
	start := kc.Kexec.Wall.Add(since)
	wallErr := b.Stamp.Wall.Sub(start)
	if wallErr.Abs() > time.Hour {
		b.Log.Warn("wall clock left as the RTC set it: the TSC disagrees by more than an hour", "off_by", wallErr)
		return nil
	}
	tv := unix.NsecToTimeval(time.Now().Add(-wallErr).UnixNano())
	if err := unix.Settimeofday(&tv); err != nil {
		b.Log.Warn("setting the wall clock", "err", err)
		return nil
	}
	b.Boot.Start, b.Boot.SinceKexec, b.Boot.WallError = start, since, wallErr
	b.Boot.ClockSource = "tsc"
	b.Boot.Uncertainty = crossclock.Uncertainty(kc.Start, kc.Kexec, b.Stamp, kc.TSCHz)
	b.Log.Info("wall clock set from the TSC across the kexec", "was_off_by", wallErr, "since_kexec", since, "uncertainty", b.Boot.Uncertainty)
	return nil
}

// writeBootRecord puts PID 1's phases next to the manifest, on the run's
// time axis, for `liveupdate status`.
func (b *Boot) writeBootRecord() {
	if b.Manifest == nil {
		return
	}
	for _, p := range b.Phases {
		ph := manifest.Phase{Name: p.Name, Start: b.Boot.Start.Add(p.Start), End: b.Boot.Start.Add(p.Start + p.Took)}
		if p.Err != nil {
			ph.Error = p.Err.Error()
		}
		b.Boot.Phases = append(b.Boot.Phases, ph)
	}
	if err := manifest.WriteBoot(filepath.Dir(b.manifestPath), &b.Boot); err != nil {
		b.Log.Warn("writing the boot record", "err", err)
	}
}

// setupNetwork brings up loopback, DHCP on the management interface, and
// the recorded bridges and taps, then starts attaching the bridges' uplink
// ports (the host's NICs) beside the restore: bringing a NIC up is most of
// a host's network set-up (388 of 659 ms in the nested benchmark), and no
// QEMU waits for it. awaitUplinks collects the result.
func (b *Boot) setupNetwork(ctx context.Context) error {
	if err := netsetup.LoopbackUp(); err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if b.Params.DHCP != "" {
		dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		lease, err := netsetup.DHCP(dctx, b.Params.DHCP)
		cancel()
		if err != nil {
			return err
		}
		b.Log.Info("DHCP lease", "iface", lease.Iface, "addr", lease.Addr, "router", lease.Router, "server", lease.Server)
		fmt.Fprintf(consoleOut(), "liveupdate: DHCP %s %s router %s\n", lease.Iface, lease.Addr, lease.Router)
	}
	if b.Manifest == nil {
		return nil
	}
	got, err := hoststate.RebuildGuestNetwork(b.Manifest)
	for _, br := range b.Manifest.Network.Bridges {
		b.Log.Info("bridge", "name", br.Name, "mac", br.MAC, "addrs", br.Addrs, "ports", br.Ports)
	}
	printHost(got)
	if err != nil {
		return err
	}
	done := make(chan struct{})
	b.uplinks = done
	go b.guard("uplinks", func() {
		defer close(done)
		// What awaitUplinks reports should Uplinks panic (guard recovers).
		b.uplinkErr = errors.New("attaching the bridges' ports did not finish")
		// Their NICs' drivers first (a host's own list tags them @uplinks).
		mctx, cancel := context.WithTimeout(context.Background(), b.Params.DevWait)
		merr := b.awaitModules(mctx, UplinksPhase)
		cancel()
		missing, err := netsetup.Uplinks(b.Manifest.Network)
		err = errors.Join(merr, err)
		b.warnMissing(missing)
		b.uplinkErr = err
	})
	return nil
}

// awaitUplinks waits, after the restore, for the bridges' uplink ports
// setupNetwork started attaching, with lu.devwait as the deadline. A port
// that failed costs the guests their way out of the host, not their run:
// the phase is reported, and the boot goes on.
func (b *Boot) awaitUplinks(ctx context.Context) error {
	if b.uplinks == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, b.Params.DevWait)
	defer cancel()
	select {
	case <-b.uplinks:
		return b.uplinkErr
	case <-ctx.Done():
		return fmt.Errorf("the bridges' uplink ports: %w", ctx.Err())
	}
}

// warnMissing says which bridge ports the network was built without: the
// guests run on their bridges all the same (netsetup.Uplinks says why), and
// the host's own network configuration adds such a port after the handover.
func (b *Boot) warnMissing(missing []string) {
	for _, m := range missing {
		b.Log.Warn("bridge built without a port that cannot be found; the guests run without it until the host's network configuration adds it", "which", m)
		fmt.Fprintf(consoleOut(), "liveupdate: WARNING: %s\n", m)
	}
}

// setupCgroups re-creates the recorded cgroup v2 tree with its limits.
func (b *Boot) setupCgroups(ctx context.Context) error {
	if b.Manifest == nil {
		return nil
	}
	got, err := hoststate.RebuildCgroups(b.Manifest)
	printHost(got)
	return err
}

// printHost shows taps and cgroups as read back from the kernel.
func printHost[T fmt.Stringer](items []T) {
	for _, it := range items {
		fmt.Fprintf(consoleOut(), "liveupdate: %s\n", it)
	}
}

// restoreGuests starts every recorded guest, in parallel, from the host root.
func (b *Boot) restoreGuests(ctx context.Context) error {
	m := b.Manifest
	if m == nil || len(m.VMs) == 0 {
		return nil
	}
	// A liveupdate started meanwhile from the control line or a shell
	// waits its turn (it is told PID 1 holds the lock).
	if l, err := runlock.Acquire(runlock.DefaultPath, "PID 1 restoring the guests"); err == nil {
		defer l.Release()
	} else {
		b.Log.Warn("restoring without the lock", "err", err)
	}
	e := cpr.New(m.StateDir, b.Log)
	e.Root = hostpath.Root(b.Root)
	e.Reaper = b.Reaper() // QEMUs started here are waited for through PID 1's reaper
	e.ClockAsync = true   // READY means running; clocks are put right just after
	b.restorer = e
	// Guest RAM in memfds: the update's LUO session hands it over.
	ram, err := retrieveRAM(m, b.Log)
	if err != nil {
		b.Log.Error("the LUO session keeping the guests' memfd RAM", "err", err)
	}
	var held map[string]map[int]*os.File
	if ram != nil {
		held, b.ram = ram.held, ram
	}
	_, rerr := e.Recover(ctx, m, held)
	for _, v := range m.VMs {
		b.Log.Info("guest", "vm", v.Name, "status", v.Status, "pid", v.NewPID, "err", v.Error)
	}
	if ram != nil {
		ram.finish(m, b.Log)
	}
	return errors.Join(err, rerr)
}

// guard runs fn and keeps a panic in it from taking PID 1 (and with it the
// kernel) down: it is logged instead.
func (b *Boot) guard(name string, fn func()) {
	defer func() {
		if r := recover(); r != nil {
			b.Log.Error("recovered from a panic", "in", name, "panic", r)
		}
	}()
	fn()
}

// Reaper is PID 1's child reaper, for whatever starts processes in PID 1
// (the CPR engine's new QEMUs): started through it, their exit statuses
// reach their waiters instead of being collected as orphans'.
func (b *Boot) Reaper() *reaper.Reaper { return &b.reaper }

// waitClocks waits, before the handover, for the guests' clock fixes the
// restore left running: exec'ing the host's init would end them half-way,
// the guests' clocks left behind by the blackout. The guests run
// meanwhile; only the host's init waits (at most the fixes' own timeout).
func (b *Boot) waitClocks() {
	e := b.restorer
	if e == nil {
		return
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), e.ClockTimeout+5*time.Second)
	defer cancel()
	if !e.WaitClocks(ctx) {
		b.Log.Warn("handing over with guests' clock fixes unfinished: those clocks stay behind by the blackout", "waited", time.Since(start).Round(time.Millisecond))
		return
	}
	b.Log.Info("guests' clocks put right before the handover", "waited", time.Since(start).Round(time.Millisecond))
}

// handover switches root into the host root and execs its init, with the
// guests running. Our bind mounts are dropped first: switch_root moves the
// real /dev, /proc, /sys and /run there.
func (b *Boot) handover() error {
	for _, d := range []string{"/dev", "/proc", "/sys", "/run"} {
		unix.Unmount(filepath.Join(NewRoot, d), unix.MNT_DETACH)
	}
	// The host's init mounts what PID 1 could not (mountFstab).
	for _, d := range b.placeholders {
		if err := unix.Unmount(d, 0); err != nil {
			b.Log.Warn("removing the placeholder over a mount point that failed", "dir", d, "err", err)
		}
	}
	init := b.Params.Init
	if _, err := resolveIn(NewRoot, init); err != nil {
		return fmt.Errorf("host init %s: %w", init, err)
	}
	b.Log.Info("handing over to the host's init", "init", init)
	return mount.SwitchRoot(NewRoot, init)
}

// run runs cmd to its end through PID 1's reaper and returns its output
// (stdout and stderr), as exec.Cmd.CombinedOutput would — which PID 1 must
// not call: the reaper may collect the child first and the wait fail with
// ECHILD ("waitid: no child processes"). The output goes through a file, as
// the reaper takes only *os.File for a child's streams.
func (b *Boot) run(cmd *exec.Cmd) ([]byte, error) {
	f, err := os.CreateTemp("", "liveupdate-cmd-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	child, err := b.reaper.Start(cmd)
	if err != nil {
		return nil, err
	}
	ws, _ := child.Wait(context.Background())
	out, _ := os.ReadFile(f.Name())
	switch {
	case ws.Signaled():
		return out, fmt.Errorf("%s: %v", cmd.Path, ws.Signal())
	case ws.ExitStatus() != 0:
		return out, fmt.Errorf("%s: exit status %d", cmd.Path, ws.ExitStatus())
	}
	return out, nil
}

// resolveIn resolves p as the host root's own processes will see it once
// root is their /: symbolic links are followed with absolute targets taken
// inside root, and ".." stops at it. (On a usr-merged root /sbin/init is
// /sbin → usr/sbin, then usr/sbin/init → /lib/systemd/systemd, which
// os.Stat would look for in the initramfs.) It returns the path from our
// side, under root.
func resolveIn(root, p string) (string, error) {
	const maxLinks = 40 // the kernel's limit
	links := 0
	rest := strings.Split(p, "/")
	cur := "/"
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, c)
		local := filepath.Join(root, next)
		fi, err := os.Lstat(local)
		if err != nil {
			return "", err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		if links++; links > maxLinks {
			return "", fmt.Errorf("%s: too many levels of symbolic links", p)
		}
		target, err := os.Readlink(local)
		if err != nil {
			return "", err
		}
		if path.IsAbs(target) {
			cur = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return filepath.Join(root, cur), nil
}

// supervise is what PID 1 does once up: nothing but reaping and signals.
func (b *Boot) supervise() {
	select {}
}

// kernelUptime reads /proc/uptime.
func kernelUptime() float64 {
	raw, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	var up float64
	fmt.Sscanf(string(raw), "%f", &up)
	return up
}

// reap is PID 1's reaper loop: it collects every child that exits, giving
// the status of those started through b.reaper to their waiters and
// dropping the orphans'.
func (b *Boot) reap() { b.reaper.Run(context.Background()) }

// handleSignals turns SIGTERM/SIGINT/SIGPWR into an orderly stop: every
// guest is saved (CPR) so a later boot restores it; if any cannot be saved,
// every guest keeps running and the machine stays up. Nothing is killed.
func (b *Boot) handleSignals() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGPWR)
	for s := range sig {
		b.Log.Warn("orderly stop requested", "signal", s)
		done, err := b.stop()
		if err != nil {
			b.Log.Error("orderly stop abandoned: guests keep running", "err", err)
			continue
		}
		b.Log.Info(done + ", filesystems unmounted: powering off")
		unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	}
}

// stop ends the guests the way that keeps them, and unmounts; it says what
// it did. On real persistent memory every running guest whose RAM is a
// file there is saved (CPR) for a later boot to restore. On memmap= "PMEM"
// — DRAM that power-off erases —, with no PMEM, and for RAM in memfds, a
// save would keep nothing: those guests are shut down cleanly instead (ACPI
// power button), and if any is still running at the deadline the stop is
// abandoned and every guest left running.
func (b *Boot) stop() (string, error) {
	stateDir := hostpath.QEMU(filepath.Join(b.Params.PMEMMount, "liveupdate"))
	if b.Manifest != nil {
		stateDir = b.Manifest.StateDir
	}
	e := cpr.New(stateDir, b.Log)
	e.Root = hostpath.Root(b.Root)
	e.Reaper = b.Reaper()
	ctx := context.Background()
	ts, err := e.Plan(ctx, nil)
	if err != nil {
		return "", err
	}
	defer cpr.CloseAll(ts)
	// What power-off erases: all RAM on memmap= "PMEM" (or with no PMEM at
	// all), and memfd RAM anywhere (LUO keeps it across a kexec only).
	volatile := b.Params.PMEM == "" || mounts.VolatilePMEM(b.Params.PMEM)
	var down, keep []*cpr.Target
	for _, t := range ts {
		if volatile || inMemory(t) {
			down = append(down, t)
		} else {
			keep = append(keep, t)
		}
	}
	var did []string
	switch {
	case volatile && b.Params.PMEM != "":
		b.Log.Warn("the PMEM is memmap= (RAM that power-off erases): guests are shut down, not saved", "pmem", b.Params.PMEM)
	case volatile:
		b.Log.Warn("no PMEM (guest RAM in memfds, which power-off erases): guests are shut down, not saved")
	case len(down) > 0:
		b.Log.Warn("guests with RAM in memfds (which power-off erases) are shut down, not saved; the others are saved", "vms", len(down))
	}
	if volatile || len(down) > 0 {
		if err := ShutDown(ctx, down, ShutdownTimeout, b.Log); err != nil {
			return "", err
		}
		did = append(did, "guests shut down (their RAM does not survive power-off)")
	}
	if len(keep) > 0 || !volatile && len(down) == 0 {
		for _, t := range keep {
			if !t.Verdict.OK {
				return "", fmt.Errorf("%s cannot be saved: %s", t.Name(), strings.Join(t.Verdict.Problems, "; "))
			}
		}
		if len(keep) > 0 {
			if _, err := e.Save(ctx, keep, cpr.SaveOptions{}); err != nil {
				return "", err
			}
		}
		did = append(did, "guests saved")
	}
	done := strings.Join(did, "; ")
	return done, b.unmountAll()
}

// inMemory tells whether a guest's RAM is a memfd (inherited, or
// memory-backend-memfd): nothing keeps it across a power-off.
func inMemory(t *cpr.Target) bool {
	ram, _ := t.Proc.Cmdline.RAM()
	return slices.ContainsFunc(ram.Backends, func(b qemuargv.MemoryBackend) bool { return b.File() == "" })
}

// ShutdownTimeout bounds the guests' clean shutdown in an orderly stop.
const ShutdownTimeout = 2 * time.Minute

// ShutDown presses every guest's ACPI power button and waits until every
// QEMU is gone, or d has passed; then it names the ones still running,
// which it leaves alone. PID 1's orderly stop on memmap= PMEM is made of
// it; the deadline is a parameter so that a test can wait seconds, not
// ShutdownTimeout, for a guest that ignores the button.
func ShutDown(ctx context.Context, ts []*cpr.Target, d time.Duration, log *slog.Logger) error {
	start := time.Now()
	deadline := start.Add(d)
	for _, t := range ts {
		if t.QMP == nil {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := t.QMP.Execute(qctx, "system_powerdown", nil, nil); err != nil {
			log.Warn("system_powerdown", "vm", t.Name(), "err", err)
		}
		cancel()
	}
	var running []string
	for _, t := range ts {
		if err := qemuproc.WaitGone(t.Proc.PID, time.Until(deadline)); err != nil {
			running = append(running, fmt.Sprintf("%s (pid %d)", t.Name(), t.Proc.PID))
			continue
		}
		log.Info("guest shut down", "vm", t.Name(), "pid", t.Proc.PID, "after", time.Since(start).Round(time.Millisecond))
	}
	if len(running) > 0 {
		return fmt.Errorf("guests still running %s after their ACPI power-down: %s", d, strings.Join(running, ", "))
	}
	return nil
}

// BootHostFile, made from the rescue shell once the guests are back
// (liveupdate recover --host), tells PID 1 on a host it hands over to
// (lu.handover=1) to boot the host's init after all, as after a restore.
const BootHostFile = "/run/liveupdate/boot-host"

// rescue logs a fatal error and runs a shell on the console. The guests'
// RAM and state files are untouched. It never returns: on a host whose
// init PID 1 hands over to, with its root mounted, it hands over when the
// operator makes BootHostFile (the host would otherwise stay without its
// services); elsewhere the shell is all there is.
func (b *Boot) rescue(err error) {
	msg := fmt.Sprintf("liveupdate: FATAL: %v\nNo guest data was touched: guest RAM and state files stay where they are.\n", err)
	if b.Params.Manifest != "" {
		msg += fmt.Sprintf("When the cause is fixed, bring the guests back with: liveupdate recover --host --root %s --manifest %s\n", orSlash(b.Root), b.Params.Manifest)
	}
	canBoot := b.Params.Handover && b.Root != ""
	if canBoot {
		msg += fmt.Sprintf("Then boot the host (%s): mkdir -p %s && touch %s\n", b.Params.Init, filepath.Dir(BootHostFile), BootHostFile)
	}
	if b.Log != nil {
		b.Log.Error("fatal", "err", err)
	}
	if !canBoot {
		b.rescueShellLoop(msg, nil)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go b.guard("rescue shell", func() { defer close(done); b.rescueShellLoop(msg, stop) })
	for {
		if _, err := os.Stat(BootHostFile); err == nil {
			break
		}
		time.Sleep(time.Second)
	}
	os.Remove(BootHostFile)
	close(stop)
	<-done // the shell is gone: the host's init gets the console
	b.Log.Info("booting the host from the rescue shell, as asked", "file", BootHostFile)
	b.waitClocks()
	if err := b.handover(); err != nil {
		b.rescueShellLoop(fmt.Sprintf("liveupdate: handover to the host's init failed: %v\n", err), nil)
	}
}

// rescueShellLoop starts a shell on the console and starts it again when it
// exits, until stop is closed (then it kills the shell and returns; nil:
// never).
func (b *Boot) rescueShellLoop(msg string, stop <-chan struct{}) {
	for {
		con := consoleOut()
		fmt.Fprintf(con, "%sliveupdate: RESCUE SHELL\n", msg)
		cmd := exec.Command(RescueSh)
		if f, err := os.OpenFile("/dev/console", os.O_RDWR, 0); err == nil {
			cmd.Stdin, cmd.Stdout, cmd.Stderr = f, f, f
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
		}
		child, err := b.reaper.Start(cmd)
		if err != nil {
			fmt.Fprintf(con, "liveupdate: cannot start %s: %v\n", RescueSh, err)
			time.Sleep(5 * time.Second)
			continue
		}
		select {
		case <-child.Done():
		case <-stop:
			unix.Kill(-child.Pid, unix.SIGKILL) // its session: the shell and what it runs
			unix.Kill(child.Pid, unix.SIGKILL)  // (no session without a console)
			<-child.Done()
			return
		}
		time.Sleep(time.Second) // no busy loop if the shell dies at once
	}
}

func orSlash(s string) string {
	if s == "" {
		return "/"
	}
	return s
}

// consoleOut is where messages for the operator go.
func consoleOut() io.Writer {
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		return f
	}
	return os.Stderr
}
