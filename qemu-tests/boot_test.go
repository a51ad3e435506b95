package qemutests

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/internal/dhcptest"
	"github.com/liveupdate/liveupdate/pkg/kmod"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/pid1"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Boot tests (tier 3): the project's initramfs boots Debian 6.12 in an
// outer VM under TCG — no inner guest — and PID 1 brings the host up.

var (
	initrdOnce sync.Once
	initrdPath string
	initrdErr  error
)

// hostInitramfs builds the host initramfs for the "new" kernel once per run.
func hostInitramfs(t testing.TB) string {
	t.Helper()
	initrdOnce.Do(func() {
		kver, err := os.ReadFile(filepath.Join(repoRoot, ".cache/kernels/new/version"))
		if err != nil {
			initrdErr = err
			return
		}
		initrdPath = filepath.Join(binDir, "host-initramfs.cpio.gz")
		cmd := exec.Command(filepath.Join(repoRoot, "initramfs/build.sh"), strings.TrimSpace(string(kver)),
			filepath.Join(repoRoot, ".cache/kernels/new"), initrdPath)
		cmd.Dir = repoRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			initrdErr = fmt.Errorf("initramfs/build.sh: %v\n%s", err, out)
		}
	})
	if initrdErr != nil {
		t.Fatal(initrdErr)
	}
	return initrdPath
}

// hostRootImage makes an ext4 image (no root mounts needed: mkfs.ext4 -d)
// holding the directories PID 1 binds into it and, if m is not nil, the
// manifest at /var/lib/liveupdate/manifest.json (raw bytes if rawManifest).
func hostRootImage(t testing.TB, m *manifest.Manifest, rawManifest []byte, extra ...func(tree string)) (img string, manifestBytes []byte) {
	t.Helper()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	for _, d := range []string{"dev", "proc", "sys", "run", "mnt/pmem", "var/lib/liveupdate", "sbin", "bin"} {
		os.MkdirAll(filepath.Join(tree, d), 0o755)
	}
	for _, f := range extra {
		f(tree)
	}
	manifestBytes = rawManifest
	if m != nil {
		b, err := json.MarshalIndent(m, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		manifestBytes = b
	}
	if manifestBytes != nil {
		os.WriteFile(filepath.Join(tree, "var/lib/liveupdate/manifest.json"), manifestBytes, 0o600)
	}
	img = filepath.Join(dir, "root.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-L", "lu-hostroot", "-d", tree, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 -d: %v\n%s", err, out)
	}
	return img, manifestBytes
}

// readImageFile reads a file out of an ext4 image without mounting it.
func readImageFile(t testing.TB, img, path string) []byte {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+path, img).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", path, err)
	}
	return out
}

// hostVM is an outer VM: the "host" running our initramfs.
type hostVM struct {
	t       testing.TB
	log     string
	monitor string // HMP socket
	cmd     *exec.Cmd
	abort   chan string // a message here ends waitForNth with a failure
}

type hostOpts struct {
	kernel  string   // default: the "new" kernel
	initrd  string   // default: hostInitramfs for the new kernel
	extra   []string // more QEMU options
	cmdline []string // lu.* and other parameters besides console and memmap
	memmap  bool     // reserve PMEM with memmap=512M!1G
	machine []string // the VM's memory (default -m 2G), e.g. NUMA nodes
	rootImg string   // virtio-blk disk
	netns   string   // run QEMU in this named netns with a NIC on tap
	tap     string
	files   []*os.File // passed to QEMU as fds 3, 4, … (e.g. a tap opened in a netns)
}

func bootHost(t testing.TB, o hostOpts) *hostVM {
	t.Helper()
	dir := t.TempDir()
	h := &hostVM{t: t, log: filepath.Join(dir, "console.log"), monitor: filepath.Join(dir, "hmp.sock")}
	kernelArgs := []string{"console=ttyS0", "panic=-1"}
	if o.memmap {
		kernelArgs = append(kernelArgs, "memmap=512M!1G")
	}
	kernelArgs = append(kernelArgs, o.cmdline...)
	kernel, initrd := o.kernel, o.initrd
	if kernel == "" {
		kernel = filepath.Join(repoRoot, ".cache/kernels/new/vmlinuz")
	}
	if initrd == "" {
		initrd = hostInitramfs(t)
	}
	// -cpu max: RDRAND seeds the kernel's random pool at once (DHCP needs it).
	mem := []string{"-m", "2G"}
	if o.machine != nil {
		mem = o.machine
	}
	argv := []string{qemuBinary, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
		"-nographic", "-nodefaults", "-no-reboot", "-serial", "file:" + h.log,
		"-monitor", "unix:" + h.monitor + ",server=on,wait=off",
		"-kernel", kernel, "-initrd", initrd, "-append", strings.Join(kernelArgs, " ")}
	argv = append(append(argv, mem...), o.extra...)
	if o.rootImg != "" {
		argv = append(argv, "-drive", "file="+o.rootImg+",if=virtio,format=raw")
	}
	if o.tap != "" {
		argv = append(argv, "-netdev", "tap,id=n0,ifname="+o.tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56")
	}
	h.cmd = exec.Command(argv[0], argv[1:]...)
	h.cmd.ExtraFiles = o.files
	start := func() error { return h.cmd.Start() }
	var err error
	if o.netns != "" {
		err = tapdev.InNetNS("/run/netns/"+o.netns, start)
	} else {
		err = start()
	}
	if err != nil {
		t.Fatalf("starting outer VM: %v", err)
	}
	t.Cleanup(func() {
		h.cmd.Process.Kill()
		h.cmd.Wait()

	})
	return h
}

// waitFor waits until the console shows a line matching re. When waiting
// for anything but the rescue shell, the rescue shell ends the wait early.
func (h *hostVM) waitFor(re string, d time.Duration) []string {
	h.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(h.log)
		if m := rx.FindStringSubmatch(string(b)); m != nil {
			return m
		}
		if !strings.Contains(re, "RESCUE") && fatalRescue(string(b)) {
			h.t.Fatalf("PID 1 went to the rescue shell while waiting for %q; console:\n%s", re, tail(string(b), 60))
		}
		time.Sleep(100 * time.Millisecond)
	}
	b, _ := os.ReadFile(h.log)
	h.t.Fatalf("console never matched %q within %s; console:\n%s", re, d, tail(string(b), 60))
	return nil
}

// hmp sends one human-monitor command to the outer VM's QEMU.
func (h *hostVM) hmp(cmd string) {
	h.t.Helper()
	c, err := net.Dial("unix", h.monitor)
	if err != nil {
		h.t.Fatalf("monitor: %v", err)
	}
	defer c.Close()
	fmt.Fprintf(c, "%s\n", cmd)
	time.Sleep(300 * time.Millisecond) // let QEMU read it before the close
}

// exited waits for the outer VM's QEMU to exit (e.g. after a power off).
func (h *hostVM) exited(d time.Duration) bool {
	done := make(chan struct{})
	go func() { h.cmd.Process.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// waitForNth waits until re (which must match across the console) has
// matched n times, and returns the n-th match.
func (h *hostVM) waitForNth(re string, n int, d time.Duration) []string {
	h.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(h.log)
		if ms := rx.FindAllStringSubmatch(string(b), -1); len(ms) >= n {
			return ms[n-1]
		}
		if fatalRescue(string(b)) {
			h.t.Fatalf("PID 1 went to the rescue shell; console:\n%s", tail(string(b), 80))
		}
		select {
		case msg := <-h.abort:
			h.t.Fatalf("%s\nconsole:\n%s", msg, tail(string(b), 40))
		case <-time.After(200 * time.Millisecond):
		}
	}
	b, _ := os.ReadFile(h.log)
	h.t.Fatalf("console never matched %q %d times within %s; console:\n%s", re, n, d, tail(string(b), 80))
	return nil
}

// partialRescue is the rescue shell PID 1 offers when some guests failed to
// restore while the others run.
var partialRescue = regexp.MustCompile(`Fix the cause, then: liveupdate recover [^\n]*\nliveupdate: RESCUE SHELL`)

// fatalRescue tells whether PID 1 stopped in the rescue shell (not the one
// it offers beside running guests after a partial restore).
func fatalRescue(console string) bool { return fatalRescues(console) > 0 }

// fatalRescues counts the times the console shows such a rescue shell.
func fatalRescues(console string) int {
	return strings.Count(console, "liveupdate: RESCUE SHELL") - len(partialRescue.FindAllStringIndex(console, -1))
}

func (h *hostVM) console() string {
	b, _ := os.ReadFile(h.log)
	return string(b)
}

func tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// testNetns makes a network namespace with a persistent tap for the outer
// VM's NIC, with address, and the test's DHCP server on it.
func testNetns(t testing.TB, ns, tap string) *dhcptest.Server {
	t.Helper()
	exec.Command("ip", "netns", "del", ns).Run()
	run := func(args ...string) {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", args, err, out)
		}
	}
	run("ip", "netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
	run("ip", "-n", ns, "addr", "add", "10.80.0.1/24", "dev", tap)
	run("ip", "-n", ns, "link", "set", tap, "up")
	var srv *dhcptest.Server
	err := tapdev.InNetNS("/run/netns/"+ns, func() error {
		var err error
		srv, err = dhcptest.Start(tap, net.IPv4(10, 80, 0, 1), net.IPv4(10, 80, 0, 2), net.CIDRMask(24, 32))
		return err
	})
	if err != nil {
		t.Fatalf("DHCP server: %v", err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

var bootTapFlags = uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE)

func bootManifest() *manifest.Manifest {
	return &manifest.Manifest{
		Schema: manifest.SchemaVersion, ID: "boot-test", Created: time.Now(), StateDir: "/mnt/pmem/liveupdate",
		VMs: []manifest.VM{},
		Cgroups: []manifest.Cgroup{
			{Path: "/", Controllers: []string{"cpuset", "cpu", "memory", "pids"}},
			{Path: "/machine.slice", Controllers: []string{"cpuset", "cpu", "memory", "pids"}},
			{Path: "/machine.slice/vm1", Limits: map[string]string{
				"cpu.max": "50000 100000", "cpu.weight": "200", "memory.max": "268435456",
				"memory.high": "201326592", "pids.max": "128", "cpuset.cpus": "1", "cpuset.mems": "0"}},
		},
		Network: manifest.Network{
			Bridges: []manifest.Bridge{{Name: "br0", MAC: "02:00:00:aa:00:01", MTU: 1500, Addrs: []string{"10.81.0.1/24"}, Up: true}},
			Taps:    []manifest.Tap{{Name: "vnet0", MAC: "fe:54:00:aa:00:02", MTU: 1500, Flags: bootTapFlags, Queues: 2, Master: "br0", Up: true}},
		},
	}
}

// checkModulesLoaded checks PID 1's "modules loaded" lines against
// initramfs/modules.txt: first the groups needed before the devices, then
// the @network groups, each module of the list loaded once; KVM's
// (@restore) load after READY when no guest uses KVM, so their line may
// not be there yet.
func checkModulesLoaded(t *testing.T, con string) {
	t.Helper()
	text, err := os.ReadFile(filepath.Join(repoRoot, "initramfs/modules.txt"))
	if err != nil {
		t.Fatal(err)
	}
	groups, err := kmod.ParseList(string(text))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{}
	for _, g := range groups {
		want[g.Phase] = append(want[g.Phase], g.Names...)
	}
	// The kernel's own lines (a module's init says hello) go out on the
	// serial console while a line of PID 1's is on its way there, and may
	// land inside it: cut them out, which puts PID 1's lines together again.
	con = regexp.MustCompile(`\[\s*\d+\.\d+\] [^\n]*\n`).ReplaceAllString(con, "")
	var lists []string // each once: the console has PID 1's lines and their /dev/kmsg copies
	for _, m := range regexp.MustCompile(`msg="modules loaded" count=\d+ list="([^"]*)"`).FindAllStringSubmatch(con, -1) {
		if !slices.Contains(lists, m[1]) {
			lists = append(lists, m[1])
		}
	}
	if len(lists) != 2 && len(lists) != 3 {
		var near []string // what the console shows of them, for the cause
		for _, l := range strings.Split(con, "\n") {
			if strings.Contains(l, "modules") || strings.Contains(l, "loaded") {
				near = append(near, l)
			}
		}
		t.Fatalf("console has %d distinct \"modules loaded\" lines, want 2 or 3 (the first groups, @network, @restore): %q\nits lines that mention modules:\n%s", len(lists), lists, strings.Join(near, "\n"))
	}
	for i, phase := range []string{"", pid1.NetworkPhase, pid1.RestorePhase}[:len(lists)] {
		var got []string
		for _, e := range strings.Split(lists[i], ",") {
			got = append(got, strings.SplitN(e, "=", 2)[0])
		}
		if !reflect.DeepEqual(got, want[phase]) {
			t.Errorf("modules loaded for phase %q: %v, want %v (initramfs/modules.txt)", phase, got, want[phase])
		}
	}
}

// TestBootHost boots the new kernel with the initramfs: modules, PMEM
// formatted and mounted with DAX, DHCP from the test's server, the
// manifest's cgroup tree and bridge+tap rebuilt and read back, READY.
func TestBootHost(t *testing.T) {
	srv := testNetns(t, "lu-boot", "lubt0")
	m := bootManifest()
	img, _ := hostRootImage(t, m, nil)
	h := bootHost(t, hostOpts{memmap: true, rootImg: img, netns: "lu-boot", tap: "lubt0", cmdline: []string{
		"lu.pmem=/dev/pmem0", "lu.format_pmem=1", "lu.root=LABEL=lu-hostroot",
		"lu.manifest=/var/lib/liveupdate/manifest.json", "lu.dhcp=eth0"}})
	ready := h.waitFor(`liveupdate: READY in ([0-9.]+)ms after PID 1 start \(kernel uptime at start ([0-9.]+)s\); guests running: 0; (.*)`, 3*time.Minute)
	con := h.console()
	checkModulesLoaded(t, con)
	for _, want := range []string{
		`liveupdate: PMEM /dev/pmem0 mounted on /mnt/pmem options=`,
		`liveupdate: DHCP eth0 10.80.0.2/24 router 10.80.0.1`,
		`liveupdate: tap vnet0 mac=fe:54:00:aa:00:02 mtu=1500 flags=tap,no_pi,vnet_hdr,multi_queue,persist master=br0 up=true`,
		`liveupdate: cgroup /machine.slice subtree_control="cpuset cpu memory pids"`,
		`liveupdate: cgroup /machine.slice/vm1 subtree_control="" cpu.max="50000 100000" cpu.weight="200" cpuset.cpus="1" cpuset.mems="0" memory.high="201326592" memory.max="268435456" pids.max="128"`,
	} {
		if !strings.Contains(con, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	if !regexp.MustCompile(`mounted on /mnt/pmem options=\S*dax=always`).MatchString(con) {
		t.Errorf("PMEM not mounted with dax=always")
	}
	if srv.Acks() != 1 {
		t.Errorf("DHCP server acknowledged %d leases, want 1", srv.Acks())
	}
	if strings.Contains(con, "FATAL") {
		t.Errorf("PID 1 reported a fatal error")
	}
	t.Logf("PID 1 start → ready: %s ms (kernel uptime at PID 1 start %s s); phases: %s", ready[1], ready[2], ready[3])

	// Ctrl-Alt-Del asks PID 1 for an orderly stop. This PMEM is memmap=
	// (RAM that power-off erases): guests are shut down (none here), not
	// saved; filesystems unmounted, power off.
	h.hmp("sendkey ctrl-alt-delete")
	h.waitFor(`orderly stop requested`, time.Minute)
	h.waitFor(`the PMEM is memmap= \(RAM that power-off erases\): guests are shut down, not saved`, time.Minute)
	h.waitFor(`guests shut down \(their RAM does not survive power-off\), filesystems unmounted: powering off`, time.Minute)
	if !h.exited(time.Minute) {
		t.Errorf("outer VM did not power off")
	}
}

// TestBootHandover: with lu.handover=1, PID 1 switches root into the host
// root and execs its init, which then runs as process 1 with /proc, /dev
// and the PMEM mount in place.
func TestBootHandover(t *testing.T) {
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal("busybox (static) not installed: run scripts/setup.sh")
	}
	initScript := "#!/bin/busybox sh\n" +
		"echo HOST-INIT pid=$$ pmem=$(/bin/busybox grep -c ' /mnt/pmem ' /proc/mounts) devnull=$(/bin/busybox ls /dev/null)\n" +
		"exec /bin/busybox sleep 100000\n"
	img, _ := hostRootImage(t, nil, nil, func(tree string) {
		b, _ := os.ReadFile(busybox)
		os.WriteFile(filepath.Join(tree, "bin/busybox"), b, 0o755)
		os.WriteFile(filepath.Join(tree, "sbin/init"), []byte(initScript), 0o755)
	})
	h := bootHost(t, hostOpts{memmap: true, rootImg: img, cmdline: []string{
		"lu.pmem=/dev/pmem0", "lu.format_pmem=1", "lu.root=LABEL=lu-hostroot", "lu.handover=1"}})
	h.waitFor(`liveupdate: READY in`, 3*time.Minute)
	m := h.waitFor(`HOST-INIT pid=(\d+) pmem=(\d+) devnull=(\S+)`, time.Minute)
	if m[1] != "1" || m[2] != "1" || m[3] != "/dev/null" {
		t.Errorf("host init runs as pid %s with pmem mounts %s and /dev/null %q", m[1], m[2], m[3])
	}
}

// TestBootBadInputs: each bad input stops PID 1 with a clear message on the
// console and a rescue shell, and touches no data.
func TestBootBadInputs(t *testing.T) {
	outside := bootManifest()
	outside.VMs = []manifest.VM{{Name: "vm1", RestartArgv: []string{"qemu-system-x86_64", "-incoming", "defer"},
		QMP: "/run/vm1.qmp", StateFile: "/mnt/pmem/liveupdate/vm1.state", Status: manifest.StatusQuit,
		RAM: []qemuargv.MemoryBackend{{ID: "ram0", MemPath: "/dev/shm/vm1.ram", Share: true, Type: "memory-backend-file"}}}}
	tests := []struct {
		name     string
		memmap   bool
		cmdline  []string
		manifest *manifest.Manifest
		raw      []byte
		want     string
	}{
		{name: "no PMEM device", cmdline: []string{"lu.pmem=/dev/pmem0", "lu.devwait=3s"},
			want: `device /dev/pmem0 did not appear: context deadline exceeded: is memmap=SIZE!OFFSET on the kernel command line`},
		{name: "PMEM without filesystem", memmap: true, cmdline: []string{"lu.pmem=/dev/pmem0"},
			want: `PMEM /dev/pmem0: no filesystem (on first boot, add lu.format_pmem=1 to format an empty device)`},
		{name: "manifest does not parse", memmap: true, raw: []byte(`{"schema":1,"vms":[`),
			cmdline: []string{"lu.pmem=/dev/pmem0", "lu.format_pmem=1", "lu.root=LABEL=lu-hostroot", "lu.manifest=/var/lib/liveupdate/manifest.json"},
			want:    `manifest does not parse`},
		{name: "manifest path outside PMEM", memmap: true, manifest: outside,
			cmdline: []string{"lu.pmem=/dev/pmem0", "lu.format_pmem=1", "lu.root=LABEL=lu-hostroot", "lu.manifest=/var/lib/liveupdate/manifest.json"},
			want:    `RAM backend "ram0" file "/dev/shm/vm1.ram" is outside [/mnt/pmem]`},
		{name: "missing module", cmdline: []string{"lu.modules=no_such_module"},
			want: `module no_such_module: could not find module path`},
		{name: "unknown parameter", cmdline: []string{"lu.pmme=/dev/pmem0"},
			want: `unknown kernel parameter "lu.pmme"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := hostOpts{memmap: tt.memmap, cmdline: tt.cmdline}
			var img string
			var before []byte
			if tt.manifest != nil || tt.raw != nil {
				img, before = hostRootImage(t, tt.manifest, tt.raw)
				o.rootImg = img
			}
			h := bootHost(t, o)
			h.waitFor(`liveupdate: RESCUE SHELL`, 3*time.Minute)
			con := h.console()
			if !strings.Contains(con, "liveupdate: FATAL: ") || !strings.Contains(con, tt.want) {
				t.Errorf("console does not say %q", tt.want)
			}
			if !strings.Contains(con, "No guest data was touched") {
				t.Errorf("console does not say data was kept")
			}
			if strings.Contains(con, "READY") {
				t.Errorf("PID 1 reported READY after a fatal error")
			}
			if img != "" {
				h.cmd.Process.Kill()
				h.cmd.Wait()
				if after := readImageFile(t, img, "/var/lib/liveupdate/manifest.json"); string(after) != string(before) {
					t.Errorf("manifest changed on disk:\n%s", after)
				}
			}
		})
	}
}
