package qemutests

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/pid1"
	"github.com/liveupdate/liveupdate/pkg/timeline"
)

// besideMachine is the outer VM's memory for TestLUOBesidePMEM: two NUMA
// nodes of 1 GiB (memmap='s PMEM at 1 GiB lies in node 1).
var besideMachine = []string{"-m", "2G", "-object", "memory-backend-ram,id=node0,size=1G", "-object", "memory-backend-ram,id=node1,size=1G",
	"-numa", "node,nodeid=0,cpus=0,memdev=node0", "-numa", "node,nodeid=1,cpus=1,memdev=node1"}

// twinAddr is the LUO twin's address on the nested host's bridge.
const twinAddr = "10.80.0.4"

// twinImage is the twin's disk, beside the inner guest's on the images
// filesystem.
const twinImage = imagesDir + "/twin.qcow2"

// besideHostConfig is a nested host with both backends at once: the inner
// guest of nestedHostConfig, RAM on PMEM, and its twin — the same guest,
// its own disk, tap and address — with its RAM in a memfd kept by LUO,
// bound to NUMA node 1 (besideMachine).
func besideHostConfig() pid1.HostConfig {
	hc := nestedHostConfig()
	hc.Network.Taps = append(hc.Network.Taps, manifest.Tap{Name: "vnet1", MAC: "fe:54:00:dd:00:04", MTU: 1500,
		Flags: unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR, Queues: 1, Master: "br0", Up: true})
	hc.Cgroups = append(hc.Cgroups, manifest.Cgroup{Path: "/machine.slice/twin", Limits: map[string]string{"pids.max": "256", "cpu.weight": "150"}})
	twin := pid1.Guest{Name: "twin", Cgroup: "/machine.slice/twin", MemfdMiB: []int{160}}
	// Both guests' RAM bound to NUMA node 1, where the PMEM lies: the twin
	// differs from the inner guest in its RAM's backend alone, so that
	// their blackouts compare LUO with PMEM (P10) and nothing else.
	for i, a := range hc.Guests[0].Argv {
		hc.Guests[0].Argv[i] = strings.ReplaceAll(a, "mem-path=/mnt/pmem/inner.ram,share=on", "mem-path=/mnt/pmem/inner.ram,share=on,host-nodes=1,policy=bind")
	}
	for _, a := range hc.Guests[0].Argv {
		for _, r := range [][2]string{
			// Bound to the outer VM's second NUMA node: whether its pages
			// stay there through the preserve, the kexec and the retrieve.
			{"mem-path=/mnt/pmem/inner.ram", "mem-path=/proc/self/fd/3"},
			{"/mnt/pmem/inner-serial.log", "/mnt/pmem/twin-serial.log"},
			{innerImage, twinImage}, {"hb.ip=" + innerAddr, "hb.ip=" + twinAddr},
			{"/run/inner", "/run/twin"}, {"ifname=vnet0", "ifname=vnet1"}, {"mac=52:54:00:dd:00:03", "mac=52:54:00:dd:00:05"},
		} {
			a = strings.ReplaceAll(a, r[0], r[1])
		}
		if a == "inner" {
			a = "twin"
		}
		twin.Argv = append(twin.Argv, a)
	}
	hc.Guests = append(hc.Guests, twin)
	return hc
}

// TestLUOBesidePMEM (tier 4, make bench's P10; make soak): PMEM and LUO
// guests on one host, through live updates of the LUO test kernel into
// itself: the inner guest's RAM on PMEM, its twin's in a memfd, both
// restored by each update (heartbeat, same boot id, RAM checksum), their
// blackouts side by side, and the twin's memfd pages on the NUMA node its
// backend binds them to, before and after each update. Then the twin is stopped and the inner guest
// updated alone, with nothing for LUO to keep: how much of the new
// kernel's boot the preserved memfd costs. Last, a memfd the new kernel
// does not hand back: that guest alone fails. LIVEUPDATE_LUO_N updates with
// both (default 2), two alone; with LIVEUPDATE_BENCH_OUT, one JSON line
// per update there.
//
// make test leaves it out: TestLUOUpdate (a host with no PMEM at all) is
// its LUO tier, and the half hour cannot hold a third nested host.
func TestLUOBesidePMEM(t *testing.T) {
	if os.Getenv("LIVEUPDATE_NESTED_FULL") == "" && os.Getenv("LIVEUPDATE_LUO_N") == "" {
		t.Skip("PMEM and LUO guests on one host: set LIVEUPDATE_NESTED_FULL=1 or LIVEUPDATE_LUO_N (make bench and make soak do)")
	}
	n := 2
	if s := os.Getenv("LIVEUPDATE_LUO_N"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	kdir := luoKernel(t)
	kver := strings.TrimSpace(readFile(t, kdir+"/version"))
	h := bootNestedHostOn(t, nestedBoot{config: besideHostConfig(),
		kernel: kdir + "/bzImage", initrd: repoRoot + "/.cache/hostroot/initramfs-" + kver + ".img",
		rootEnv: []string{"LUO_KERNEL=" + kdir}, cmdline: []string{"kho=on", "liveupdate=on"}, images: []string{twinImage}, machine: besideMachine})
	t.Cleanup(func() {
		if t.Failed() {
			h.use(t)
			h.conn = nil
			h.run("tail -n 25 /mnt/pmem/inner-serial.log /mnt/pmem/twin-serial.log", 30*time.Second)
		}
	})
	h.waitFor(`liveupdate: READY in`, 3*time.Minute)
	h.waitFor(`liveupdate: started guest twin pid \d+`, time.Minute)
	states := map[string]string{"inner": innerAddr + ":7008", "twin": twinAddr + ":7008"}
	first := map[string]beat{}
	for name, addr := range states {
		first[name], _ = waitGuestState(t, nestNS, addr, 10*time.Minute)
		t.Logf("%s up on %s: %+v", name, kver, first[name])
	}
	const lu = "liveupdate %s --root /newroot --state-dir /mnt/pmem/liveupdate"
	kargs := fmt.Sprintf(" --kernel /boot/vmlinuz-%s --initrd /boot/initramfs-%s.img", kver, kver)
	// Where the twin's RAM lies: the pages of its QEMU's memfd mapping on
	// each NUMA node (numa_maps); all on node 1, as its backend binds them.
	twinNodes := func(t *testing.T, when string) map[string]int {
		out, _ := h.output(fmt.Sprintf(lu, "plan")+" --json", time.Minute)
		m := regexp.MustCompile(`"vm": "twin",\s*"pid": (\d+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("plan shows no twin QEMU")
		}
		nodes := pagesByNode(h, m[1], 3) // its RAM: mem-path=/proc/self/fd/3
		t.Logf("twin's RAM pages by NUMA node %s: %v", when, nodes)
		if nodes["N1"] == 0 || nodes["N0"] != 0 {
			t.Errorf("twin's RAM %s: pages by node %v, want all on N1 (host-nodes=1,policy=bind)", when, nodes)
		}
		return nodes
	}
	twinNodes(t, "before the updates")

	t.Run("Plan", func(t *testing.T) {
		defer h.use(t)()
		out, code := h.run(fmt.Sprintf(lu, "update")+" --dry-run"+kargs, 2*time.Minute)
		if code != 0 || !regexp.MustCompile(`(?m)^  inner \(pid \d+\): safe; RAM: ram0 file /mnt/pmem/inner.ram$`).MatchString(out) ||
			!regexp.MustCompile(`(?m)^  twin \(pid \d+\): safe; RAM: ram0 memfd-fd`).MatchString(out) {
			t.Errorf("update --dry-run: exit %d, want 0 with inner's RAM a file and twin's a memfd", code)
		}
	})
	if t.Failed() {
		return
	}
	updates, boots := 0, 1 // kernels this host has booted: the cold one first
	update := func(t *testing.T, guests []string) {
		defer h.use(t)()
		before := map[string]beat{}
		for _, g := range guests {
			before[g], _ = waitGuestState(t, nestNS, states[g], 4*time.Minute)
		}
		h.sendNoAnswer(fmt.Sprintf(lu, "update")+" --keep-control"+kargs, "the update returned instead of rebooting")
		boots++
		m := h.waitForNth(fmt.Sprintf(`(?s)Linux version %s .*?liveupdate: READY in ([0-9.]+)ms after PID 1 start[^\n]*guests running: (\d+)`, regexp.QuoteMeta(kver)), boots, 5*time.Minute)
		if m[2] != strconv.Itoa(len(guests)) {
			t.Fatalf("%s guests running after the kexec, want %d", m[2], len(guests))
		}
		for _, g := range guests {
			after, _ := waitGuestState(t, nestNS, states[g], 4*time.Minute)
			if after.boot != first[g].boot || after.seq <= before[g].seq || after.mem != "ok" {
				t.Fatalf("%s after the update: %+v, before %+v (first %+v)", g, after, before[g], first[g])
			}
		}
		_, split, tl := h.endUpdate(t, nil, kver)
		updates++
		t.Logf("update %d (%s): %s", updates, strings.Join(guests, ", "), split)
		var nodes map[string]int
		if slices.Contains(guests, "twin") {
			nodes = twinNodes(t, fmt.Sprintf("after update %d", updates))
		}
		recordBesideBench(t, tl, updates, guests, nodes)
	}
	for i := range n {
		if !t.Run(fmt.Sprintf("Both%d", i+1), func(t *testing.T) { update(t, []string{"inner", "twin"}) }) {
			return
		}
	}
	// The twin stopped (its QEMU told to quit: PID 1 has finished the
	// session, nothing of it is kept): the inner guest alone, nothing for
	// LUO to keep.
	t.Run("StopTwin", func(t *testing.T) {
		defer h.use(t)()
		if out, code := h.run(qmpsend+" /run/twin.qmp quit", time.Minute); code != 0 {
			t.Fatalf("quitting the twin: exit %d: %s", code, out)
		}
		deadline := time.Now().Add(time.Minute)
		for {
			out, _ := h.output(fmt.Sprintf(lu, "plan")+" --json", time.Minute)
			if !strings.Contains(out, `"vm": "twin"`) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the twin's QEMU is still there after quit")
			}
			time.Sleep(time.Second)
		}
	})
	for i := range 2 {
		if !t.Run(fmt.Sprintf("Alone%d", i+1), func(t *testing.T) { update(t, []string{"inner"}) }) {
			return
		}
	}
	// A memfd the new kernel does not hand back: a paused guest, spare,
	// its RAM in a memfd, updated beside inner with its LUO token moved in
	// the manifest to one no session keeps (fault losetoken, just after the
	// manifest is written). inner runs; spare alone fails, named, its state
	// file and manifest record kept; PID 1 keeps the session and stays init.
	t.Run("LostToken", func(t *testing.T) {
		defer h.use(t)()
		h.run("liveupdate exec-memfd --mib 32 -- chroot /newroot /usr/bin/qemu-system-x86_64 -name spare -S -accel tcg -m 32 "+
			"-machine pc,memory-backend=m0 -object memory-backend-file,id=m0,size=32M,mem-path=/proc/self/fd/3,share=on "+
			"-nodefaults -display none -qmp unix:/run/spare.qmp,server=on,wait=off -daemonize -pidfile /run/spare.pid", time.Minute)
		before, _ := waitGuestState(t, nestNS, states["inner"], 4*time.Minute)
		h.sendNoAnswer("LIVEUPDATE_FAULT=kexec-record=losetoken LIVEUPDATE_FAULT_VM=spare /newroot/usr/sbin/liveupdate-fault update --root /newroot --state-dir /mnt/pmem/liveupdate --keep-control"+kargs,
			"the update returned instead of rebooting")
		boots++
		m := h.waitForNth(fmt.Sprintf(`(?s)Linux version %s .*?liveupdate: READY in ([0-9.]+)ms after PID 1 start[^\n]*guests running: (\d+)`, regexp.QuoteMeta(kver)), boots, 5*time.Minute)
		if m[2] != "1" {
			t.Fatalf("%s guests running after the kexec, want 1 (inner)", m[2])
		}
		h.waitFor(`guest RAM not retrieved from the LUO session[^\n]*vm=spare`, time.Minute)
		h.waitFor(`guests not running whose RAM PID 1 alone holds[^\n]*spare`, time.Minute)
		after, _ := waitGuestState(t, nestNS, states["inner"], 4*time.Minute)
		if after.boot != first["inner"].boot || after.seq <= before.seq || after.mem != "ok" {
			t.Fatalf("inner after the update: %+v, before %+v", after, before)
		}
		if out, _ := h.run("ls /mnt/pmem/liveupdate", time.Minute); !regexp.MustCompile(`(?m)^spare\.state\s*$`).MatchString(out) {
			t.Errorf("spare's state file is gone")
		}
		out, _ := h.output("cat /mnt/pmem/liveupdate/manifest.json", time.Minute)
		var man manifest.Manifest
		if err := json.Unmarshal([]byte(strings.Split(out, "@@LU-EXIT")[0]), &man); err != nil {
			t.Fatalf("the manifest after the update: %v", err)
		}
		for _, v := range man.VMs {
			t.Logf("manifest: %s %s %s", v.Name, v.Status, v.Error)
			if v.Name == "spare" && (v.Status != manifest.StatusFailed || !strings.Contains(v.Error, "LUO")) {
				t.Errorf("spare in the manifest: %s (%s), want failed, saying why", v.Status, v.Error)
			}
		}
	})
}

// recordBesideBench appends one update's figures to $LIVEUPDATE_BENCH_OUT
// for make bench's P10: each guest's blackout, the new kernel's boot, and
// each guest's own part after the kernel (PID 1 before its restore, then
// its QEMU's exec, start-up, load and resume), and the PMEM guest's
// blackout cut as P5' cuts it (P5'b). It measures; it asserts nothing.
func recordBesideBench(t *testing.T, tl *timeline.Timeline, n int, guests []string, twinNodes map[string]int) {
	path := os.Getenv("LIVEUPDATE_BENCH_OUT")
	if path == "" || tl == nil {
		return
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	rec := map[string]any{"update": n, "guests": guests}
	if twinNodes != nil {
		rec["twin_pages_by_node"] = twinNodes
	}
	for _, s := range tl.Spans {
		if s.Row == "host" && (s.Name == "kernel boot" || s.Name == "kexec") {
			rec[strings.ReplaceAll(s.Name, " ", "_")+"_ms"] = ms(s.Took())
		}
	}
	var kernelUp time.Time
	for _, s := range tl.Spans {
		if s.Row == "host" && s.Name == "kernel boot" {
			kernelUp = s.End
		}
	}
	for _, g := range tl.Guests {
		if !slices.Contains(guests, g.Name) {
			continue
		}
		rec[g.Name+"_blackout_ms"] = ms(g.Blackout)
		if !kernelUp.IsZero() {
			rec[g.Name+"_after_kernel_ms"] = ms(g.Resumed.Sub(kernelUp))
		}
	}
	// The PMEM guest's blackout cut as P5' cuts the nested update's, here
	// into a kernel with its drivers built in (no modules to load).
	if slices.Contains(guests, "inner") {
		if split := oursSplit(tl, "inner"); split != nil {
			rec["inner_ours"] = split
		}
	}
	appendBenchRecord(t, path, rec)
}

// pagesByNode is how many pages of the file QEMU pid holds open at fd lie
// on each NUMA node ("N1" → pages): its mappings found by the file's inode
// (fdinfo's ino, the inode column of maps), their pages by address in
// numa_maps. Not by name: a memfd LUO hands back after a kexec has none
// ("/ (deleted)").
func pagesByNode(h *nestedHost, pid string, fd int) map[string]int {
	read := func(f string) string {
		out, _ := h.output(fmt.Sprintf("cat /proc/%s/%s", pid, f), time.Minute)
		return strings.Split(out, "@@LU-EXIT")[0]
	}
	m := regexp.MustCompile(`(?m)^ino:\s*(\d+)`).FindStringSubmatch(read(fmt.Sprintf("fdinfo/%d", fd)))
	if m == nil {
		h.t.Fatalf("fdinfo of QEMU %s's fd %d gives no inode", pid, fd)
	}
	addrs := map[string]bool{}
	for _, l := range strings.Split(read("maps"), "\n") {
		if f := strings.Fields(l); len(f) >= 5 && f[4] == m[1] {
			addrs[strings.SplitN(f[0], "-", 2)[0]] = true
		}
	}
	nodes := map[string]int{}
	for _, l := range strings.Split(read("numa_maps"), "\n") {
		if f := strings.Fields(l); len(f) == 0 || !addrs[f[0]] {
			continue
		}
		for _, f := range regexp.MustCompile(`\b(N\d+)=(\d+)`).FindAllStringSubmatch(l, -1) {
			n, _ := strconv.Atoi(f[2])
			nodes[f[1]] += n
		}
	}
	return nodes
}
