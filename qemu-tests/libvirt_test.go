package qemutests

// The real-libvirt harness: the test runs libvirt's own daemons (virtlogd,
// libvirtd) itself — there is no systemd — on the system instance
// (qemu:///system, its sockets under /run/libvirt), and starts heartbeat
// guests as libvirt domains.
//
// The system instance has fixed paths: libvirtd and virtlogd take their own
// config file (--config) and pid file (--pid-file), both written into a temp
// dir, but the QEMU driver reads qemu.conf only from /etc/libvirt/qemu.conf
// (no flag, no environment variable names another one for a privileged
// daemon). startLibvirt therefore writes /etc/libvirt/qemu.conf and puts the
// machine's own back in t.Cleanup. Only one libvirt test may run at a time,
// and none while another libvirtd runs (startLibvirt refuses).

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	libvirtQemuConf = "/etc/libvirt/qemu.conf"
	libvirtURI      = "qemu:///system"
	libvirtStatus   = "/run/libvirt/qemu" // NAME.xml (status XML), NAME.pid
)

// libvirt is one run of libvirt's daemons, owned by a test.
type libvirt struct {
	t      testing.TB
	dir    string // configs, pid files, daemon logs
	memDir string // qemu.conf memory_backing_dir
}

// startLibvirt starts virtlogd and libvirtd as daemons for this test and
// stops them (and every domain) in t.Cleanup.
func startLibvirt(t testing.TB) *libvirt {
	t.Helper()
	for _, b := range []string{"libvirtd", "virtlogd", "virsh"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not found: run scripts/setup.sh", b)
		}
	}
	for _, d := range []string{"libvirtd", "virtlogd"} {
		// A daemon stopped earlier may linger as a zombie until this
		// machine's PID 1 reaps it: only living ones count.
		out, _ := exec.Command("pgrep", "-x", d).Output()
		for _, f := range strings.Fields(string(out)) {
			if p, _ := strconv.Atoi(f); alive(p) {
				t.Fatalf("a %s already runs (pid %d): the libvirt tests start their own", d, p)
			}
		}
	}
	lv := &libvirt{t: t, dir: t.TempDir(), memDir: "/dev/shm/lu-libvirt-test"}
	if err := os.MkdirAll(lv.memDir, 0o755); err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(libvirtQemuConf)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	had := err == nil
	t.Cleanup(func() {
		lv.stopDomains()
		lv.stop("libvirtd")
		lv.stop("virtlogd")
		if had {
			os.WriteFile(libvirtQemuConf, orig, 0o600)
		} else {
			os.Remove(libvirtQemuConf)
		}
		os.RemoveAll(lv.memDir)
	})
	if err := os.MkdirAll(filepath.Dir(libvirtQemuConf), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(libvirtQemuConf, []byte(lv.qemuConf()), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"virtlogd", "libvirtd"} {
		conf := fmt.Sprintf("log_outputs=\"3:file:%s\"\n", filepath.Join(lv.dir, d+".log"))
		if err := os.WriteFile(filepath.Join(lv.dir, d+".conf"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	lv.start("virtlogd")
	lv.startLibvirtd()
	return lv
}

// qemuConf is the qemu.conf the tests run libvirt with: QEMU as root with no
// security driver (no SELinux/AppArmor labels, files are the test's), and
// guest RAM files (<memoryBacking><source type='file'/>) under memDir.
func (lv *libvirt) qemuConf() string {
	return fmt.Sprintf(`# written by liveupdate's qemu-tests/libvirt_test.go; the machine's own is put back after the test
user = "root"
group = "root"
security_driver = "none"
memory_backing_dir = %q
`, lv.memDir)
}

// pidFile is the daemon's pid file. libvirtd's is its default one, the
// file liveupdate's guard (libvirt.Hold) locks to keep it from starting
// during a run.
func (lv *libvirt) pidFile(d string) string {
	if d == "libvirtd" {
		return "/run/libvirtd.pid"
	}
	return filepath.Join(lv.dir, d+".pid")
}

// pid is the daemon's pid from its pid file, 0 if it does not run.
func (lv *libvirt) pid(d string) int {
	b, err := os.ReadFile(lv.pidFile(d))
	if err != nil {
		return 0
	}
	p, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if !alive(p) {
		return 0
	}
	return p
}

// start runs `D --daemon --config DIR/D.conf --pid-file DIR/D.pid`.
func (lv *libvirt) start(d string) {
	lv.t.Helper()
	cmd := exec.Command(d, "--daemon", "--config", filepath.Join(lv.dir, d+".conf"), "--pid-file", lv.pidFile(d))
	if out, err := cmd.CombinedOutput(); err != nil {
		lv.t.Fatalf("starting %s: %v\n%s", d, err, out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for lv.pid(d) == 0 {
		if time.Now().After(deadline) {
			lv.t.Fatalf("%s did not write its pid file; log:\n%s", d, lv.log(d))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the daemon to be gone (SIGKILL after 10 s).
func (lv *libvirt) stop(d string) {
	p := lv.pid(d)
	if p == 0 {
		return
	}
	syscall.Kill(p, syscall.SIGTERM)
	deadline := time.Now().Add(10 * time.Second)
	for alive(p) {
		if time.Now().After(deadline) {
			syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
	os.Remove(lv.pidFile(d))
}

func (lv *libvirt) log(d string) string {
	b, _ := os.ReadFile(filepath.Join(lv.dir, d+".log"))
	return string(b)
}

// startLibvirtd starts libvirtd and waits until it answers. Domains already
// running are reconnected by libvirtd itself (from the status XML).
func (lv *libvirt) startLibvirtd() {
	lv.t.Helper()
	lv.start("libvirtd")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := virshErr("version"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			lv.t.Fatalf("libvirtd does not answer; log:\n%s", lv.log("libvirtd"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stopLibvirtd stops libvirtd with SIGTERM (its guests' QEMUs keep running).
func (lv *libvirt) stopLibvirtd() { lv.stop("libvirtd") }

// stopDomains destroys and undefines every domain (libvirtd must run).
func (lv *libvirt) stopDomains() {
	if lv.pid("libvirtd") == 0 {
		return // each domain's own clean-up has started it again
	}
	out, _ := virshErr("list", "--all", "--name")
	for _, n := range strings.Fields(out) {
		virshErr("destroy", n)
		virshErr("undefine", n)
	}
}

// virsh runs virsh on the system instance and fails the test on an error.
func virsh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := virshErr(args...)
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func virshErr(args ...string) (string, error) {
	out, err := exec.Command("virsh", append([]string{"-c", libvirtURI}, args...)...).CombinedOutput()
	return string(out), err
}

// domSpec shapes a heartbeat guest as a libvirt domain.
type domSpec struct {
	name string
	// noSharedRAM leaves out <memoryBacking>: RAM is then anonymous and the
	// guest is not eligible for a CPR restart.
	noSharedRAM bool
	// disk turns on the guest's disk writer on its qcow2 disk (hb.disk):
	// checkContinues then checks every acknowledged record on the image.
	disk bool
	// net gives the guest a virtio NIC on a tap libvirt makes
	// (<interface type='ethernet'>, libvirtNetTap) with hb.ip=net, and the
	// guest agent's channel.
	net string
}

// libvirtNetTap is the tap of a domain with domSpec.net (one at a time).
const libvirtNetTap = "lulvr0"

// domainXML is the heartbeat guest under TCG: kernel, initramfs and command
// line as startGuest's, 256 MiB in a shared file (memory_backing_dir), a qcow2
// disk, the serial console into a file (dir/serial.log: the heartbeats), VNC
// on 127.0.0.1 with a port libvirt chooses, no network.
func domainXML(s domSpec, dir string) string {
	mem := "  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>\n"
	if s.noSharedRAM {
		mem = ""
	}
	kargs, netXML := "", ""
	if s.disk {
		kargs = " hb.disk=/dev/vda hb.disk_ms=200"
	}
	if s.net != "" {
		kargs += " hb.ip=" + s.net
		netXML = `    <interface type='ethernet'>
      <target dev='` + libvirtNetTap + `' managed='yes'/>
      <mac address='52:54:00:cc:00:01'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
`
	}
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
%s  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 hb.mem_mib=16 hb.check_ms=3000%s</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>%s</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='%s'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='%s'/><target port='0'/></serial>
%s    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
`, s.name, mem, guestKernel, guestInitrd, kargs, qemuBinary, filepath.Join(dir, "disk.qcow2"), filepath.Join(dir, "serial.log"), netXML)
}

// startDomain defines and starts a heartbeat domain; the returned guest reads
// its heartbeats from the serial file (lastBeat, waitBeat, checkContinues),
// its pid from libvirt's NAME.pid and its monitor path from the status XML.
// The domain is destroyed and undefined in t.Cleanup.
func (lv *libvirt) startDomain(t testing.TB, s domSpec) (*guest, string) {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "disk.qcow2"), "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
	xml := domainXML(s, dir)
	xmlFile := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlFile, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}
	virsh(t, "define", xmlFile)
	g := &guest{t: t, name: s.name, dir: dir, serial: filepath.Join(dir, "serial.log"),
		pidfile: filepath.Join(libvirtStatus, s.name+".pid")}
	if s.disk {
		// What libvirt makes of <driver name='qemu' type='qcow2'/>.
		g.disk = &diskSpec{format: "qcow2", frontend: "blockdev", cache: "writeback", aio: "threads"}
		g.image = filepath.Join(dir, "disk.qcow2")
	}
	t.Cleanup(func() {
		if lv.pid("libvirtd") == 0 {
			lv.startLibvirtd()
		}
		pid := g.pid()
		virshErr("destroy", s.name)
		virshErr("undefine", s.name)
		if alive(pid) { // libvirt could not: leave nothing running
			syscall.Kill(pid, syscall.SIGKILL)
		}
		// Nor a second QEMU of the guest a failed test left.
		exec.Command("pkill", "-KILL", "-f", "--", "-name guest="+s.name+",").Run()
	})
	virsh(t, "start", s.name)
	if m := regexp.MustCompile(`<monitor path='([^']+)'`).FindStringSubmatch(readFile(t, filepath.Join(libvirtStatus, s.name+".xml"))); m != nil {
		g.qmp = m[1]
	}
	return g, xml
}

func readFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// qmpTranscript connects to a QMP socket and sends each command, returning
// everything QEMU said (greeting, events, replies), one JSON line each.
func qmpTranscript(path string, d time.Duration, cmds ...string) (string, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	r := bufio.NewReader(c)
	var b strings.Builder
	line, err := r.ReadString('\n')
	b.WriteString("<- " + line)
	if err != nil {
		return b.String(), err
	}
	for _, cmd := range cmds {
		fmt.Fprintf(&b, "-> %s\n", cmd)
		if _, err := c.Write([]byte(cmd + "\n")); err != nil {
			return b.String(), err
		}
		for {
			line, err := r.ReadString('\n')
			b.WriteString("<- " + line)
			if err != nil {
				return b.String(), err
			}
			if strings.HasPrefix(line, `{"return"`) || strings.HasPrefix(line, `{"error"`) {
				break
			}
		}
	}
	return b.String(), nil
}

// freePort is a TCP port on 127.0.0.1 nobody listens on just now.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func fdListing(pid int) string {
	out, _ := exec.Command("ls", "-l", fmt.Sprintf("/proc/%d/fd", pid)).CombinedOutput()
	return string(out)
}

// fdInfos is /proc/PID/fdinfo/N of every fd, with its target.
func fdInfos(pid int) string {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	var fds []int
	for _, e := range ents {
		n, _ := strconv.Atoi(e.Name())
		fds = append(fds, n)
	}
	sort.Ints(fds)
	var b strings.Builder
	for _, n := range fds {
		tgt, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, n))
		info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, n))
		fmt.Fprintf(&b, "== fd %d -> %s\n%s", n, tgt, info)
	}
	return b.String()
}

func runOut(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("%s(error: %v)\n", out, err)
	}
	return string(out)
}

// TestLibvirtFacts boots a heartbeat guest under libvirt, checks that the
// harness works (the guest runs, and beats on across a libvirtd stop and
// start), and records what a libvirt-started QEMU looks like from the host:
// its argv, environment, fds, status XML, cgroups, monitor, and what
// liveupdate says of it. With LIVEUPDATE_WRITE_FIXTURES=1 the record is
// written to testdata/libvirt/ (the committed fixtures are such a record);
// otherwise it is only logged in -v.
func TestLibvirtFacts(t *testing.T) {
	lv := startLibvirt(t)
	const name = "lu-lv-facts"
	g, xml := lv.startDomain(t, domSpec{name: name})
	facts := map[string]string{"domain.xml": xml}
	first := g.waitBeat(3, 120*time.Second)
	pid := g.pid()
	if !alive(pid) {
		t.Fatalf("no QEMU pid in %s", g.pidfile)
	}
	proc := func(f string) string {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
		return string(b)
	}

	// (a) argv, environment, cwd.
	nul := func(s string) string { return strings.ReplaceAll(strings.TrimRight(s, "\x00"), "\x00", "\n") + "\n" }
	facts["qemu-argv.txt"] = nul(proc("cmdline"))
	facts["qemu-environ.txt"] = nul(proc("environ"))
	cwd, _ := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	root, _ := os.Readlink(fmt.Sprintf("/proc/%d/root", pid))
	var ns strings.Builder
	for _, n := range []string{"mnt", "net", "pid", "uts", "ipc"} {
		q, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, n))
		s, _ := os.Readlink("/proc/self/ns/" + n)
		fmt.Fprintf(&ns, "ns/%s qemu=%s test=%s\n", n, q, s)
	}
	facts["qemu-cwd.txt"] = fmt.Sprintf("cwd=%s\nroot=%s\n%s", cwd, root, ns.String())
	facts["qemu-status.txt"] = proc("status")

	// (b) status XML and pid file.
	facts["status.xml"] = readFile(t, filepath.Join(libvirtStatus, name+".xml"))
	facts["status.pid"] = readFile(t, filepath.Join(libvirtStatus, name+".pid"))
	if !strings.Contains(facts["status.xml"], fmt.Sprintf("pid='%d'", pid)) {
		t.Errorf("status XML does not name pid %d", pid)
	}

	// (c) fds and fdinfo; the serial file goes through virtlogd.
	facts["qemu-fds.txt"] = fdListing(pid)
	facts["qemu-fdinfo.txt"] = fdInfos(pid)
	if vl := lv.pid("virtlogd"); vl > 0 {
		facts["virtlogd-fds.txt"] = fdListing(vl)
	}

	// (f) vCPU threads.
	facts["query-cpus-fast.json"] = virsh(t, "qemu-monitor-command", name, "--pretty", `{"execute":"query-cpus-fast"}`)
	facts["query-fdsets.json"] = virsh(t, "qemu-monitor-command", name, "--pretty", `{"execute":"query-fdsets"}`)
	var cpus struct {
		Return []struct {
			ThreadID int `json:"thread-id"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(facts["query-cpus-fast.json"]), &cpus); err != nil || len(cpus.Return) == 0 {
		t.Errorf("query-cpus-fast: %v\n%s", err, facts["query-cpus-fast.json"])
	}
	for _, c := range cpus.Return {
		if !strings.Contains(facts["status.xml"], fmt.Sprintf("pid='%d'", c.ThreadID)) {
			t.Errorf("vCPU thread %d is not in the status XML", c.ThreadID)
		}
	}

	// (g) cgroups of QEMU and each of its threads.
	var cg strings.Builder
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, e := range tasks {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/comm", pid, e.Name()))
		c, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/cgroup", pid, e.Name()))
		fmt.Fprintf(&cg, "== task %s (%s)\n%s", e.Name(), strings.TrimSpace(string(comm)), c)
	}
	facts["qemu-cgroups.txt"] = fmt.Sprintf("== process %d\n%s%s", pid, proc("cgroup"), cg.String())
	facts["virsh-domdisplay.txt"] = virsh(t, "domdisplay", name)

	// (d) plan with libvirtd running; (e) the monitor while libvirt holds it.
	lu := func(file string, args ...string) (int, string) {
		code, out, errOut := runLU(t, args...)
		facts[file] = fmt.Sprintf("$ liveupdate %s\nexit %d\n--- stdout\n%s--- stderr\n%s", strings.Join(args, " "), code, out, errOut)
		return code, out + errOut
	}
	lu("plan-libvirtd-running.txt", "plan", "--json", name)
	var mon strings.Builder
	fmt.Fprintf(&mon, "monitor path (status XML): %s\n/proc/net/unix:\n", g.qmp)
	for _, l := range strings.Split(readFile(t, "/proc/net/unix"), "\n") {
		if g.qmp != "" && strings.HasSuffix(l, g.qmp) {
			mon.WriteString(l + "\n")
		}
	}
	tr, err := qmpTranscript(g.qmp, 3*time.Second, `{"execute":"qmp_capabilities"}`)
	fmt.Fprintf(&mon, "\n== with libvirtd running: connect + qmp_capabilities\n%serr=%v\n", tr, err)

	// libvirtd stopped: the guest's QEMU lives on.
	lv.stopLibvirtd()
	if !alive(pid) {
		t.Fatalf("QEMU %d died with libvirtd", pid)
	}
	b := g.checkContinues(first)
	lu("plan-libvirtd-stopped.txt", "plan", "--json", name)
	port := freePort(t)
	tr, err = qmpTranscript(g.qmp, 20*time.Second, `{"execute":"qmp_capabilities"}`, `{"execute":"query-status"}`,
		`{"execute":"query-fdsets"}`, `{"execute":"query-vnc"}`,
		fmt.Sprintf(`{"execute":"display-update","arguments":{"type":"vnc","addresses":[{"type":"inet","host":"127.0.0.1","port":"%d"}]}}`, port),
		`{"execute":"query-vnc"}`)
	fmt.Fprintf(&mon, "\n== with libvirtd stopped (SIGTERM)\n%serr=%v\n", tr, err)
	if err != nil || !strings.Contains(tr, `"running": true`) {
		t.Errorf("QMP on the monitor socket with libvirtd stopped: %v\n%s", err, tr)
	}
	listen := runOut("ss", "-ltnp")
	for _, l := range strings.Split(listen, "\n") {
		if strings.Contains(l, fmt.Sprintf("pid=%d,", pid)) {
			fmt.Fprintf(&mon, "listening after display-update: %s\n", l)
		}
	}
	// (A restart of a libvirt guest, taking turns with its daemon, is
	// TestLibvirtRestart.)

	// libvirtd started again reconnects to the running guest.
	lv.startLibvirtd()
	st := virsh(t, "domstate", name, "--reason")
	fmt.Fprintf(&mon, "\n== libvirtd started again\n$ virsh domstate %s --reason\n%s", name, st)
	if !strings.HasPrefix(strings.TrimSpace(st), "running") {
		t.Errorf("after libvirtd's restart the domain is %q", st)
	}
	fmt.Fprintf(&mon, "$ virsh qemu-monitor-command %s '{\"execute\":\"query-status\"}'\n%s", name,
		virsh(t, "qemu-monitor-command", name, `{"execute":"query-status"}`))
	fmt.Fprintf(&mon, "$ virsh domdisplay %s\n%s", name, virsh(t, "domdisplay", name))
	facts["monitor.txt"] = mon.String()
	facts["status-after-reconnect.xml"] = readFile(t, filepath.Join(libvirtStatus, name+".xml"))
	g.checkContinues(b)
	if g.pid() != pid {
		t.Errorf("QEMU pid changed %d → %d", pid, g.pid())
	}

	facts["display-update-vnc-none.txt"] = displayUpdateOnVNCNone(t)
	facts["ineligible-argv.txt"] = virsh(t, "domxml-to-native", "qemu-argv", "--xml", writeTemp(t, domainXML(domSpec{name: "lu-lv-noshare", noSharedRAM: true}, t.TempDir())))
	facts["libvirt.txt"] = fmt.Sprintf("$ libvirtd --version\n%s$ %s --version\n%s== /etc/libvirt/qemu.conf as the test wrote it\n%s",
		runOut("libvirtd", "--version"), qemuBinary, runOut(qemuBinary, "--version"), lv.qemuConf())

	writeFixtures(t, "libvirt", facts)
}

func writeTemp(t testing.TB, s string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// displayUpdateOnVNCNone: can a QEMU started with -vnc none (or with no -vnc)
// take a VNC port later through QMP display-update?
func displayUpdateOnVNCNone(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, vnc := range [][]string{{"-vnc", "none"}, nil} {
		dir := t.TempDir()
		sock, pidf := filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "pid")
		args := append([]string{"-name", "lu-vnc-none", "-accel", "tcg", "-nodefaults", "-m", "64", "-S", "-display", "none"}, vnc...)
		args = append(args, "-qmp", "unix:"+sock+",server=on,wait=off", "-daemonize", "-pidfile", pidf)
		if out, err := exec.Command(qemuBinary, args...).CombinedOutput(); err != nil {
			t.Fatalf("QEMU %v: %v\n%s", args, err, out)
		}
		p, _ := strconv.Atoi(strings.TrimSpace(readFile(t, pidf)))
		port := freePort(t)
		tr, err := qmpTranscript(sock, 20*time.Second, `{"execute":"qmp_capabilities"}`, `{"execute":"query-vnc"}`,
			fmt.Sprintf(`{"execute":"display-update","arguments":{"type":"vnc","addresses":[{"type":"inet","host":"127.0.0.1","port":"%d"}]}}`, port),
			`{"execute":"query-vnc"}`)
		fmt.Fprintf(&b, "== qemu %s\n%serr=%v\n", strings.Join(args, " "), tr, err)
		syscall.Kill(p, syscall.SIGKILL)
	}
	return b.String()
}

// writeFixtures logs the captured facts and, with
// LIVEUPDATE_WRITE_FIXTURES=1, writes them into testdata/DIR/.
func writeFixtures(t testing.TB, dir string, facts map[string]string) {
	t.Helper()
	names := make([]string, 0, len(facts))
	for n := range facts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		t.Logf("=== %s\n%s", n, facts[n])
	}
	if os.Getenv("LIVEUPDATE_WRITE_FIXTURES") != "1" {
		return
	}
	out := filepath.Join(repoRoot, "qemu-tests/testdata", dir)
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(out, n), []byte(facts[n]), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLibvirtIneligible: a domain without <memoryBacking> has its RAM in a
// memory-backend-ram; plan refuses it, naming the backend.
func TestLibvirtIneligible(t *testing.T) {
	lv := startLibvirt(t)
	const name = "lu-lv-noshare"
	g, _ := lv.startDomain(t, domSpec{name: name, noSharedRAM: true})
	g.waitBeat(3, 120*time.Second)
	lv.stopLibvirtd()
	code, out, _ := runLU(t, "plan", "--json", name)
	if code != 3 || !strings.Contains(out, "pc.ram") {
		t.Errorf("plan on a domain without shared RAM: exit %d, want 3 naming pc.ram:\n%s", code, out)
	}
	lv.startLibvirtd()
}
