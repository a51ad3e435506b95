// Package update is the live kernel update of a host: plan and preflight,
// load the new kernel, save every guest (CPR), record the manifest, sync and
// remount filesystems read-only (PMEM last), and reboot into the new kernel
// with kexec. PID 1 of the new kernel (package pid1) restores the guests.
//
// Phases and their inverses:
//
//	Plan                         (touches nothing)
//	LoadKernel    ↔ UnloadKernel
//	Save (engine) ↔ Resume (engine, automatic)
//	Quit (engine) ↔ Restore (engine)
//	RemountRO     ↔ RemountRW
//	Kexec         (no way back: the old kernel is gone)
//
// Any failure before Kexec runs the inverses in reverse order, so every guest
// ends up running on the old kernel.
package update

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/kernelconfig"
	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/crossclock"
	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/kexec"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"github.com/liveupdate/liveupdate/pkg/preflight"
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
}

// Plan is what an update would do, and what stops it.
type Plan struct {
	VMs          []preflight.Verdict `json:"vms"`
	Kernel       string              `json:"kernel"`
	Initrd       string              `json:"initrd"`
	Cmdline      string              `json:"cmdline"`
	PMEMDevice   string              `json:"pmem_device"`
	PMEMMount    string              `json:"pmem_mount"`
	StateDir     string              `json:"state_dir"`
	KernelConfig string              `json:"kernel_config,omitempty"`
	Problems     []string            `json:"problems,omitempty"`

	targets []*cpr.Target
	start   crossclock.Stamp // first of the two stamps that calibrate the TSC
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
	p := &Plan{Kernel: o.Kernel, Initrd: o.Initrd, StateDir: e.StateDir, start: crossclock.Now()}
	bad := func(format string, a ...any) { p.Problems = append(p.Problems, fmt.Sprintf(format, a...)) }

	var ts []*cpr.Target
	err := e.Timed("plan", "", func() (err error) {
		ts, err = e.Plan(ctx, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	p.targets = ts
	for _, t := range ts {
		p.VMs = append(p.VMs, t.Verdict)
		for _, pr := range t.Verdict.Problems {
			bad("%s: %s", t.Name(), pr)
		}
		for _, pr := range kexecLosses(t.Proc, t.NetNS, filepath.Join(e.ProcRoot, fmt.Sprint(t.Proc.PID), "root")) {
			bad("%s: %s", t.Name(), pr)
		}
	}

	// The state directory must be on a DAX filesystem on PMEM.
	hostState := e.HostPath(e.StateDir)
	m, err := mounts.Holding(o.MountsFile, hostState)
	switch {
	case err != nil:
		bad("state directory %s: %v", e.StateDir, err)
	case !mounts.HasDAX(m.Opts) || !strings.HasPrefix(m.Source, "/dev/pmem"):
		bad("state directory %s is on %s (%s, %s), not on PMEM mounted with dax: guest RAM and state would not survive the kexec. Use --state-dir on the PMEM filesystem", e.StateDir, m.Dir, m.Source, m.Opts)
	default:
		p.PMEMDevice = m.Source
		p.PMEMMount = e.GuestPath(m.Dir)
	}
	// Every guest's RAM must be on that filesystem.
	if p.PMEMMount != "" {
		for _, t := range ts {
			ram, _ := t.Proc.Cmdline.RAM()
			for _, b := range ram.Backends {
				if !manifest.Within(b.MemPath, p.PMEMMount) {
					bad("%s: RAM of backend %q is in %s, not on the PMEM filesystem %s: it would not survive the kexec", t.Name(), b.ID, b.MemPath, p.PMEMMount)
				}
			}
		}
	}

	// Kernel and initramfs.
	for _, f := range []struct{ what, path string }{{"kernel", o.Kernel}, {"initramfs", o.Initrd}} {
		if f.path == "" {
			bad("no %s given", f.what)
			continue
		}
		fh, err := os.Open(e.HostPath(f.path))
		if err != nil {
			bad("%s: %v", f.what, err)
			continue
		}
		fh.Close()
	}
	if cfg := configFor(e.HostPath(o.Kernel)); cfg != "" {
		p.KernelConfig = e.GuestPath(cfg)
		if f, err := os.Open(cfg); err == nil {
			c, err := kernelconfig.ParseConfig(f)
			f.Close()
			if err != nil {
				bad("kernel config %s: %v", p.KernelConfig, err)
			}
			for _, pr := range kernelconfig.Check(c, kernelconfig.Requirements()) {
				bad("new kernel's config %s: %s", p.KernelConfig, pr)
			}
		}
	}

	// The new command line.
	cur, err := os.ReadFile(o.ProcCmdline)
	if err != nil {
		return nil, err
	}
	cmdline, probs := buildCmdline(string(cur), o.Append, p.PMEMDevice, p.PMEMMount, e.StateDir)
	p.Problems = append(p.Problems, probs...)
	p.Cmdline = cmdline
	return p, nil
}

// buildCmdline makes the new kernel's command line from the running one's (or
// base), keeping the PMEM reservation exactly and adding the lu.* parameters.
func buildCmdline(current, base, pmemDev, pmemMount, stateDir string) (string, []string) {
	var probs []string
	curWords := bootparams.Split(current)
	if base == "" {
		base = current
	}
	var words []string
	var luWords []string
	rootSpec := ""
	for _, w := range bootparams.Split(base) {
		k, v, _ := strings.Cut(w, "=")
		switch {
		case k == "BOOT_IMAGE" || k == "initrd":
			continue // the boot loader's, not the kernel's
		case strings.HasPrefix(k, "lu."):
			if k != "lu.format_pmem" && k != "lu.rescue" && k != "lu.pmem" && k != "lu.pmem_mount" && k != "lu.manifest" {
				luWords = append(luWords, w)
			}
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
	lu := map[string]string{}
	for _, w := range luWords {
		k, v, _ := strings.Cut(w, "=")
		lu[k] = v
	}
	if pmemDev != "" {
		lu["lu.pmem"] = pmemDev
		if pmemMount != bootparams.DefaultPMEMMount {
			lu["lu.pmem_mount"] = pmemMount
		}
		if mf := filepath.Join(stateDir, manifest.FileName); mf != filepath.Join(pmemMount, "liveupdate", manifest.FileName) {
			lu["lu.manifest"] = mf
		}
	}
	if _, ok := lu["lu.root"]; !ok && (strings.HasPrefix(rootSpec, "UUID=") || strings.HasPrefix(rootSpec, "LABEL=") || strings.HasPrefix(rootSpec, "/dev/")) {
		lu["lu.root"] = rootSpec
	}
	keys := make([]string, 0, len(lu))
	for k := range lu {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		words = append(words, k+"="+lu[k])
	}
	var quoted []string
	for _, w := range words {
		quoted = append(quoted, bootparams.Quote(w))
	}
	cmdline := strings.Join(quoted, " ")
	if _, err := bootparams.Parse(cmdline); err != nil {
		probs = append(probs, fmt.Sprintf("the new command line would stop PID 1: %v", err))
	}
	return cmdline, probs
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
	// LoadKernel first: a kernel the running one refuses is found out
	// before any guest is touched.
	if err := e.Timed("kexec-load", "", func() error {
		return kexec.Load(e.HostPath(p.Kernel), e.HostPath(p.Initrd), p.Cmdline)
	}); err != nil {
		return nil, fmt.Errorf("no guest was touched: %w", err)
	}
	if err := fault.At("kexec-load"); err != nil {
		kexec.Unload()
		return nil, fmt.Errorf("no guest was touched: %w", err)
	}
	unload := func() {
		if err := kexec.Unload(); err != nil {
			e.Log.Error("unloading the new kernel", "err", err)
		}
	}

	var m *manifest.Manifest
	var err error
	if len(p.targets) > 0 {
		m, err = e.Save(ctx, p.targets, cpr.SaveOptions{})
		if err != nil {
			unload()
			if m != nil && cpr.AnyQuit(m) {
				// Some old QEMUs are gone: bring them back here.
				_, rerr := e.Recover(ctx, m, heldFiles(p.targets))
				return m, fmt.Errorf("update abandoned, guests restored on the running kernel: %w", errors.Join(err, rerr))
			}
			return m, fmt.Errorf("update abandoned: %w", err)
		}
	} else {
		m, err = e.EmptyManifest()
		if err != nil {
			unload()
			return nil, err
		}
	}
	// RemountRO: every other filesystem first; then the manifest records
	// that, and the moment of the kexec; then PMEM, last.
	var remounted []string
	if err := e.Timed("remount-ro", "", func() (err error) {
		remounted, err = remountRO(o.MountsFile, e.HostPath(p.PMEMMount), false, e)
		return err
	}); err != nil {
		return m, rollback(ctx, e, p, m, remounted, unload, err)
	}
	m.Remounted = remounted
	m.KexecClock = kexecClock(p.start, e.Log)
	m.Phases = append(m.Phases, manifest.Phase{Name: "kexec", Start: m.KexecClock.Kexec.Wall})
	if err := e.WriteManifest(); err != nil {
		return m, rollback(ctx, e, p, m, remounted, unload, fmt.Errorf("writing the manifest: %w", err))
	}
	if err := fault.At("remount-ro"); err != nil {
		return m, rollback(ctx, e, p, m, remounted, unload, err)
	}
	pm, err := remountRO(o.MountsFile, e.HostPath(p.PMEMMount), true, e)
	remounted = append(remounted, pm...)
	if err != nil {
		return m, rollback(ctx, e, p, m, remounted, unload, err)
	}
	if err := fault.At("kexec"); err != nil {
		return m, rollback(ctx, e, p, m, remounted, unload, err)
	}
	e.Log.Info("rebooting into the new kernel", "kernel", p.Kernel, "cmdline", p.Cmdline)
	err = kexec.Reboot()
	return m, rollback(ctx, e, p, m, remounted, unload, fmt.Errorf("kexec reboot: %w", err))
}

// rollback brings every guest back on the running kernel.
func rollback(ctx context.Context, e *cpr.Engine, p *Plan, m *manifest.Manifest, remounted []string, unload func(), cause error) error {
	rerr := remountRW(remounted)
	unload()
	var err error
	if len(m.VMs) > 0 {
		_, err = e.Recover(ctx, m, heldFiles(p.targets))
	}
	return fmt.Errorf("update abandoned, guests restored on the running kernel: %w", errors.Join(cause, rerr, err))
}

func heldFiles(ts []*cpr.Target) map[string]map[int]*os.File {
	held := map[string]map[int]*os.File{}
	for _, t := range ts {
		held[t.Name()] = t.Files()
	}
	return held
}

// remountRO syncs and remounts read-only every writable block-device
// filesystem but the one holding pmemMount — or, with pmemOnly, that one
// alone (it goes last). It returns what it remounted.
func remountRO(mountsFile, pmemMount string, pmemOnly bool, e *cpr.Engine) ([]string, error) {
	unix.Sync()
	ms, err := mounts.Table(mountsFile)
	if err != nil {
		return nil, err
	}
	var order []string
	seen := map[string]bool{}
	pmemDir := ""
	for i := len(ms) - 1; i >= 0; i-- {
		m := ms[i]
		if !strings.HasPrefix(m.Source, "/dev/") || seen[m.Source] || !slices.Contains(strings.Split(m.Opts, ","), "rw") {
			continue
		}
		seen[m.Source] = true
		if m.Dir == pmemMount {
			pmemDir = m.Dir
			continue
		}
		order = append(order, m.Dir)
	}
	if pmemOnly {
		order = nil
		if pmemDir != "" {
			order = []string{pmemDir}
		}
	}
	var done []string
	for _, d := range order {
		if err := unix.Mount("", d, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			e.Log.Warn("cannot remount read-only (synced instead)", "mount", d, "err", err)
			continue
		}
		done = append(done, d)
	}
	unix.Sync()
	return done, nil
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
