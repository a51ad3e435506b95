package qemutests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	lvstatus "github.com/liveupdate/liveupdate/pkg/libvirt"
)

// libvirtView is what libvirt, running, says of a guest — checked after
// every hand-back: it names the QEMU that runs the guest and manages it.
func libvirtView(t *testing.T, name string, pid int) {
	t.Helper()
	if st := strings.TrimSpace(virsh(t, "domstate", name)); st != "running" {
		t.Errorf("virsh domstate %s: %q, want running", name, st)
	}
	var status struct {
		Return struct{ Running bool }
	}
	if err := json.Unmarshal([]byte(virsh(t, "qemu-monitor-command", name, `{"execute":"query-status"}`)), &status); err != nil || !status.Return.Running {
		t.Errorf("query-status through libvirt: %v %+v", err, status)
	}
	// The monitor libvirt talks to is the new QEMU's: its vCPU threads are
	// threads of the new pid.
	var cpus struct {
		Return []struct {
			ThreadID int `json:"thread-id"`
		}
	}
	json.Unmarshal([]byte(virsh(t, "qemu-monitor-command", name, `{"execute":"query-cpus-fast"}`)), &cpus)
	if len(cpus.Return) == 0 {
		t.Errorf("query-cpus-fast through libvirt gave no vCPU")
	}
	for _, c := range cpus.Return {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", pid, c.ThreadID)); err != nil {
			t.Errorf("libvirt's monitor answers with vCPU thread %d, not a thread of QEMU %d", c.ThreadID, pid)
		}
	}
	if out := virsh(t, "dominfo", name); !regexp.MustCompile(`State:\s+running`).MatchString(out) {
		t.Errorf("virsh dominfo:\n%s", out)
	}
	if out := virsh(t, "domstats", name); !strings.Contains(out, "state.state=1") {
		t.Errorf("virsh domstats:\n%s", out)
	}
	st := readFile(t, filepath.Join(libvirtStatus, name+".xml"))
	s, err := lvstatus.ParseStatus([]byte(st))
	if err != nil || s.PID != pid {
		t.Errorf("libvirt's record after its reconnect: %v, pid %d, want %d", err, s.PID, pid)
	}
}

// TestLibvirtRestart: restart-qemu of a guest libvirt manages (qcow2 disk
// the guest writes to, file serial console through virtlogd, VNC, libvirt's
// tap with a TCP connection open across every restart, the agent channel,
// shared RAM file), beside a guest started by hand, taking turns with
// libvirt's daemon: refused with the commands while it runs (the hand-made
// guest is not); libvirtd cannot start during a run; done while it is
// stopped, on the fast path; the record rewritten so that libvirt, started
// again, manages the guest on its new QEMU (domstate, monitor, dominfo,
// domstats) and cleaned up nothing. Then libvirtd is SIGKILLed, the tool is
// killed after cont and `recover` hands the guest back; at the end `virsh
// destroy` still stops it.
func TestLibvirtRestart(t *testing.T) {
	lv := startLibvirt(t)
	const name = "lu-lv-restart"
	g, _ := lv.startDomain(t, domSpec{name: name, disk: true, net: "10.83.0.2/24"})
	b := g.waitBeat(3, 120*time.Second)
	// The NIC's tap is libvirt's (passed to QEMU by fd); a TCP connection
	// into the guest opened now must carry on across every restart.
	if out, err := exec.Command("ip", "addr", "add", "10.83.0.1/24", "dev", libvirtNetTap).CombinedOutput(); err != nil {
		t.Fatalf("ip addr add: %v %s", err, out)
	}
	exec.Command("ip", "link", "set", libvirtNetTap, "up").Run()
	tapIndex := func() string {
		out, _ := exec.Command("ip", "-o", "link", "show", libvirtNetTap).Output()
		return strings.SplitN(string(out), ":", 2)[0]
	}
	idx := tapIndex()
	var echo net.Conn
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		var err error
		if echo, err = net.DialTimeout("tcp", "10.83.0.2:7007", 2*time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's echo server never answered over libvirt's tap: %v", err)
		}
	}
	defer echo.Close()
	er := bufio.NewReader(echo)
	echoes := func(when string) {
		t.Helper()
		echo.SetDeadline(time.Now().Add(30 * time.Second))
		fmt.Fprintf(echo, "%s\n", when)
		if l, err := er.ReadString('\n'); err != nil || strings.TrimSpace(l) != when {
			t.Errorf("TCP echo %s: %q %v", when, l, err)
		}
		if i := tapIndex(); i != idx {
			t.Errorf("%s: the tap's ifindex %s, was %s: it was made anew", when, i, idx)
		}
	}
	echoes("before")
	for g.lastAck() < 3 {
		time.Sleep(200 * time.Millisecond)
	}
	status := filepath.Join(libvirtStatus, name+".xml")
	rec, err := lvstatus.ParseStatus([]byte(readFile(t, status)))
	if err != nil {
		t.Fatal(err)
	}
	memDir := filepath.Join(lv.memDir, "libvirt/qemu")
	ramFiles := func() string {
		out, _ := exec.Command("find", memDir, "-type", "f").Output()
		return strings.TrimSpace(string(out))
	}
	ram := ramFiles()
	if ram == "" {
		t.Fatalf("no RAM file under %s", memDir)
	}
	cgroup := func(pid int) string {
		c, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		return string(c)
	}
	oldCgroup := cgroup(rec.PID)
	// libvirt keeps each vCPU thread in a cgroup of its own (…/vcpu0).
	threadCgroup := func(pid, tid int) string {
		c, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/cgroup", pid, tid))
		return string(c)
	}
	oldVcpuCgroup := threadCgroup(rec.PID, rec.Vcpus[0])
	if !strings.Contains(oldVcpuCgroup, "vcpu0") {
		t.Logf("libvirt put no vCPU cgroup here: %q", oldVcpuCgroup)
	}
	m := regexp.MustCompile(`<graphics type='vnc' port='(\d+)'`).FindStringSubmatch(readFile(t, status))
	if m == nil {
		t.Fatalf("libvirt's record has no VNC port")
	}
	vncPort := m[1]
	vncGreets(t, vncPort)

	// A guest started by hand on the same host, beside libvirt's: it is
	// restarted while libvirt's daemon runs (libvirt has no record of it),
	// and together with libvirt's guest once the daemon is stopped.
	hand := bootAll(t, guestSpec{name: "lu-hand"})[0]
	hb, _ := hand.lastBeat()
	if code, _, errOut := runLU(t, "restart-qemu", "--state-dir", t.TempDir(), "lu-hand"); code != 0 {
		t.Fatalf("restart-qemu of a guest started by hand, libvirtd running: exit %d\n%s", code, errOut)
	}
	hb = hand.checkContinues(hb)

	// Its daemon runs: refused, with the commands that take turns.
	state := t.TempDir()
	code, out, errOut := runLU(t, "restart-qemu", "--state-dir", state, name)
	if code != exitRefusedCode || !strings.Contains(out+errOut, "its daemon runs: libvirtd (pid") || !strings.Contains(out+errOut, "systemctl stop libvirtd.service") {
		t.Errorf("restart-qemu with libvirtd running: exit %d, not refused with the way to take turns:\n%s%s", code, out, errOut)
	}
	if g.pid() != rec.PID {
		t.Fatalf("a refused restart changed the QEMU")
	}

	// While liveupdate holds its guard, libvirt's daemon cannot start: it
	// takes the same lock on its pid file.
	lv.stopLibvirtd()
	guard, err := lvstatus.Hold("")
	if err != nil || len(guard.Busy) != 0 {
		t.Fatalf("guard: %v %+v", err, guard)
	}
	// In the foreground: it must exit by itself, at once.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	outD, err := exec.CommandContext(ctx, "libvirtd", "--config", filepath.Join(lv.dir, "libvirtd.conf")).CombinedOutput()
	timedOut := ctx.Err() != nil
	cancel()
	guard.Release()
	if err == nil || timedOut {
		t.Errorf("libvirtd started while liveupdate held its pid file (ran until killed: %v): %v\n%s", timedOut, err, outD)
	}
	t.Logf("libvirtd started during a run: %v; its log: %s", err, tail(lv.log("libvirtd"), 3))

	// Its daemon stopped: the restart, and the record rewritten.
	code, out, errOut = runLU(t, "restart-qemu", "--json", "--state-dir", state, name, "lu-hand")
	if code != 0 {
		t.Fatalf("restart-qemu of the libvirt guest: exit %d\n%s\n%s", code, out, errOut)
	}
	t.Logf("restart-qemu: %s", blackoutOf(t, out))
	if r := parseResult(t, out); len(r.VMs) == 0 || r.VMs[0].Clock == "no guest agent" {
		t.Errorf("the guest agent on libvirt's fd-passed channel was not found: %+v", r.VMs)
	} else {
		t.Logf("guest clock after the restart: %s", r.VMs[0].Clock)
	}
	echoes("after the restart")
	// The fast path, VNC and all: the new QEMU started beside the old one
	// with -vnc none and took the port once the old one was gone.
	if strings.Contains(errOut, "sequential way") {
		t.Errorf("the libvirt guest went the sequential way:\n%s", errOut)
	}
	if !strings.Contains(errOut, "listens on the old one's VNC port") {
		t.Errorf("no VNC take-over logged:\n%s", errOut)
	}
	newPID := g.pid()
	if newPID == rec.PID || !alive(newPID) || alive(rec.PID) {
		t.Fatalf("after the restart: pid file says %d (old %d, alive %v)", newPID, rec.PID, alive(rec.PID))
	}
	after, err := lvstatus.ParseStatus([]byte(readFile(t, status)))
	if err != nil || after.PID != newPID {
		t.Fatalf("libvirt's record after the restart: %v, names pid %d, want %d", err, after.PID, newPID)
	}
	for id, tid := range after.Vcpus {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", newPID, tid)); err != nil {
			t.Errorf("the record's vCPU %d thread %d is not a thread of the new QEMU", id, tid)
		}
	}
	if after.MountNS {
		t.Errorf("the record still says the QEMU has a private mount namespace")
	}
	if c := cgroup(newPID); c != oldCgroup {
		t.Errorf("the new QEMU's cgroup %q, the old one's %q", c, oldCgroup)
	}
	if c := threadCgroup(newPID, after.Vcpus[0]); c != oldVcpuCgroup {
		t.Errorf("the new QEMU's vCPU thread is in %q, the old one's was in %q", c, oldVcpuCgroup)
	}
	b = g.checkContinues(b)

	vncGreets(t, vncPort)
	lv.startLibvirtd()
	libvirtView(t, name, newPID)
	if r := ramFiles(); r != ram {
		t.Errorf("after libvirt's reconnect the RAM files are %q, were %q", r, ram)
	}
	b = g.checkContinues(b)

	// libvirt's daemon killed (SIGKILL: its pid file stays, unlocked),
	// then the tool killed after the new QEMU runs the guest, before the
	// record is rewritten: recover rewrites it.
	if p := lv.pid("libvirtd"); p > 0 {
		syscall.Kill(p, syscall.SIGKILL)
		for alive(p) {
			time.Sleep(50 * time.Millisecond)
		}
	}
	state = t.TempDir()
	prev := newPID
	code, _, _ = runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=cont=kill"}, "restart-qemu", "--state-dir", state, name)
	if code != 128+int(syscall.SIGKILL) {
		t.Fatalf("restart-qemu with cont=kill: exit %d", code)
	}
	if s, _ := lvstatus.ParseStatus([]byte(readFile(t, status))); s == nil || s.PID != prev {
		t.Fatalf("the killed run already rewrote the record: %+v", s)
	}
	if code, out, errOut := runLU(t, "recover", "--state-dir", state); code != 0 {
		t.Fatalf("recover: exit %d\n%s\n%s", code, out, errOut)
	}
	newPID = g.pid()
	if s, _ := lvstatus.ParseStatus([]byte(readFile(t, status))); s == nil || s.PID != newPID || newPID == prev {
		t.Fatalf("after recover libvirt's record is %+v, QEMU pid %d (was %d)", s, newPID, prev)
	}
	b = g.checkContinues(b)
	echoes("after recover")
	// This run's old QEMU was the twin of the first (-vnc none, given its
	// port later): its new QEMU listens on that port too.
	vncGreets(t, vncPort)
	lv.startLibvirtd()
	libvirtView(t, name, newPID)
	if r := ramFiles(); r != ram {
		t.Errorf("after libvirt's reconnect the RAM files are %q, were %q", r, ram)
	}
	g.checkContinues(b)

	// libvirt still shuts it down: the ACPI button through the monitor of
	// the QEMU liveupdate started; the guest powers off after its last
	// acknowledged record, which is on the image.
	virsh(t, "shutdown", name)
	gone := func(pid int, why string) {
		t.Helper()
		for deadline := time.Now().Add(90 * time.Second); alive(pid); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s left QEMU %d running", why, pid)
			}
		}
	}
	gone(newPID, "virsh shutdown")
	if !strings.Contains(readFile(t, g.serial), "HEARTBEAT powered down after ACK") {
		t.Errorf("the guest did not power down by its ACPI button")
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		st := strings.TrimSpace(virsh(t, "domstate", name))
		if st == "shut off" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after virsh shutdown libvirt says %q", st)
		}
	}
	if n := g.checkDisk(); n == 0 {
		t.Errorf("no acknowledged record to check")
	}

	// …and starts it again as if nothing happened, and destroys it after
	// one more restart.
	g.disk = nil // a new boot writes its records from 1 again
	virsh(t, "start", name)
	b = g.waitBeat(3, 120*time.Second)
	if st, err := lvstatus.ParseStatus([]byte(readFile(t, status))); err != nil || !alive(st.PID) {
		t.Fatalf("libvirt's record after virsh start: %v", err)
	}
	lv.stopLibvirtd()
	if code, _, errOut := runLU(t, "restart-qemu", "--state-dir", t.TempDir(), name); code != 0 {
		t.Fatalf("restart-qemu after virsh start: exit %d\n%s", code, errOut)
	}
	newPID = g.pid()
	g.checkContinues(b)
	lv.startLibvirtd()
	libvirtView(t, name, newPID)
	virsh(t, "destroy", name)
	gone(newPID, "virsh destroy")
}

// vncGreets checks a VNC server answers on 127.0.0.1:port with its RFB
// greeting, as a reconnecting client would see it.
func vncGreets(t *testing.T, port string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
	if err != nil {
		t.Errorf("VNC port %s: %v", port, err)
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 12)
	if _, err := io.ReadFull(c, b); err != nil || !strings.HasPrefix(string(b), "RFB ") {
		t.Errorf("VNC port %s greets with %q: %v", port, b, err)
	}
}

// blackoutOf is the blackout in a restart's JSON report.
func blackoutOf(t *testing.T, out string) string {
	var r struct {
		VMs []struct {
			Name       string  `json:"name"`
			BlackoutMS float64 `json:"blackout_ms"`
		} `json:"vms"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || len(r.VMs) == 0 {
		return "no report: " + strconv.Quote(out)
	}
	var parts []string
	for _, v := range r.VMs {
		parts = append(parts, fmt.Sprintf("%s blackout %.1f ms", v.Name, v.BlackoutMS))
	}
	return strings.Join(parts, ", ")
}
