// Package qemutests holds the tests that run real QEMU under TCG: local CPR
// tests (tier 2, this file's helpers) and, later, boot and nested update
// tests. They need root (taps, network namespaces, mount namespaces) and the
// set-up's QEMU 10 and Debian kernels (scripts/setup.sh).
package qemutests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

var (
	repoRoot    string
	binDir      string // liveupdate + heartbeat built for this run
	guestInitrd string
	guestKernel string
	qemuBinary  string
)

func TestMain(m *testing.M) {
	os.Exit(setup(m))
}

func setup(m *testing.M) int {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Dir(filepath.Dir(file))
	var err error
	binDir, err = os.MkdirTemp("", "liveupdate-qemu-tests")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(binDir)
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "qemu-tests: need root (taps, network and mount namespaces)")
		return 1
	}
	qemuBinary, err = exec.LookPath("qemu-system-x86_64")
	if err != nil {
		fmt.Fprintln(os.Stderr, "qemu-tests: qemu-system-x86_64 not found: run scripts/setup.sh")
		return 1
	}
	guestKernel = filepath.Join(repoRoot, ".cache/kernels/new/vmlinuz")
	if _, err := os.Stat(guestKernel); err != nil {
		fmt.Fprintln(os.Stderr, "qemu-tests: guest kernel missing: run scripts/setup.sh:", err)
		return 1
	}
	for _, b := range []struct{ out, pkg, tags string }{
		{"liveupdate", "./init", ""}, {"heartbeat", "./cmds/heartbeat", ""}, {"mkinitrd", "./cmds/mkinitrd", ""},
		// The same program with the fault-injection hook compiled in.
		{"liveupdate-fault", "./init", "faultinject"},
	} {
		args := []string{"build", "-tags", b.tags, "-o", filepath.Join(binDir, b.out)}
		env := append(os.Environ(), "CGO_ENABLED=0")
		// LU_RACE=1 (make test): the program under test runs with the race
		// detector, which needs cgo; the guest's programs stay static.
		if os.Getenv("LU_RACE") == "1" && b.pkg == "./init" {
			args = append(args, "-race")
			env = append(os.Environ(), "CGO_ENABLED=1")
		}
		cmd := exec.Command("go", append(args, b.pkg)...)
		cmd.Dir = repoRoot
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", b.pkg, err, out)
			return 1
		}
	}
	guestInitrd = filepath.Join(binDir, "guest.cpio.gz")
	if out, err := exec.Command(filepath.Join(repoRoot, "scripts/guest-initrd.sh"), guestInitrd).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building guest initramfs: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// guest is one test VM: a heartbeat guest under QEMU, started with
// -daemonize as a service manager would, so it is not the test's child.
type guest struct {
	t       testing.TB
	name    string
	dir     string
	serial  string
	qmp     string
	ramFile []string
	pidfile string
	disk    *diskSpec // the guest's disk, if it has one
	image   string    // its image on the host
	observe string    // the test's own QMP monitor, if it has one (guestSpec.observer)
	// lostIRQ, once set, says how the guest's disk writer was stopped for
	// good by QEMU 10.0's lost completion interrupt (lostCompletionIRQ):
	// from then on its records are still checked, its ACKs no longer awaited.
	lostIRQ string
}

// guestSpec shapes a guest's command line.
type guestSpec struct {
	name    string
	memory  []string // options describing RAM; default: one shared file backend
	extra   []string // more options
	files   []*os.File
	wrapper []string // command prefix (e.g. unshare …)
	netns   string
	kargs   []string // more kernel parameters (hb.ip=…)
	// qmpFD: the QMP monitor listens on a socket the test binds and passes
	// as fd 3, as libvirt does, instead of -qmp unix:PATH.
	qmpFD bool
	// serialFdset: the serial log is opened by the test (O_APPEND) and
	// passed as an -add-fd set, as libvirt passes its logs.
	serialFdset bool
	// disk: a virtio-blk disk in this shape, with the guest's disk writer
	// on it (hb.disk=/dev/vda); checkContinues then also checks every
	// acknowledged record (disk_test.go).
	disk *diskSpec
	// observer: a second QMP monitor (observe.sock in the guest's
	// directory) for the test alone, after the one liveupdate uses (it
	// takes the first): the test can ask a QEMU how it is while liveupdate
	// holds its monitor. A restart carries it over like any socket.
	observer bool
}

func startGuest(t testing.TB, s guestSpec) *guest {
	t.Helper()
	g := &guest{t: t, name: s.name, dir: t.TempDir()}
	g.serial = filepath.Join(g.dir, "serial.log")
	g.qmp = filepath.Join(g.dir, "qmp.sock")
	g.pidfile = filepath.Join(g.dir, "qemu.pid")
	mem := s.memory
	if mem == nil {
		ram := "/dev/shm/lu-test-" + s.name + ".ram"
		mem = []string{"-m", "256", "-machine", "pc,memory-backend=ram0",
			"-object", "memory-backend-file,id=ram0,size=256M,mem-path=" + ram + ",share=on"}
	}
	for i, a := range mem {
		if i > 0 && strings.Contains(a, "mem-path") {
			re := regexp.MustCompile(`mem-path["=:]+([^,"]+)`)
			if m := re.FindStringSubmatch(a); m != nil {
				g.ramFile = append(g.ramFile, m[1])
			}
		}
	}
	t.Cleanup(func() {
		for _, f := range g.ramFile {
			os.Remove(f)
		}
	})
	argv := append([]string{}, s.wrapper...)
	argv = append(argv, qemuBinary, "-name", s.name, "-accel", "tcg", "-nodefaults", "-nographic", "-vga", "none", "-no-reboot")
	argv = append(argv, mem...)
	qmp := []string{"-qmp", "unix:" + g.qmp + ",server=on,wait=off"}
	if s.qmpFD {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: g.qmp, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		f, _ := l.File()
		l.Close()
		defer f.Close()
		s.files = append([]*os.File{f}, s.files...)
		qmp = []string{"-chardev", "socket,id=charmonitor,fd=3,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control"}
	}
	serial := []string{"-chardev", "file,id=ser0,path=" + g.serial + ",append=on"}
	if s.serialFdset {
		f, err := os.OpenFile(g.serial, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		s.files = append(s.files, f)
		n := 3 + len(s.files) - 1 // ExtraFiles are fds 3, 4, …
		serial = []string{"-add-fd", fmt.Sprintf("set=0,fd=%d,opaque=serial0-log", n), "-chardev", "file,id=ser0,path=/dev/fdset/0,append=on"}
	}
	// no_timer_check: sixteen guests booting at once on two emulated
	// CPUs can miss the kernel's IO-APIC timer check, which then panics
	// ("IO-APIC + timer doesn't work!", seen in make bench's P2).
	argv = append(argv,
		"-kernel", guestKernel, "-initrd", guestInitrd,
		"-append", strings.Join(append(append([]string{"console=ttyS0 quiet panic=-1 no_timer_check hb.mem_mib=16 hb.check_ms=3000"}, diskKargs(s.disk)...), s.kargs...), " "))
	argv = append(argv, serial...)
	argv = append(argv, "-serial", "chardev:ser0", "-monitor", "none")
	argv = append(argv, qmp...)
	if s.observer {
		g.observe = filepath.Join(g.dir, "observe.sock")
		argv = append(argv, "-qmp", "unix:"+g.observe+",server=on,wait=off")
	}
	argv = append(argv, "-daemonize", "-pidfile", g.pidfile)
	if s.disk != nil {
		img, err := s.disk.createImage(g.dir)
		if err != nil {
			t.Fatal(err)
		}
		g.disk, g.image = s.disk, img
		argv = append(argv, s.disk.args(img)...)
	}
	argv = append(argv, s.extra...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = g.dir
	cmd.ExtraFiles = s.files
	start := func() error {
		out, err := cmd.CombinedOutput()
		if err != nil && s.disk != nil && s.disk.refusal != "" && strings.Contains(string(out), s.disk.refusal) {
			t.Skipf("QEMU refuses the disk shape %s: %s", s.disk, strings.TrimSpace(string(out)))
		}
		if err != nil {
			return fmt.Errorf("starting QEMU: %v\n%s", err, out)
		}
		return nil
	}
	var err error
	if s.netns != "" {
		err = tapdev.InNetNS(s.netns, start)
	} else {
		err = start()
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.kill)
	return g
}

func (g *guest) pid() int {
	b, err := os.ReadFile(g.pidfile)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

func (g *guest) kill() {
	// The running QEMU may be a restored one: find it by the QMP socket it
	// was started with, through its pidfile (QEMU rewrites it).
	if p := g.pid(); p > 0 {
		exec.Command("kill", "-9", strconv.Itoa(p)).Run()
	}
	out, _ := exec.Command("pgrep", "-f", "--", "-name "+g.name+" ").Output()
	for _, f := range strings.Fields(string(out)) {
		exec.Command("kill", "-9", f).Run()
	}
}

// beat is one heartbeat line, with the disk writer's last ACK then.
type beat struct {
	seq  uint64
	boot string
	mem  string
	ack  uint64
}

var beatRE = regexp.MustCompile(`HB seq=(\d+) boot=(\S+) up=\S+ mem=(\S+)`)

func (g *guest) lastBeat() (beat, bool) {
	f, err := os.Open(g.serial)
	if err != nil {
		return beat{}, false
	}
	defer f.Close()
	var last beat
	var ack uint64
	ok := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := beatRE.FindStringSubmatch(sc.Text()); m != nil {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			last, ok = beat{seq: n, boot: m[2], mem: m[3]}, true
		} else if m := ackRE.FindStringSubmatch(sc.Text()); m != nil {
			ack, _ = strconv.ParseUint(m[1], 10, 64)
		}
	}
	last.ack = ack
	return last, ok
}

// waitBeat waits for a heartbeat with seq > after and returns it.
func (g *guest) waitBeat(after uint64, d time.Duration) beat {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if b, ok := g.lastBeat(); ok && b.seq > after {
			return b
		}
		time.Sleep(100 * time.Millisecond)
	}
	tail, _ := exec.Command("tail", "-5", g.serial).Output()
	g.t.Fatalf("%s: no heartbeat after seq %d within %s; serial tail:\n%s", g.name, after, d, tail)
	return beat{}
}

// checkContinues asserts the guest keeps beating past before, with the same
// boot id and an intact memory checksum; a guest with a disk also goes on
// acknowledging writes past before's, and every record it acknowledged is
// on its image, intact.
func (g *guest) checkContinues(before beat) beat {
	g.t.Helper()
	b := g.waitBeat(before.seq+3, 60*time.Second)
	if b.boot != before.boot {
		g.t.Fatalf("%s: boot id changed %s → %s: the guest rebooted", g.name, before.boot, b.boot)
	}
	if b.mem != "ok" {
		g.t.Fatalf("%s: guest memory checksum is %q after restart", g.name, b.mem)
	}
	if g.disk != nil {
		went := "ACKs went on past"
		if g.checkAcksContinue(before.ack); g.lostIRQ != "" {
			went = "writer stopped by QEMU's lost interrupt (see above) after"
		}
		g.t.Logf("%s: disk %s: %s %d; all %d acknowledged records on the image, intact", g.name, g.disk, went, before.ack, g.checkDisk())
		b, _ = g.lastBeat()
	}
	return b
}

// runLU runs the liveupdate CLI and returns its exit code, stdout, stderr.
func runLU(t testing.TB, args ...string) (int, string, string) {
	t.Helper()
	return runLUWith(t, "liveupdate", nil, args...)
}

// runLUWith runs one of the built liveupdate binaries with more environment.
//
// runLUWith runs bin (liveupdate or liveupdate-fault) with env added. It
// takes a run lock of this test run's own (--lock), so another suite's
// liveupdate on the same machine never makes ours refuse.
func runLUWith(t testing.TB, bin string, env []string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if len(args) > 0 && args[0] != "check-kernel" {
		// A lock of this test run's own: other runs on the machine (another
		// checkout's tests) must not make ours wait or refuse.
		args = append([]string{args[0], "--lock", filepath.Join(binDir, "liveupdate.lock")}, args[1:]...)
	}
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, bin), args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	} else if err != nil {
		t.Fatalf("running liveupdate: %v", err)
	}
	t.Logf("liveupdate %s → exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, stdout.String(), stderr.String())
	return code, stdout.String(), stderr.String()
}

// restartResult is the JSON printed by restart-qemu --json.
type restartResult struct {
	VMs []struct {
		Name       string  `json:"name"`
		Status     string  `json:"status"`
		Error      string  `json:"error"`
		BlackoutMS float64 `json:"blackout_ms"`
		StateBytes int64   `json:"state_bytes"`
		RAMBytes   uint64  `json:"ram_bytes"`
		OldPID     int     `json:"old_pid"`
		NewPID     int     `json:"new_pid"`
		Clock      string  `json:"clock"`
		ClockOffMS float64 `json:"clock_offset_ms"`
		Mode       string  `json:"mode"`
	} `json:"vms"`
}

func parseResult(t testing.TB, out string) restartResult {
	t.Helper()
	var r restartResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("restart-qemu --json output does not parse: %v\n%s", err, out)
	}
	return r
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie is dead for our purpose.
	i := strings.LastIndexByte(string(b), ')')
	return i > 0 && !strings.HasPrefix(strings.TrimSpace(string(b[i+1:])), "Z")
}

// bootAll starts guests in parallel (boots dominate the test time) and waits
// until each has beaten a few times.
func bootAll(t testing.TB, specs ...guestSpec) []*guest {
	t.Helper()
	gs := make([]*guest, len(specs))
	for i, s := range specs {
		gs[i] = startGuest(t, s)
	}
	var wg sync.WaitGroup
	for _, g := range gs {
		wg.Add(1)
		go func() { defer wg.Done(); g.waitBeatNoFatal(3, 120*time.Second+time.Duration(len(gs))*15*time.Second) }()
	}
	wg.Wait()
	for _, g := range gs {
		if _, ok := g.lastBeat(); !ok {
			tail, _ := exec.Command("tail", "-20", g.serial).Output()
			t.Fatalf("%s did not boot; serial:\n%s", g.name, tail)
		}
	}
	return gs
}

func (g *guest) waitBeatNoFatal(after uint64, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if b, ok := g.lastBeat(); ok && b.seq > after {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// qmpExecute runs one QMP command on the guest's QEMU and decodes its
// return value into out (nil to ignore it).
func (g *guest) qmpExecute(cmd string, args, out any) {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, g.qmp)
	if err != nil {
		g.t.Fatalf("%s: %v", g.name, err)
	}
	defer c.Close()
	if err := c.Execute(ctx, cmd, args, out); err != nil {
		g.t.Fatalf("%s: %v", g.name, err)
	}
}

// migrationSetup is what a guest's QEMU answers about the migration set-up
// liveupdate changes: "mode=… x-ignore-shared=… events=…".
func (g *guest) migrationSetup() string {
	g.t.Helper()
	var caps []struct {
		Capability string
		State      bool
	}
	var params struct{ Mode string }
	g.qmpExecute("query-migrate-capabilities", nil, &caps)
	g.qmpExecute("query-migrate-parameters", nil, &params)
	on := map[string]bool{}
	for _, c := range caps {
		on[c.Capability] = c.State
	}
	return fmt.Sprintf("mode=%s x-ignore-shared=%v events=%v", params.Mode, on["x-ignore-shared"], on["events"])
}
