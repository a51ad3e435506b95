package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/kernelconfig"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/guestagent"
	"github.com/liveupdate/liveupdate/pkg/hostmods"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/machined"
	"github.com/liveupdate/liveupdate/pkg/machines"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/runlock"
	"github.com/liveupdate/liveupdate/pkg/timeline"
	"github.com/liveupdate/liveupdate/pkg/update"
)

const defaultStateDir = "/var/lib/liveupdate"

// Exit codes: 0 done, 1 failed (what happened to each VM is printed),
// 2 bad usage, 3 refused by preflight (nothing was touched).
const (
	exitOK      = 0
	exitFailed  = 1
	exitUsage   = 2
	exitRefused = 3
)

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout io.Writer) int
}

var commands = []command{
	{"plan", "list running QEMUs and their preflight verdicts", cmdPlan},
	{"save", "save VMs' device state and quit their QEMUs", cmdSave},
	{"restore", "restore the VMs recorded in a manifest", cmdRestore},
	{"restart-qemu", "live-restart QEMU under running guests", cmdRestartQEMU},
	{"check-kernel", "check a kernel config: the host's options, the PMEM and the LUO backend's", cmdCheckKernel},
	{"host-modules", "the kernel modules this host's disks, PMEM, NICs and KVM need, for the initramfs' list", cmdHostModules},
	{"update", "live kernel update: save guests, kexec into a new kernel", cmdUpdate},
	{"recover", "bring every guest of an interrupted run back to running (cont or restore); safe to repeat", cmdRecover},
	{"status", "the last run: each guest's blackout and every phase, as a table, JSON, SVG or metrics", cmdStatus},
	{"sync-clock", "set running guests' clocks to the host's through their guest agents", cmdSyncClock},
	{"exec-memfd", "start a QEMU with its guest RAM in memfds passed as fds 3, 4, … (the LUO backend's guest)", cmdExecMemfd},
	{"register-machines", "after a kexec, make libvirt's restored guests systemd-machined machines again, before libvirt's daemon starts", cmdRegisterMachines},
}

func cmdStatus(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("status", "status [--manifest PATH] [--json] [--svg FILE] [--prom FILE]", &c)
	mpath := fs.String("manifest", "", "the run's manifest (default: STATE_DIR/manifest.json); PID 1's boot record is read from next to it")
	asJSON := fs.Bool("json", false, "print the timeline as JSON")
	svg := fs.String("svg", "", "also write a waterfall picture of the run to `FILE`")
	prom := fs.String("prom", "", "also write the figures as node_exporter textfile metrics to `FILE` (e.g. …/textfile/liveupdate.prom)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	if *mpath == "" {
		*mpath = c.manifestPath()
	}
	m, err := manifest.Read(*mpath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate status:", err)
		return exitFailed
	}
	boot, err := manifest.ReadBoot(filepath.Dir(*mpath))
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate status: the boot record is unreadable, showing the manifest alone:", err)
	}
	tl := timeline.Build(m, boot)
	for _, f := range []struct {
		path   string
		render func(io.Writer)
	}{{*svg, tl.SVG}, {*prom, tl.Prom}} {
		if f.path == "" {
			continue
		}
		var b bytes.Buffer
		f.render(&b)
		// Atomic, so that a textfile collector never reads half a file.
		if err := manifest.WriteFileAtomic(f.path, b.Bytes(), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "liveupdate status:", err)
			return exitFailed
		}
	}
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.Encode(tl)
		return exitOK
	}
	tl.Table(out)
	return exitOK
}

func cmdSyncClock(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("sync-clock", "sync-clock [--timeout D] [VM…]", &c)
	timeout := fs.Duration("timeout", 15*time.Second, "how long to wait for each guest's agent to answer (it is asked again until then)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	e := c.engine()
	ts, err := e.Plan(ctx, fs.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate sync-clock:", err)
		return exitFailed
	}
	defer cpr.CloseAll(ts)
	code := exitOK
	for _, t := range ts {
		sock := guestagent.ProcessSocket(t.Proc)
		if sock == "" {
			fmt.Fprintf(out, "%s: no guest agent channel\n", t.Name())
			code = exitFailed
			continue
		}
		local := e.Root.Local(hostpath.Arg(e.Root.QEMU(hostpath.Local(t.Proc.Cwd)), sock))
		actx, cancel := context.WithTimeout(ctx, *timeout)
		off, err := guestagent.SyncClock(actx, string(local), *timeout)
		cancel()
		if err != nil {
			fmt.Fprintf(out, "%s: %v\n", t.Name(), err)
			code = exitFailed
			continue
		}
		fmt.Fprintf(out, "%s: clock set to the host's (guest − host = %s after)\n", t.Name(), off.Round(time.Microsecond))
	}
	return code
}

// cmdExecMemfd makes one memfd per --mib, passes them as fds 3, 4, … and
// execs the command (QEMU, whose argv names each as
// memory-backend-file,mem-path=/proc/self/fd/N,share=on): a guest whose RAM
// the LUO backend keeps across a kexec, started by hand or by a unit.
func cmdExecMemfd(_ context.Context, args []string, out io.Writer) int {
	fs := flag.NewFlagSet("exec-memfd", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: liveupdate exec-memfd --mib N [--mib N…] -- QEMU [ARG…]\n"+
			"  each --mib is a memfd of N MiB, given to the command as fd 3, 4, … in order; name it in QEMU's\n"+
			"  argv as -object memory-backend-file,id=ID,size=NM,mem-path=/proc/self/fd/3,share=on")
		fs.PrintDefaults()
	}
	var sizes []int
	fs.Func("mib", "size of the next memfd, in MiB", func(v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("--mib %q: want a size in MiB above 0", v)
		}
		sizes = append(sizes, n)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	argv := fs.Args()
	if len(sizes) == 0 || len(argv) == 0 {
		fs.Usage()
		return exitUsage
	}
	bin, err := exec.LookPath(argv[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate exec-memfd:", err)
		return exitFailed
	}
	for i, mib := range sizes {
		f, err := qemuproc.RAMMemfd(fmt.Sprintf("guest-ram%d", i), int64(mib)<<20)
		if err != nil {
			fmt.Fprintln(os.Stderr, "liveupdate exec-memfd:", err)
			return exitFailed
		}
		// Put it at 3+i, without close-on-exec: the command inherits it.
		if err := unix.Dup3(int(f.Fd()), 3+i, 0); err != nil {
			fmt.Fprintf(os.Stderr, "liveupdate exec-memfd: placing memfd %d at fd %d: %v\n", i, 3+i, err)
			return exitFailed
		}
		f.Close()
	}
	err = unix.Exec(bin, argv, os.Environ())
	fmt.Fprintf(os.Stderr, "liveupdate exec-memfd: exec %s: %v\n", bin, err)
	return exitFailed
}

// cmdRegisterMachines is liveupdate-machines.service's: it runs once systemd
// and machined are up, before libvirt's daemon, which would stop a guest
// whose machine machined does not know (package machines).
func cmdRegisterMachines(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("register-machines", "register-machines [--timeout D]", &c)
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for systemd-machined and systemd (a guest not registered by then is put back as it was)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	l, ok := c.lock("register-machines", args)
	if !ok {
		return exitFailed
	}
	defer l.Release()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	conn, err := machined.Dial(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate register-machines:", err)
		return exitFailed
	}
	defer conn.Close()
	res, err := machines.Register(ctx, machines.Options{Machined: conn, Log: c.engine().Log})
	for _, r := range res {
		fmt.Fprintf(out, "%s: QEMU pid %d: %s (%s)\n", r.Guest, r.PID, r.Done, r.Unit)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "liveupdate register-machines: %v\nThe guests run on; do not start libvirt's daemon before this is solved: it would stop a guest machined does not know (run 'liveupdate register-machines' again)\n", err)
		return exitFailed
	}
	return exitOK
}

func cmdUpdate(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("update", "update --kernel VMLINUZ --initrd INITRAMFS [--append \"…\"] [--keep-control] [--dry-run] [--json]", &c)
	kernel := fs.String("kernel", "", "the new kernel image (bzImage)")
	initrd := fs.String("initrd", "", "this project's initramfs for that kernel (make initramfs)")
	appendArgs := fs.String("append", "", "the new kernel's command line (default: the running one's); memmap= must stay as it is")
	keepControl := fs.Bool("keep-control", false, "carry lu.control (a root shell on a serial line) into the new kernel's command line; without it, it is dropped")
	dry := fs.Bool("dry-run", false, "plan and check, print the plan, change nothing")
	asJSON := fs.Bool("json", false, "print the plan (and outcome) as JSON")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	if !*dry {
		l, ok := c.lock("update", args)
		if !ok {
			return exitRefused
		}
		defer l.Release()
	}
	e := c.engine()
	p, err := update.MakePlan(ctx, e, update.Options{Kernel: *kernel, Initrd: *initrd, Append: *appendArgs, KeepControl: *keepControl})
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate update:", err)
		return exitFailed
	}
	defer p.Close()
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.Encode(p)
	} else {
		printPlan(out, p)
	}
	if !p.OK() {
		fmt.Fprintf(os.Stderr, "liveupdate update: refusing, nothing was changed:\n  %s\n", strings.Join(p.Problems, "\n  "))
		return exitRefused
	}
	if *dry {
		return exitOK
	}
	m, err := update.Run(ctx, e, p, update.Options{Kernel: *kernel, Initrd: *initrd, Append: *appendArgs, KeepControl: *keepControl})
	if m != nil {
		report(out, m, *asJSON)
	}
	fmt.Fprintln(os.Stderr, "liveupdate update:", err)
	return exitFailed
}

func printPlan(out io.Writer, p *update.Plan) {
	fmt.Fprintf(out, "kernel:     %s\ninitramfs:  %s\ncmdline:    %s\nPMEM:       %s on %s\nstate dir:  %s (on the filesystem of %s)\n",
		p.Kernel, p.Initrd, p.Cmdline, orDash(p.PMEMDevice), orDash(p.PMEMMount), p.StateDir, orDash(p.StateMount))
	if p.KernelConfig != "" {
		fmt.Fprintf(out, "config:     %s\n", p.KernelConfig)
	}
	for _, n := range p.Notes {
		fmt.Fprintf(out, "note:       %s\n", n)
	}
	fmt.Fprintf(out, "guests:     %d\n", len(p.VMs))
	for _, v := range p.VMs {
		verdict := "safe"
		if !v.OK {
			verdict = "UNSAFE"
		}
		var ram []string
		for _, b := range v.RAM {
			r := b.ID + " " + b.Kind
			if b.Path != "" {
				r += " " + b.Path
			}
			ram = append(ram, r)
		}
		fmt.Fprintf(out, "  %s (pid %d): %s; RAM: %s\n", v.VM, v.PID, verdict, orDash(strings.Join(ram, ", ")))
	}
}

func cmdCheckKernel(ctx context.Context, args []string, out io.Writer) int {
	fs := flag.NewFlagSet("check-kernel", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: liveupdate check-kernel PATH_TO_CONFIG\n\nSays whether the config has what every host needs (kernelconfig/host.config)\nand what each RAM backend needs (pmem.config, luo.config), listing what it\nlacks; exit 1 unless it has the host's options and one backend's.\n")
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return exitUsage
	}
	f, err := os.Open(fs.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate check-kernel:", err)
		return exitFailed
	}
	defer f.Close()
	cfg, err := kernelconfig.ParseConfig(f)
	if err != nil {
		fmt.Fprintf(os.Stderr, "liveupdate check-kernel: %s: %v\n", fs.Arg(0), err)
		return exitFailed
	}
	r := kernelconfig.Readiness(cfg)
	line := func(what string, ps []kernelconfig.Problem, n int, hint string) {
		if len(ps) == 0 {
			fmt.Fprintf(out, "%s: ready (%d options checked)\n", what, n)
			return
		}
		fmt.Fprintf(out, "%s: not ready, %d option(s) missing or wrong%s\n", what, len(ps), hint)
		for _, p := range ps {
			fmt.Fprintf(out, "  %s\n", p)
		}
	}
	line("host", r.Host, len(kernelconfig.Host()), "")
	line("PMEM backend (guest RAM on a DAX filesystem)", r.PMEM, len(kernelconfig.PMEM()), "")
	line("LUO backend (guest RAM in memfds kept by the Live Update Orchestrator; boot with kho=on liveupdate=on)", r.LUO, len(kernelconfig.LUO()), "")
	if !r.Ready() {
		fmt.Fprintf(out, "%s: not a liveupdate host: it needs everything of \"host\" and one backend\n", fs.Arg(0))
		return exitFailed
	}
	fmt.Fprintf(out, "%s: a liveupdate host\n", fs.Arg(0))
	return exitOK
}

func cmdHostModules(ctx context.Context, args []string, out io.Writer) int {
	fs := flag.NewFlagSet("host-modules", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: liveupdate host-modules\n\nPrints, in initramfs/modules.txt's form, the modules this host's new kernel\nneeds before its guests run again that are modules here: the drivers under\nits mounted disk filesystems and PMEM, the filesystems', its NICs' (bonds,\nVLANs), and KVM's. initramfs/build.sh adds them when it builds for this host.\n")
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return exitUsage
	}
	n, err := hostmods.Host{}.Read()
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate host-modules:", err)
		return exitFailed
	}
	fmt.Fprint(out, n.List())
	return exitOK
}

// usage lists the commands, from the command table.
func usage() {
	var b strings.Builder
	b.WriteString("usage: liveupdate COMMAND [flags] [args]\n\ncommands:\n")
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	tw.Flush()
	b.WriteString("\nRun 'liveupdate COMMAND -h' for a command's flags.\n")
	fmt.Fprint(os.Stderr, b.String())
}

func runCLI(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage()
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	for _, c := range commands {
		if c.name == args[0] {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return c.run(ctx, args[1:], os.Stdout)
		}
	}
	fmt.Fprintf(os.Stderr, "liveupdate: unknown command %q\n", args[0])
	usage()
	return exitUsage
}

// commonFlags are the flags every engine command takes.
type commonFlags struct {
	stateDir string
	verbose  bool
	qmpWait  time.Duration
	root     string
	lockPath string
	clock    time.Duration
	noRT     bool
}

func newFlagSet(name, synopsis string, c *commonFlags) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: liveupdate %s\n\n", synopsis)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.stateDir, "state-dir", defaultStateDir, "directory for state files and the manifest (for a kernel update: on the PMEM filesystem; on the root or another disk filesystem of /etc/fstab when every guest's RAM is a memfd kept by LUO)")
	fs.BoolVar(&c.verbose, "v", false, "verbose logging")
	fs.DurationVar(&c.qmpWait, "qmp-timeout", 5*time.Second, "how long to wait for each QEMU's QMP monitor")
	fs.DurationVar(&c.clock, "clock-timeout", cpr.ClockFixTimeout, "how long to try to put each restored guest's clock right through its agent")
	fs.BoolVar(&c.noRT, "no-realtime", false, "keep every thread at its own scheduling: QEMU's main thread and ours are not raised to real-time priority (SCHED_FIFO 1) for the milliseconds of a guest's save and load")
	fs.StringVar(&c.lockPath, "lock", runlock.DefaultPath, "the lock that lets one liveupdate at a time change guests")
	fs.StringVar(&c.root, "root", "", "the host root as this process sees it when run from PID 1's shell (/newroot): QEMUs run chrooted there and paths are inside it")
	return fs
}

// lock takes the one-updater lock for a command that changes guests, and
// the guard that keeps libvirt's daemons from starting until it is
// released (libvirt.Guard); on failure it prints who holds the lock.
func (c *commonFlags) lock(cmd string, args []string) (*held, bool) {
	l, err := runlock.Acquire(c.lockPath, strings.TrimSpace(cmd+" "+strings.Join(args, " ")))
	if err != nil {
		fmt.Fprintf(os.Stderr, "liveupdate %s: %v\n", cmd, err)
		return nil, false
	}
	g, err := libvirt.Hold(c.root)
	if err != nil {
		l.Release()
		fmt.Fprintf(os.Stderr, "liveupdate %s: keeping libvirt's daemons from starting during the run: %v\n", cmd, err)
		return nil, false
	}
	return &held{l, g}, true
}

// held is what a command that changes guests holds until it ends.
type held struct {
	run     *runlock.Lock
	libvirt *libvirt.Guard
}

func (h *held) Release() {
	h.libvirt.Release()
	h.run.Release()
}

func (c *commonFlags) engine() *cpr.Engine {
	lvl := slog.LevelInfo
	if c.verbose {
		lvl = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	e := cpr.New(hostpath.QEMU(c.stateDir), log)
	e.QMPTimeout = c.qmpWait
	e.ClockTimeout = c.clock
	e.NoRealtime = c.noRT
	e.Root = hostpath.Root(c.root)
	return e
}

func parse(fs *flag.FlagSet, args []string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK, false
		}
		return exitUsage, false
	}
	return 0, true
}

func cmdPlan(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("plan", "plan [--json] [VM…]", &c)
	asJSON := fs.Bool("json", false, "print the verdicts as JSON")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	e := c.engine()
	ts, err := e.Plan(ctx, fs.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate plan:", err)
		return exitFailed
	}
	defer cpr.CloseAll(ts)
	code := exitOK
	if *asJSON {
		var vs []any
		for _, t := range ts {
			vs = append(vs, t.Verdict)
			if !t.Verdict.OK {
				code = exitRefused
			}
		}
		if vs == nil {
			vs = []any{}
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.Encode(vs)
		return code
	}
	if len(ts) == 0 {
		fmt.Fprintln(out, "no running QEMU found")
		return exitOK
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tPID\tQEMU\tMACHINE\tSTATE\tRAM\tVERDICT")
	for _, t := range ts {
		v := "safe"
		switch {
		case !t.Verdict.OK:
			v = "UNSAFE"
			code = exitRefused
		case len(t.Verdict.UpdateProblems) > 0:
			v = "restart only" // restart-qemu takes it, an update would not
		}
		kinds := []string{}
		for _, b := range t.Verdict.RAM {
			if !slices.Contains(kinds, b.Kind) {
				kinds = append(kinds, b.Kind)
			}
		}
		if len(kinds) == 0 {
			kinds = []string{"-"}
		}
		ver := "?"
		if t.Facts.QMPErr == nil {
			ver = fmt.Sprintf("%d.%d.%d", t.Facts.Version[0], t.Facts.Version[1], t.Facts.Version[2])
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", t.Name(), t.Proc.PID, ver,
			strings.TrimSuffix(t.Facts.MachineType, "-machine"), orDash(t.Facts.Status), strings.Join(kinds, ","), v)
	}
	tw.Flush()
	for _, t := range ts {
		for _, p := range t.Verdict.Problems {
			fmt.Fprintf(out, "  %s: %s\n", t.Name(), p)
		}
		for _, p := range t.Verdict.UpdateProblems {
			fmt.Fprintf(out, "  %s: not for an update: %s\n", t.Name(), p)
		}
		for _, n := range t.Verdict.Notes {
			fmt.Fprintf(out, "  %s: note: %s\n", t.Name(), n)
		}
	}
	return code
}

func cmdSave(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("save", "save [--qemu NEW_BINARY] [VM…]", &c)
	binary := fs.String("qemu", "", "QEMU binary the VMs will be restored on (default: the one each runs now)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	l, ok := c.lock("save", args)
	if !ok {
		return exitRefused
	}
	defer l.Release()
	e := c.engine()
	ts, err := e.Plan(ctx, fs.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate save:", err)
		return exitFailed
	}
	defer cpr.CloseAll(ts)
	if len(ts) == 0 {
		fmt.Fprintln(os.Stderr, "liveupdate save: no running QEMU found")
		return exitFailed
	}
	if refused := refusals(ts); refused != "" {
		fmt.Fprintf(os.Stderr, "liveupdate save: refusing to touch any VM, these are not safe (nothing was changed):\n%s", refused)
		return exitRefused
	}
	m, err := e.Save(ctx, ts, cpr.SaveOptions{QEMUBinary: *binary})
	if m != nil {
		printVMs(out, m)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate save:", err)
		return exitFailed
	}
	fmt.Fprintf(out, "saved %d VM(s); manifest %s\nrestore with: liveupdate restore --manifest %s\n",
		len(m.VMs), c.manifestPath(), c.manifestPath())
	return exitOK
}

func cmdRestore(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("restore", "restore [--manifest PATH] [--host] [--json]", &c)
	mpath := fs.String("manifest", "", "manifest to restore from (default: STATE_DIR/manifest.json)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	host := fs.Bool("host", false, "first re-create the manifest's bridges, taps and cgroup tree, as PID 1 does after kexec\n(for a rescue shell after PID 1 stopped before doing so)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	m, release, code, ok := c.openRun("restore", args, *mpath, *host, out)
	if !ok || m == nil {
		return code
	}
	defer release()
	err := c.engine().Restore(ctx, m, nil)
	report(out, m, *asJSON)
	if err != nil {
		fmt.Fprintf(os.Stderr, "liveupdate restore: %v\nRAM and state files of failed VMs are kept; fix the cause and run 'liveupdate recover' (or restore) again\n", err)
		return exitFailed
	}
	return exitOK
}

// openRun starts restore or recover: it takes the lock, reads the manifest
// (default STATE_DIR/manifest.json; a missing one is no interrupted run:
// nil, exit 0) and, with host, rebuilds the manifest's network and cgroups.
func (c *commonFlags) openRun(cmd string, args []string, path string, host bool, out io.Writer) (*manifest.Manifest, func(), int, bool) {
	l, ok := c.lock(cmd, args)
	if !ok {
		return nil, nil, exitRefused, false
	}
	if path == "" {
		path = c.manifestPath()
	}
	m, err := manifest.Read(path)
	if errors.Is(err, os.ErrNotExist) {
		l.Release()
		fmt.Fprintf(out, "no manifest at %s: no interrupted run to %s\n", path, cmd)
		return nil, nil, exitOK, true
	}
	if err != nil {
		l.Release()
		fmt.Fprintf(os.Stderr, "liveupdate %s: %v\nNothing was touched. If the manifest is damaged, put a good copy in its place (the guests' RAM and state files are where it says).\n", cmd, err)
		return nil, nil, exitFailed, false
	}
	if host {
		if err := rebuildHost(m, os.Stderr); err != nil {
			l.Release()
			fmt.Fprintf(os.Stderr, "liveupdate %s: rebuilding the host for the guests: %v\nNo guest was touched; their RAM and state files are kept\n", cmd, err)
			return nil, nil, exitFailed, false
		}
	}
	return m, l.Release, exitOK, true
}

// rebuildHost re-creates the manifest's network and cgroups and shows what
// the kernel reads back.
func rebuildHost(m *manifest.Manifest, out io.Writer) error {
	taps, missing, err := hoststate.RebuildNetwork(m)
	for _, t := range taps {
		fmt.Fprintln(out, t)
	}
	for _, port := range missing {
		fmt.Fprintf(out, "warning: %s (the guests run on the bridge without it)\n", port)
	}
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	cgs, err := hoststate.RebuildCgroups(m)
	for _, c := range cgs {
		fmt.Fprintln(out, c)
	}
	if err != nil {
		return fmt.Errorf("cgroups: %w", err)
	}
	return nil
}

func cmdRecover(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("recover", "recover [--manifest PATH] [--host] [--json]", &c)
	mpath := fs.String("manifest", "", "the manifest of the interrupted run (default: STATE_DIR/manifest.json)")
	asJSON := fs.Bool("json", false, "print what was done as JSON")
	host := fs.Bool("host", false, "first re-create the manifest's bridges, taps and cgroup tree (after a kexec, when PID 1 stopped before doing so)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	m, release, code, ok := c.openRun("recover", args, *mpath, *host, out)
	if !ok || m == nil {
		return code
	}
	defer release()
	rs, err := update.Recover(ctx, c.engine(), m, nil)
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.Encode(rs)
	} else {
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VM\tDONE\tDETAIL")
		for _, r := range rs {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", r.VM, r.Action, r.Detail)
		}
		tw.Flush()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "liveupdate recover: %v\nRAM and state files of the guests not running are kept; fix the cause and run recover again\n", err)
		return exitFailed
	}
	return exitOK
}

func cmdRestartQEMU(ctx context.Context, args []string, out io.Writer) int {
	var c commonFlags
	fs := newFlagSet("restart-qemu", "restart-qemu [--qemu NEW_BINARY] [--json] [--skip-unsafe] [--copy-ram] [--sequential] [--no-transfer] [--each [--parallel N]] [VM…]", &c)
	binary := fs.String("qemu", "", "restart the VMs on this QEMU binary (default: the one each runs now)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	skip := fs.Bool("skip-unsafe", false, "restart the safe VMs and leave unsafe ones running untouched (default: refuse all)")
	sequential := fs.Bool("sequential", false, "start each new QEMU only after its old one quit (the default starts it\nbefore the save, so that QEMU's start-up is not part of the blackout)")
	copyRAM := fs.Bool("copy-ram", false, "also copy guest RAM through the state file, as a plain migration does\n(the slow way, for comparison; the default leaves shared RAM in place)")
	each := fs.Bool("each", false, "take each guest on its own: save, load and cont it as soon as its turn comes,\nwithout waiting for the others; a guest that fails goes back to its old QEMU\nalone (the default: every guest saves before any loads, and a failed save\nresumes them all)")
	parallel := fs.Int("parallel", runtime.NumCPU(), "with --each, how many guests are in their blackout at once")
	noTransfer := fs.Bool("no-transfer", false, "restart every guest the cpr-reboot way (state file); the default hands\nguests started with -machine aux-ram-share=on over by QEMU's cpr-transfer")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	if *parallel < 1 {
		fmt.Fprintf(os.Stderr, "liveupdate restart-qemu: --parallel %d: give at least 1\n", *parallel)
		return exitUsage
	}
	o := cpr.SaveOptions{QEMUBinary: *binary, CopyRAM: *copyRAM, EarlyStart: !*sequential, Transfer: !*noTransfer}
	if *each {
		o.Each = *parallel
	}
	l, ok := c.lock("restart-qemu", args)
	if !ok {
		return exitRefused
	}
	defer l.Release()
	e := c.engine()
	m, ts, err := e.RestartQEMU(ctx, fs.Args(), o, *skip)
	if m == nil {
		if err != nil {
			fmt.Fprintln(os.Stderr, "liveupdate restart-qemu:", err)
		}
		if ts != nil && refusals(ts) != "" {
			return exitRefused
		}
		return exitFailed
	}
	report(out, m, *asJSON)
	if err != nil {
		fmt.Fprintln(os.Stderr, "liveupdate restart-qemu:", err)
		return exitFailed
	}
	return exitOK
}

func refusals(ts []*cpr.Target) string {
	var b strings.Builder
	for _, t := range ts {
		for _, p := range t.Verdict.Problems {
			fmt.Fprintf(&b, "  %s: %s\n", t.Name(), p)
		}
	}
	return b.String()
}

// manifestPath is the manifest in the state directory, as this process
// sees it: --state-dir is QEMU's path, inside --root when run from PID 1's
// shell (the same path for PMEM, bound into the root; not for a state
// directory on the host root itself).
func (c *commonFlags) manifestPath() string {
	return string(hostpath.Root(c.root).Local(hostpath.QEMU(filepath.Join(c.stateDir, manifest.FileName))))
}

// Result is the JSON shape of a restore/restart report.
type Result struct {
	ID     string           `json:"id"`
	VMs    []VMResult       `json:"vms"`
	Phases []manifest.Phase `json:"phases"`
}

// VMResult is one VM's outcome.
type VMResult struct {
	Name       string          `json:"name"`
	Status     manifest.Status `json:"status"`
	Error      string          `json:"error,omitempty"`
	BlackoutMS float64         `json:"blackout_ms"`
	StateBytes int64           `json:"state_bytes"`
	RAMBytes   uint64          `json:"ram_bytes"`
	OldPID     int             `json:"old_pid"`
	NewPID     int             `json:"new_pid,omitempty"`
	Clock      string          `json:"clock,omitempty"`
	ClockOffMS float64         `json:"clock_offset_ms,omitempty"`
	// Mode is how the device state went: "cpr-reboot" (a state file) or
	// "cpr-transfer" (streamed to the new QEMU).
	Mode string `json:"mode"`
}

func results(m *manifest.Manifest) Result {
	r := Result{ID: m.ID, Phases: m.Phases}
	for _, v := range m.VMs {
		var ram uint64
		for _, b := range v.RAM {
			ram += b.Size
		}
		mode := "cpr-reboot"
		if v.Transfer != nil {
			mode = "cpr-transfer"
		}
		r.VMs = append(r.VMs, VMResult{Mode: mode, Name: v.Name, Status: v.Status, Error: v.Error,
			BlackoutMS: float64(v.Blackout().Microseconds()) / 1000, StateBytes: v.StateSize,
			RAMBytes: ram, OldPID: v.PID, NewPID: v.NewPID, Clock: v.Clock,
			ClockOffMS: ms(v.ClockOffset)})
	}
	return r
}

func report(out io.Writer, m *manifest.Manifest, asJSON bool) {
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.Encode(results(m))
		return
	}
	printVMs(out, m)
	if len(m.Phases) > 0 {
		fmt.Fprintln(out)
		timeline.Build(m, nil).PhaseTable(out)
	}
}

func printVMs(out io.Writer, m *manifest.Manifest) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tSTATUS\tBLACKOUT\tSTATE FILE\tGUEST RAM\tPID\tCLOCK")
	for _, r := range results(m).VMs {
		bo := "-"
		if r.BlackoutMS > 0 {
			bo = fmt.Sprintf("%.1f ms", r.BlackoutMS)
		}
		pid := fmt.Sprint(r.OldPID)
		if r.NewPID != 0 {
			pid = fmt.Sprintf("%d → %d", r.OldPID, r.NewPID)
		}
		clock := orDash(r.Clock)
		if r.Clock == "corrected" {
			clock = fmt.Sprintf("corrected (%+.1f ms)", r.ClockOffMS)
		}
		state := size(uint64(r.StateBytes))
		if r.Mode == "cpr-transfer" {
			state = "none: cpr-transfer"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, r.Status, bo, state, size(r.RAMBytes), pid, clock)
	}
	tw.Flush()
	for _, v := range m.VMs {
		if v.Error != "" {
			fmt.Fprintf(out, "  %s: %s\n", v.Name, v.Error)
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func size(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
