package qemutests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The Debian host's other guests and bad paths, used by TestDebianHostUpdate:
// a two-node guest started directly (not by libvirt) with each memory
// backend bound to its own host node's PMEM, the gate stopping the wave on
// unsafe guests, and the updater crashing before its kexec.

// numaGuest is a QEMU started on the host by systemd-run, as an
// orchestrator other than libvirt would, with two guest NUMA nodes: node
// 0's RAM on /mnt/pmem (host node 0's PMEM) bound to host node 0, node 1's
// on /mnt/pmem1 (host node 1's) bound to host node 1. It runs SeaBIOS only
// (no disk): what is checked is that its RAM and where it lives survive.
type numaGuest struct {
	h    *debianHost
	sums string // sha256 of a random MiB written into the middle of each backend
}

// numaBackends: guest node, host node, file. The 33rd MiB of each: SeaBIOS
// lives at the bottom and the top of the guest's RAM.
var numaBackends = []struct {
	id   string
	node int
	file string
}{{"ram0", 0, "/mnt/pmem/numa/ram0"}, {"ram1", 1, "/mnt/pmem1/numa/ram1"}}

const numaSums = "for f in /mnt/pmem/numa/ram0 /mnt/pmem1/numa/ram1; do dd if=$f bs=1M skip=32 count=1 status=none | sha256sum; done"

func startNUMAGuest(t *testing.T, h *debianHost) *numaGuest {
	t.Helper()
	argv := "/usr/bin/qemu-system-x86_64 -name numa -accel tcg -smp 2 -m 128M -nodefaults -display none -qmp unix:/run/numa.qmp,server=on,wait=off"
	for i, b := range numaBackends {
		argv += fmt.Sprintf(" -object memory-backend-file,id=%s,size=64M,mem-path=%s,share=on,host-nodes=%d,policy=bind -numa node,nodeid=%d,cpus=%d,memdev=%s",
			b.id, b.file, b.node, i, i, b.id)
	}
	h.mustSSH("mkdir -p /mnt/pmem/numa /mnt/pmem1/numa && systemd-run --unit lu-numa-guest --description 'two-node guest, RAM bound per host node' " + argv)
	deadline := time.Now().Add(time.Minute)
	for {
		if _, code := h.ssh(time.Minute, "test -S /run/numa.qmp && test -s /mnt/pmem1/numa/ram1"); code == 0 {
			break
		}
		if time.Now().After(deadline) {
			out, _ := h.ssh(time.Minute, "systemctl status --no-pager lu-numa-guest.service | cat")
			t.Fatalf("the two-node guest did not start:\n%s", out)
		}
		time.Sleep(time.Second)
	}
	g := &numaGuest{h: h}
	for _, b := range numaBackends {
		h.mustSSH("dd if=/dev/urandom of=" + b.file + " bs=1M seek=32 count=1 conv=notrunc status=none")
	}
	g.sums = h.mustSSH(numaSums)
	g.checkPlaced(t, g.pid(t))
	return g
}

// pid is the guest's QEMU as `liveupdate plan` sees it.
func (g *numaGuest) pid(t testing.TB) int {
	out := g.h.mustSSH("liveupdate plan --json --state-dir /mnt/pmem/liveupdate || true")
	m := regexp.MustCompile(`"vm": "numa",\s*"pid": (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("plan shows no QEMU for the two-node guest:\n%s", out)
	}
	var pid int
	fmt.Sscan(m[1], &pid)
	return pid
}

// checkPlaced checks that QEMU pid maps each backend's file with its
// host node's binding, and that each file's PMEM is memory of that node.
func (g *numaGuest) checkPlaced(t testing.TB, pid int) {
	t.Helper()
	maps := g.h.mustSSH(fmt.Sprintf("grep /numa/ram /proc/%d/numa_maps", pid))
	for _, b := range numaBackends {
		if !regexp.MustCompile(`(?m)^[0-9a-f]+ bind:` + fmt.Sprint(b.node) + ` file=` + regexp.QuoteMeta(b.file) + `\b`).MatchString(maps) {
			t.Errorf("QEMU %d does not map %s bound to host node %d:\n%s", pid, b.file, b.node, maps)
		}
		dev := strings.TrimSpace(g.h.mustSSH("findmnt -n -o SOURCE --target " + b.file))
		node := strings.TrimSpace(g.h.mustSSH("cat /sys/block/" + filepath.Base(dev) + "/device/numa_node"))
		if node != fmt.Sprint(b.node) {
			t.Errorf("%s is on %s, memory of host node %s, not %d", b.file, dev, node, b.node)
		}
	}
}

// checkKept checks that the guest runs under a QEMU other than before's,
// its RAM as it was and each backend still on its node.
func (g *numaGuest) checkKept(t testing.TB, before int) int {
	t.Helper()
	pid := g.pid(t)
	if pid == before {
		t.Errorf("the two-node guest still runs under QEMU %d: was it restored?", pid)
	}
	if got := g.h.mustSSH(numaSums); got != g.sums {
		t.Errorf("the two-node guest's RAM changed:\n%s\nwas:\n%s", got, g.sums)
	}
	g.checkPlaced(t, pid)
	return pid
}

// playbook runs the project's playbook against the host with extra
// variables and returns its output.
func (h *debianHost) playbook(t *testing.T, vars ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	inv := filepath.Join(dir, "inventory.ini")
	os.WriteFile(inv, []byte(fmt.Sprintf("[kvm_hosts]\nlu-debian-host ansible_host=127.0.0.1 ansible_port=%d ansible_user=root "+
		"ansible_ssh_private_key_file=%s ansible_python_interpreter=/usr/bin/python3 "+
		"ansible_ssh_common_args='-o UserKnownHostsFile=%s -o HostKeyAlias=lu-debian-host -o StrictHostKeyChecking=yes -o ServerAliveInterval=5 -o ServerAliveCountMax=3'\n",
		h.sshPort, filepath.Join(h.dir, "id_ed25519"), filepath.Join(h.dir, "known_hosts"))), 0o644)
	args := []string{"-i", inv, filepath.Join(repoRoot, "ansible/playbook.yml")}
	for _, v := range vars {
		args = append(args, "-e", v)
	}
	start := time.Now()
	cmd := exec.Command("ansible-playbook", args...)
	cmd.Env = append(os.Environ(), "ANSIBLE_NOCOLOR=1", "ANSIBLE_LOCAL_TEMP="+filepath.Join(dir, "tmp"), "ANSIBLE_RETRY_FILES_ENABLED=0")
	out, err := cmd.CombinedOutput()
	t.Logf("ansible-playbook (%s):\n%s", time.Since(start).Round(time.Second), out)
	return string(out), err
}

// untouched checks what a stopped wave or a recovered update must leave
// as it was: the kernel and boot, libvirt's daemon running again, no
// guest state saved, the filesystems writable, no kernel loaded.
func (h *debianHost) untouched(t *testing.T, bootID string) {
	t.Helper()
	if got := strings.TrimSpace(h.mustSSH("cat /proc/sys/kernel/random/boot_id")); got != bootID {
		t.Errorf("the host rebooted (boot %s → %s)", bootID, got)
	}
	if st, _ := h.ssh(time.Minute, "systemctl is-active libvirtd.service"); strings.TrimSpace(st) != "active" {
		t.Errorf("libvirtd is %q, want active again", strings.TrimSpace(st))
	}
	if out, _ := h.ssh(time.Minute, "ls /mnt/pmem/liveupdate"); strings.Contains(out, ".state\n") {
		t.Errorf("guest state files left: %s", out)
	}
	if out, _ := h.ssh(time.Minute, "cat /sys/kernel/kexec_loaded"); strings.TrimSpace(out) != "0" {
		t.Errorf("a kernel is still loaded for kexec: %s", out)
	}
	if out, code := h.ssh(time.Minute, "for d in /mnt/pmem /mnt/pmem1 /var/lib/libvirt/images /var/tmp; do touch $d/lu-writable && rm $d/lu-writable || echo $d read-only; done"); code != 0 || out != "" {
		t.Errorf("a filesystem is still read-only: %s", out)
	}
}

// refusals runs two updates the tool must refuse before it touches a
// guest, as an operator typing them would (libvirt's daemon stopped, as
// the README says): a command line that drops the host's memmap= (the
// guests' RAM would be lost with it) and a file that is no kernel
// (kexec_file_load refuses it). After each: every guest in place under the
// same QEMU, no state file, nothing loaded for kexec, everything writable.
func refusals(t *testing.T, h *debianHost, ng *numaGuest, target, bootID string) {
	const units = "libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket"
	const update = "liveupdate update --state-dir /mnt/pmem/liveupdate "
	h.mustSSH("head -c 4096 /dev/urandom > /var/tmp/lu-bad-kernel")
	// The target's initramfs cut to its first archive (the core, without
	// any module): what a host gets from an initramfs built without its
	// own modules, at worst.
	h.mustSSH(fmt.Sprintf(`python3 -c 'import sys, zlib; d = open(sys.argv[1], "rb").read(); z = zlib.decompressobj(31); z.decompress(d); open(sys.argv[2], "wb").write(d[:len(d) - len(z.unused_data)])' /boot/initramfs-%s.img /var/tmp/lu-core-only.img`, target))
	defer h.ssh(time.Minute, "rm -f /var/tmp/lu-bad-kernel /var/tmp/lu-core-only.img")
	for _, c := range []struct {
		name string
		args string
		code int
		want []string
	}{
		{"memmap dropped",
			fmt.Sprintf("--kernel /boot/vmlinuz-%s --initrd /boot/initramfs-%s.img --append 'console=ttyS0 lu.pmem=/dev/pmem0 lu.root=LABEL=lu-debian-root lu.handover=1'", target, target),
			3, []string{"drops memmap=512M!1G"}},
		{"an initramfs without this host's modules",
			fmt.Sprintf("--kernel /boot/vmlinuz-%s --initrd /var/tmp/lu-core-only.img", target),
			3, []string{"the initramfs /var/tmp/lu-core-only.img lacks module virtio_blk (/ on /dev/vd", "lacks module nd_pmem (/mnt/pmem on /dev/pmem0)",
				"lacks module virtio_net (NIC", "initramfs/build.sh KERNEL_VERSION / /var/tmp/lu-core-only.img"}},
		{"not a kernel",
			fmt.Sprintf("--kernel /var/tmp/lu-bad-kernel --initrd /boot/initramfs-%s.img", target),
			1, []string{"kexec_file_load refused", "no guest was touched"}},
	} {
		libvirtBefore, numaBefore := h.libvirtQEMU(t), ng.pid(t)
		h.mustSSH("systemctl stop " + units)
		out, code := h.ssh(4*time.Minute, update+c.args)
		h.mustSSH("systemctl start " + units)
		if code != c.code {
			t.Errorf("%s: update exit %d, want %d:\n%s", c.name, code, c.code, out)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: the update's output lacks %q:\n%s", c.name, w, out)
			}
		}
		h.untouched(t, bootID)
		if got := h.libvirtQEMU(t); got != libvirtBefore {
			t.Errorf("%s: libvirt's guest moved from QEMU %d to %d after a refused update", c.name, libvirtBefore, got)
		}
		if got := ng.pid(t); got != numaBefore {
			t.Errorf("%s: the two-node guest moved from QEMU %d to %d after a refused update", c.name, numaBefore, got)
		}
	}
}

// gateStopsWave starts two unsafe guests beside the others — one with
// private RAM, one whose RAM is bound to host node 1 but on node 0's
// PMEM — and checks the playbook's gate stops the wave naming both, with
// every guest untouched and libvirt's daemon started again.
func gateStopsWave(t *testing.T, h *debianHost, target, bootID string, libvirtPID int) {
	h.mustSSH("systemd-run --unit lu-priv-guest /usr/bin/qemu-system-x86_64 -name priv -S -accel tcg -m 64 -nodefaults -display none; " +
		"mkdir -p /mnt/pmem/numa-bad && systemd-run --unit lu-numa-bad-guest /usr/bin/qemu-system-x86_64 -name numa-bad -S -accel tcg -m 64 -nodefaults -display none " +
		"-object memory-backend-file,id=m,size=64M,mem-path=/mnt/pmem/numa-bad/ram,share=on,host-nodes=1,policy=bind -machine pc,memory-backend=m")
	defer h.ssh(time.Minute, "systemctl stop lu-priv-guest.service lu-numa-bad-guest.service; rm -rf /mnt/pmem/numa-bad")
	time.Sleep(3 * time.Second)
	out, err := h.playbook(t, "liveupdate_kernel_version="+target)
	if err == nil {
		t.Fatalf("the playbook updated a host with unsafe guests")
	}
	for _, want := range []string{
		"liveupdate refuses to update lu-debian-host (exit 3)",
		"priv: guest RAM is -m without -machine memory-backend= (anonymous private RAM)",
		"numa-bad: memory backend", // "m", in JSON's quotes
		"its RAM is bound to host node(s) [1] (host-nodes, policy=bind), but its file /mnt/pmem/numa-bad/ram is on /dev/pmem0, memory of node 0",
		"Start libvirt's daemon again",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the playbook's output lacks %q", want)
		}
	}
	h.untouched(t, bootID)
	if got := h.libvirtQEMU(t); got != libvirtPID {
		t.Errorf("libvirt's guest moved from QEMU %d to %d in a stopped wave", libvirtPID, got)
	}
}

// crashBeforeKexec kills the updater just before its kexec (guests saved
// and quit, filesystems read-only, the new kernel loaded), then does what
// the README tells the operator: `liveupdate recover`, libvirt's daemon
// started again. Every guest must run on this kernel, libvirt must keep
// its guest under the recovered QEMU, and the rest be undone.
func crashBeforeKexec(t *testing.T, h *debianHost, ng *numaGuest, target, bootID string) {
	fault := filepath.Join(t.TempDir(), "liveupdate-fault")
	build := exec.Command("go", "build", "-tags", "faultinject", "-o", fault, "./init")
	build.Dir, build.Env = repoRoot, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building liveupdate-fault: %v\n%s", err, out)
	}
	if err := h.put(fault, "/usr/local/sbin/liveupdate-fault", 0o755); err != nil {
		t.Fatal(err)
	}
	before, _ := waitGuestState(t, dhNS, dhGuest+":7008", time.Minute)
	numaBefore := ng.pid(t)
	libvirtBefore := h.libvirtQEMU(t)
	const units = "libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket"
	h.mustSSH("systemctl stop " + units)
	out, code := h.ssh(4*time.Minute, fmt.Sprintf("LIVEUPDATE_FAULT=state-ro=kill liveupdate-fault update --state-dir /mnt/pmem/liveupdate --kernel /boot/vmlinuz-%s --initrd /boot/initramfs-%s.img", target, target))
	if code == 0 || !strings.Contains(out, "FAULT INJECTED: kill at state-ro") {
		t.Fatalf("the injected crash did not happen: exit %d\n%s", code, out)
	}
	// The clock is not what this is about: no minutes for the agent.
	out, code = h.ssh(4*time.Minute, "liveupdate recover --state-dir /mnt/pmem/liveupdate --clock-timeout 20s")
	t.Logf("host$ liveupdate recover → exit %d\n%s", code, out)
	if code != 0 || !regexp.MustCompile(`heartbeat +restored`).MatchString(out) || !regexp.MustCompile(`numa +restored`).MatchString(out) {
		t.Fatalf("recover after the crash: exit %d", code)
	}
	h.mustSSH("systemctl start " + units)
	h.untouched(t, bootID)
	after, _ := waitGuestState(t, dhNS, dhGuest+":7008", 4*time.Minute)
	if after.boot != before.boot || after.seq <= before.seq || after.mem != "ok" {
		t.Errorf("libvirt's guest after recover: %+v, before %+v", after, before)
	}
	// libvirt's daemon took the recovered QEMU back, and keeps it.
	libvirtAfter := h.libvirtQEMU(t)
	if libvirtAfter == libvirtBefore {
		t.Errorf("libvirt's guest still under QEMU %d after recover", libvirtAfter)
	}
	time.Sleep(10 * time.Second)
	if got := h.libvirtQEMU(t); got != libvirtAfter {
		t.Errorf("libvirt's guest moved from the recovered QEMU %d to %d", libvirtAfter, got)
	}
	h.checkMachine(t, libvirtAfter)
	ng.checkKept(t, numaBefore)
	if st := strings.TrimSpace(h.mustSSH("systemctl is-system-running || true")); st != "running" {
		failed, _ := h.ssh(time.Minute, "systemctl --failed --no-legend --plain")
		t.Errorf("after recover the system is %q:\n%s", st, failed)
	}
}

// put copies a local file to the host over SSH.
func (h *debianHost) put(local, remote string, mode os.FileMode) error {
	f, err := os.Open(local)
	if err != nil {
		return err
	}
	defer f.Close()
	c := exec.Command("ssh", h.sshArgs(fmt.Sprintf("cat > %s.new && chmod %o %s.new && mv %s.new %s", remote, mode, remote, remote, remote))...)
	c.Stdin = f
	if out, err := c.CombinedOutput(); err != nil {
		return fmt.Errorf("ssh put %s: %v %s", remote, err, out)
	}
	return nil
}

// statusGuests is `liveupdate status --json`'s guests, by name.
func (h *debianHost) statusGuests(t testing.TB) map[string]string {
	out := h.mustSSH("liveupdate status --json --state-dir /mnt/pmem/liveupdate")
	var st struct {
		Guests []struct{ Name, Status string }
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("liveupdate status --json: %v\n%s", err, out)
	}
	m := map[string]string{}
	for _, g := range st.Guests {
		m[g.Name] = g.Status
	}
	return m
}

// checkMachine checks that systemd-machined knows libvirt's guest as
// libvirt registered it, led by QEMU pid, and that QEMU is in its scope.
func (h *debianHost) checkMachine(t testing.TB, pid int) {
	t.Helper()
	out, _ := h.ssh(time.Minute, fmt.Sprintf("machinectl show qemu-1-heartbeat -p Leader -p Unit -p Class; cat /proc/%d/cgroup", pid))
	prop := func(k string) string {
		m := regexp.MustCompile(`(?m)^` + k + `=(.*)$`).FindStringSubmatch(out)
		if m == nil {
			return ""
		}
		return m[1]
	}
	scope := regexp.MustCompile(`(?m)^0::/machine\.slice/(\S+)/libvirt/emulator$`).FindStringSubmatch(out)
	if prop("Leader") != fmt.Sprint(pid) || prop("Class") != "vm" || prop("Unit") != `machine-qemu\x2d1\x2dheartbeat.scope` || scope == nil || scope[1] != prop("Unit") {
		t.Errorf("systemd-machined's machine for libvirt's guest, and the QEMU's cgroup (want the machine led by %d, the QEMU in its scope):\n%s", pid, out)
	}
}

// control runs cmd on PID 1's control line and returns its output and
// exit code (PID 1 answers there only before it hands over, or in the
// rescue shell).
func (h *debianHost) control(t testing.TB, cmd string, d time.Duration) (string, int) {
	t.Helper()
	c, err := net.Dial("unix", h.ctl)
	if err != nil {
		t.Fatalf("control line: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	fmt.Fprintf(c, "%s\n", cmd)
	r := bufio.NewReader(c)
	var out strings.Builder
	exitRE := regexp.MustCompile(`@@LU-EXIT (\d+)@@`)
	for {
		line, err := r.ReadString('\n')
		out.WriteString(line)
		if m := exitRE.FindStringSubmatch(line); m != nil {
			code, _ := strconv.Atoi(m[1])
			t.Logf("PID 1$ %s → exit %d\n%s", cmd, code, out.String())
			return out.String(), code
		}
		if err != nil {
			t.Fatalf("control line, running %q: %v\noutput so far:\n%s", cmd, err, out.String())
		}
	}
}

// oneRestoreFails updates the host to target by the playbook with a third
// guest whose QEMU binary is broken under it (as by a bad package
// upgrade): nothing before the kexec can see it, its restore fails, the
// other guests run, the playbook fails the host naming it, and
// `liveupdate recover` brings it back once the binary is mended.
func oneRestoreFails(t *testing.T, h *debianHost, ng *numaGuest, target string) {
	const bin = "/usr/local/bin/qemu-system-x86_64"
	h.mustSSH("install -D /usr/bin/qemu-system-x86_64 " + bin + " && systemd-run --unit lu-frail-guest " + bin +
		" -name frail -accel tcg -m 64 -machine pc,memory-backend=fr0 -object memory-backend-file,id=fr0,size=64M,mem-path=/mnt/pmem/frail.ram,share=on" +
		" -nodefaults -display none -qmp unix:/run/frail.qmp,server=on,wait=off && sleep 3 && dd if=/dev/urandom of=/mnt/pmem/frail.ram bs=1M seek=32 count=1 conv=notrunc status=none")
	const sum = "dd if=/mnt/pmem/frail.ram bs=1M skip=32 count=1 status=none | sha256sum"
	want := h.mustSSH(sum)
	h.mustSSH("head -c 65536 /dev/urandom > " + bin + ".new && chmod 0755 " + bin + ".new && mv " + bin + ".new " + bin)
	numaBefore, before := ng.pid(t), h.libvirtQEMU(t)
	out, err := h.playbook(t, "liveupdate_kernel_version="+target)
	if err == nil || !strings.Contains(out, "guests not running after the update") || !strings.Contains(out, "frail") {
		t.Fatalf("the playbook did not fail the host naming the guest that did not come back (err %v)", err)
	}
	if got := strings.TrimSpace(h.mustSSH("uname -r")); got != target {
		t.Fatalf("host runs %s, want %s", got, target)
	}
	if !regexp.MustCompile(`(?s)restore failed: .*frail.*Fix the cause, then, once the host is up: liveupdate recover`).MatchString(pid1Lines(h.console())) {
		t.Errorf("PID 1 did not report the failed restore with what to do:\n%s", pid1Lines(h.console()))
	}
	st := h.statusGuests(t)
	if st["heartbeat"] != "running" || st["numa"] != "running" || st["frail"] == "running" {
		t.Errorf("after the update with one guest failing: %v", st)
	}
	if out, _ := h.ssh(time.Minute, "ls /mnt/pmem/liveupdate"); !strings.Contains(out, "frail.state\n") {
		t.Errorf("the failed guest's state file is gone: %s", out)
	}
	if got := h.mustSSH(sum); got != want {
		t.Errorf("the failed guest's RAM changed")
	}
	h.mustSSH("systemctl is-system-running --wait || true")
	libvirtAfter := h.libvirtQEMU(t)
	if libvirtAfter == before {
		t.Errorf("libvirt's guest still under QEMU %d", before)
	}
	h.checkMachine(t, libvirtAfter)
	ng.checkKept(t, numaBefore)
	// Mended, then recovered.
	h.mustSSH("install /usr/bin/qemu-system-x86_64 " + bin)
	out, code := h.ssh(4*time.Minute, "liveupdate recover --state-dir /mnt/pmem/liveupdate --clock-timeout 5s")
	t.Logf("host$ liveupdate recover → exit %d\n%s", code, out)
	if code != 0 || !regexp.MustCompile(`frail +restored`).MatchString(out) || !regexp.MustCompile(`heartbeat +running`).MatchString(out) {
		t.Fatalf("recover of the failed guest: exit %d", code)
	}
	if got := h.mustSSH(sum); got != want {
		t.Errorf("the recovered guest's RAM differs")
	}
	if st := h.statusGuests(t); st["frail"] != "running" {
		t.Errorf("after recover: %v", st)
	}
	// Gone again: the next update carries the other two.
	// [f]: the pattern must not match the shell that runs pkill (its own
	// command line holds the pattern), or pkill kills it and ssh says 255.
	h.mustSSH("pkill -f 'guest=[f]rail|-name [f]rail'; sleep 2; rm -f /mnt/pmem/frail.ram /mnt/pmem/liveupdate/frail.* " + bin)
}

// corruptManifest updates the host to target with the manifest cut short
// after it is written (the fault "corrupt"): the new kernel's PID 1 must
// stop in the rescue shell touching nothing; from there (its control
// line) the intact manifest is put back, `recover --host` restores the
// guests, and PID 1 is told to boot the host after all.
func corruptManifest(t *testing.T, h *debianHost, ng *numaGuest, target string) {
	before, _ := waitGuestState(t, dhNS, dhGuest+":7008", time.Minute)
	numaBefore := ng.pid(t)
	const dir = "/mnt/pmem/liveupdate"
	h.mustSSH("systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket")
	h.ssh(time.Minute, fmt.Sprintf("LIVEUPDATE_FAULT=kexec-record=corrupt nohup liveupdate-fault update --state-dir %s --kernel /boot/vmlinuz-%s --initrd /boot/initramfs-%s.img "+
		"--keep-control --append \"$(cat /proc/cmdline) lu.control=/dev/ttyS1\" >/var/tmp/lu-corrupt.log 2>&1 &", dir, target, target))
	m := h.waitFor(`liveupdate: FATAL: manifest: ([^\n]*)\n(?s:.*)liveupdate: RESCUE SHELL`, 8*time.Minute)
	t.Logf("PID 1 stopped: manifest: %s", m[1])
	if !strings.Contains(h.console(), "Then boot the host (") {
		t.Errorf("the rescue message does not say how to boot the host afterwards")
	}
	// Nothing was touched: the state files and RAM are there.
	// The second node's PMEM is an fstab entry: PID 1 mounts it under the
	// host root it mounted (/newroot), not at PID 1's own /mnt.
	out, _ := h.control(t, "ls "+dir+" /mnt/pmem/libvirt /newroot/mnt/pmem1/numa", time.Minute)
	for _, f := range []string{"heartbeat.state", "numa.state", "manifest.json.intact", "ram1"} {
		if !strings.Contains(out, f+"\n") {
			t.Errorf("%s is gone in the rescue path", f)
		}
	}
	h.control(t, "cp "+dir+"/manifest.json.intact "+dir+"/manifest.json", time.Minute)
	out, code := h.control(t, "liveupdate recover --host --root /newroot --manifest "+dir+"/manifest.json --clock-timeout 20s", 4*time.Minute)
	if code != 0 || !regexp.MustCompile(`heartbeat +restored`).MatchString(out) || !regexp.MustCompile(`numa +restored`).MatchString(out) {
		t.Fatalf("recover --host from the rescue shell: exit %d", code)
	}
	h.control(t, "mkdir -p /run/liveupdate && touch /run/liveupdate/boot-host", time.Minute)
	h.waitFor(`liveupdate: RESCUE SHELL(?s:.*)booting the host from the rescue shell, as asked`, 2*time.Minute)
	h.okRescues = fatalRescues(h.console())
	h.waitSSH(10 * time.Minute)
	if got := strings.TrimSpace(h.mustSSH("uname -r")); got != target {
		t.Errorf("host runs %s, want %s", got, target)
	}
	if st := strings.TrimSpace(h.mustSSH("systemctl is-system-running --wait; systemctl is-active libvirtd.service")); st != "running\nactive" {
		failed, _ := h.ssh(time.Minute, "systemctl --failed --no-legend --plain")
		t.Errorf("the host booted from the rescue shell is %q:\n%s", st, failed)
	}
	after, _ := waitGuestState(t, dhNS, dhGuest+":7008", 4*time.Minute)
	if after.boot != before.boot || after.seq <= before.seq || after.mem != "ok" {
		t.Errorf("libvirt's guest after the rescue: %+v, before %+v", after, before)
	}
	h.checkMachine(t, h.libvirtQEMU(t))
	ng.checkKept(t, numaBefore)
	t.Logf("restored from the rescue shell and booted: %+v", after)
}
