package qemutests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// TestRestartOne restarts one guest onto another QEMU binary and checks the
// guest went on where it stopped, with its RAM never copied.
func TestRestartOne(t *testing.T) {
	// Its disk: a raw image on an iothread, as hand-written command lines
	// attach one; checkContinues checks every acknowledged write on it.
	g := bootAll(t, guestSpec{name: "one", disk: &diskSpec{format: "raw", frontend: "drive+device", iothread: true, cache: "writeback", aio: "threads"}})[0]
	ram := g.ramFile[0]
	var before unix.Stat_t
	if err := unix.Stat(ram, &before); err != nil {
		t.Fatal(err)
	}
	// "Another" QEMU binary: a copy, so the test can see which one runs.
	newQEMU := filepath.Join(t.TempDir(), "qemu-system-x86_64-new")
	if out, err := exec.Command("cp", qemuBinary, newQEMU).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	oldPID := g.pid()
	// The guest's own migration set-up (libvirt turns migration events
	// on) must survive the restart: cpr-reboot's is for the restart only.
	g.qmpExecute("migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}}, nil)
	const ownSetup = "mode=normal x-ignore-shared=false events=true"
	last, _ := g.lastBeat()
	state := t.TempDir()

	code, out, _ := runLU(t, "restart-qemu", "--json", "--state-dir", state, "--qemu", newQEMU, "one")
	if code != 0 {
		t.Fatalf("restart-qemu exit %d", code)
	}
	r := parseResult(t, out)
	if len(r.VMs) != 1 || r.VMs[0].Status != "running" {
		t.Fatalf("result: %+v", r)
	}
	vm := r.VMs[0]
	if vm.BlackoutMS <= 0 {
		t.Errorf("blackout not measured: %v", vm.BlackoutMS)
	}
	if alive(oldPID) {
		t.Errorf("old QEMU %d still runs", oldPID)
	}
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", vm.NewPID)); exe != newQEMU {
		t.Errorf("new QEMU runs %q, want %q", exe, newQEMU)
	}
	g.checkContinues(last)
	if got := g.migrationSetup(); got != ownSetup {
		t.Errorf("the new QEMU's migration set-up is %q, want the guest's own %q", got, ownSetup)
	}

	// RAM stayed in place: same file, same size; the state file holds
	// device state only.
	var after unix.Stat_t
	if err := unix.Stat(ram, &after); err != nil {
		t.Fatal(err)
	}
	if after.Ino != before.Ino || after.Size != before.Size || after.Size != 256<<20 {
		t.Errorf("RAM file changed: inode %d→%d size %d→%d", before.Ino, after.Ino, before.Size, after.Size)
	}
	st, err := os.Stat(filepath.Join(state, "one.state.done"))
	if err != nil {
		t.Fatalf("state file not kept as .done: %v", err)
	}
	if st.Size() != vm.StateBytes || st.Size() > 4<<20 || st.Size()*50 > after.Size {
		t.Errorf("state file is %d bytes for %d bytes of RAM: RAM was copied?", st.Size(), after.Size)
	}
	t.Logf("blackout %.1f ms, state file %d bytes, guest RAM %d bytes", vm.BlackoutMS, st.Size(), after.Size)

	// status shows the same run: the blackout, the phases, a picture and
	// metrics.
	svg, prom := filepath.Join(state, "run.svg"), filepath.Join(state, "run.prom")
	code, out, _ = runLU(t, "status", "--state-dir", state, "--svg", svg, "--prom", prom)
	if code != 0 || !strings.Contains(out, fmt.Sprintf("one    running  %.1f ms", vm.BlackoutMS)) || !strings.Contains(out, "qemu-start") {
		t.Errorf("status: exit %d, lacks the blackout or the phases:\n%s", code, out)
	}
	if b, _ := os.ReadFile(svg); !bytes.Contains(b, []byte("<svg")) || !bytes.Contains(b, []byte("one blackout")) {
		t.Errorf("status --svg wrote no waterfall with the blackout")
	}
	if b, _ := os.ReadFile(prom); !bytes.Contains(b, []byte(`liveupdate_guest_blackout_seconds{vm="one"}`)) {
		t.Errorf("status --prom wrote no blackout metric:\n%s", b)
	}

	// The manifest pinned the machine alias "pc" to the versioned type.
	m, err := manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		t.Fatal(err)
	}
	if argv := strings.Join(m.VMs[0].RestartArgv, " "); !strings.Contains(argv, "-machine pc-i440fx-") || !strings.HasSuffix(argv, "-incoming defer") {
		t.Errorf("restart argv not rewritten: %s", argv)
	}
	if fi, _ := os.Stat(filepath.Join(state, manifest.FileName)); fi.Mode().Perm() != 0o600 {
		t.Errorf("manifest mode %v", fi.Mode().Perm())
	}
	// The files the old QEMU ran code from, for PID 1 to read ahead: its
	// binary (not --qemu's) and the C library, never its RAM file.
	codeFiles := fmt.Sprint(m.VMs[0].Code)
	exe, _ := exec.LookPath(qemuBinary)
	exe, _ = filepath.EvalSymlinks(exe)
	if exe == "" || !strings.Contains(codeFiles, exe) || !strings.Contains(codeFiles, "/libc.so") || strings.Contains(codeFiles, ram) {
		t.Errorf("manifest's code files %s: want the old QEMU's binary %s and libc, and not the RAM file %s", codeFiles, exe, ram)
	}
	checkEarlyStart(t, m, g)

	// And again, from the restored QEMU, the sequential way: the cycle
	// repeats.
	last, _ = g.lastBeat()
	if code, _, _ := runLU(t, "restart-qemu", "--sequential", "--state-dir", state, "one"); code != 0 {
		t.Fatalf("second restart-qemu exit %d", code)
	}
	g.checkContinues(last)
	m, err = manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		t.Fatal(err)
	}
	if vm := vmOf(t, m, "one"); qemuStarted(m, "one").Before(vm.Stopped) || g.pid() != vm.NewPID {
		t.Errorf("--sequential: the new QEMU started before the old one stopped, or its pidfile is not its own")
	}
}

func vmOf(t *testing.T, m *manifest.Manifest, name string) *manifest.VM {
	t.Helper()
	for i := range m.VMs {
		if m.VMs[i].Name == name {
			return &m.VMs[i]
		}
	}
	t.Fatalf("%s is not in the manifest", name)
	return nil
}

// qemuStarted is when the VM's new QEMU was started (its qemu-start phase).
func qemuStarted(m *manifest.Manifest, vm string) time.Time {
	for _, p := range m.Phases {
		if p.Name == "qemu-start" && p.VM == vm {
			return p.Start
		}
	}
	return time.Time{}
}

// checkEarlyStart checks a restart started the guest's new QEMU before its
// old one stopped, and left it as QEMU itself would be: its pidfile names
// it, its monitor answers at the command line's path, no socket is left
// aside.
func checkEarlyStart(t *testing.T, m *manifest.Manifest, g *guest) {
	t.Helper()
	vm := vmOf(t, m, g.name)
	var ready time.Time
	for _, p := range m.Phases {
		if p.Name == "qemu-init" && p.VM == g.name {
			ready = p.End
		}
	}
	if ready.IsZero() || !ready.Before(vm.Stopped) {
		t.Errorf("%s: the new QEMU's monitor answered at %v, not before the old one stopped (%v)", g.name, ready, vm.Stopped)
	}
	if g.pid() != vm.NewPID {
		t.Errorf("%s: pidfile says %d, the new QEMU is %d", g.name, g.pid(), vm.NewPID)
	}
	c, err := qmp.Dial(context.Background(), g.qmp)
	if err != nil {
		t.Fatalf("%s: the new QEMU's monitor at %s: %v", g.name, g.qmp, err)
	}
	defer c.Close()
	var st struct{ Status string }
	if err := c.Execute(context.Background(), "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Errorf("%s: query-status %q %v", g.name, st.Status, err)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(g.qmp), "*.lu-old")); len(left) > 0 {
		t.Errorf("%s: sockets left aside: %v", g.name, left)
	}
}

// TestRestartThreeShapes restarts three differently shaped guests at once:
// JSON -object syntax, two NUMA nodes on their own backends, and a tap
// netdev passed by fd inside a network namespace.
func TestRestartThreeShapes(t *testing.T) {
	ns := "lu-test-three"
	exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	nsPath := "/run/netns/" + ns
	var tap *os.File
	err := tapdev.InNetNS(nsPath, func() error {
		var err error
		tap, err = tapdev.Open("lutap0", unix.IFF_TAP|unix.IFF_NO_PI|unix.IFF_VNET_HDR)
		if err != nil {
			return err
		}
		return exec.Command("ip", "link", "set", "lutap0", "up").Run()
	})
	if err != nil {
		t.Fatal(err)
	}
	ifindex := func() string {
		out, _ := exec.Command("ip", "-n", ns, "-o", "link", "show", "lutap0").Output()
		f := strings.SplitN(string(out), ":", 2)
		return f[0]
	}
	idx := ifindex()

	gs := bootAll(t,
		// A VNC TCP port with a websocket cannot be handed from one QEMU
		// to the next (display-update moves only the VNC address): this
		// one is restarted the sequential way, the others with an early
		// start. (A plain VNC port goes the fast way: TestLibvirtRestart.)
		guestSpec{name: "json", memory: []string{"-m", "256", "-machine", "q35,memory-backend=ram0",
			"-object", `{"qom-type":"memory-backend-file","id":"ram0","size":268435456,"mem-path":"/dev/shm/lu-test-json.ram","share":true}`},
			extra: []string{"-vnc", "127.0.0.1:57,websocket=5757"}},
		guestSpec{name: "numa", memory: []string{"-m", "256", "-smp", "2", "-machine", "pc",
			"-object", "memory-backend-file,id=m0,size=128M,mem-path=/dev/shm/lu-test-numa0.ram,share=on",
			"-object", "memory-backend-file,id=m1,size=128M,mem-path=/dev/shm/lu-test-numa1.ram,share=on",
			"-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1"}},
		guestSpec{name: "tap", netns: nsPath, files: []*os.File{tap},
			extra: []string{"-netdev", "tap,id=n0,fd=3", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:01"}},
	)
	tap.Close() // QEMU has its own copy; the tap lives as long as QEMU's fd
	var last []beat
	var oldPIDs []int
	for _, g := range gs {
		b, _ := g.lastBeat()
		last = append(last, b)
		oldPIDs = append(oldPIDs, g.pid())
	}
	state := t.TempDir()
	code, out, errOut := runLU(t, "restart-qemu", "--json", "--state-dir", state, "json", "numa", "tap")
	if code != 0 {
		t.Fatalf("restart-qemu exit %d", code)
	}
	if !regexp.MustCompile(`restarting this VM the sequential way.*vm=json.*-vnc 127.0.0.1:57,websocket=5757 listens on a TCP port`).MatchString(errOut) {
		t.Errorf("the VNC guest was not restarted the sequential way, with the reason:\n%s", errOut)
	}
	m, err := manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		t.Fatal(err)
	}
	checkEarlyStart(t, m, gs[1])
	checkEarlyStart(t, m, gs[2])
	if qemuStarted(m, "json").Before(vmOf(t, m, "json").Stopped) {
		t.Errorf("json: started early despite its VNC port")
	}
	r := parseResult(t, out)
	if len(r.VMs) != 3 {
		t.Fatalf("want 3 VMs, got %+v", r)
	}
	for _, vm := range r.VMs {
		if vm.Status != "running" || vm.BlackoutMS <= 0 {
			t.Errorf("%s: status %s blackout %.1f", vm.Name, vm.Status, vm.BlackoutMS)
		}
	}
	for i, g := range gs {
		if alive(oldPIDs[i]) {
			t.Errorf("%s: old QEMU still runs", g.name)
		}
		g.checkContinues(last[i])
	}
	// The tap is the same device (not re-created) and back to non-persistent.
	if got := ifindex(); got != idx || got == "" {
		t.Errorf("tap ifindex %q → %q: device was re-created or lost", idx, got)
	}
	if out, _ := exec.Command("ip", "-n", ns, "-d", "link", "show", "lutap0").Output(); strings.Contains(string(out), "persist on") {
		t.Errorf("tap left persistent: %s", out)
	}

	// A restart that dies after its save leaves the tap persistent (so
	// that it outlives the old QEMU); recover continues the old QEMU and
	// gives the tap back its own persistence.
	before, _ := gs[2].lastBeat()
	state2 := t.TempDir()
	if code, _, _ := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=saved=kill"}, "restart-qemu", "--state-dir", state2, "tap"); code != 128+int(syscall.SIGKILL) {
		t.Fatalf("restart-qemu with saved=kill: exit %d", code)
	}
	if out, _ := exec.Command("ip", "-n", ns, "-d", "link", "show", "lutap0").Output(); !strings.Contains(string(out), "persist on") {
		t.Fatalf("the save did not make the tap persistent: %s", out)
	}
	recoverAll(t, state2)
	gs[2].checkContinues(before)
	if out, _ := exec.Command("ip", "-n", ns, "-d", "link", "show", "lutap0").Output(); strings.Contains(string(out), "persist on") || ifindex() != idx {
		t.Errorf("after recover the tap is persistent or another device: %s", out)
	}
}

// TestRefusePrivateRAM: a guest whose RAM is private is refused by plan and
// restart-qemu, with the backend named, and keeps running untouched.
func TestRefusePrivateRAM(t *testing.T) {
	g := bootAll(t, guestSpec{name: "private", memory: []string{"-m", "256", "-machine", "pc,memory-backend=pram",
		"-object", "memory-backend-file,id=pram,size=256M,mem-path=/dev/shm/lu-test-private.ram"}})[0]
	pid := g.pid()
	last, _ := g.lastBeat()
	state := t.TempDir()
	code, out, _ := runLU(t, "plan", "--state-dir", state, "private")
	if code != 3 || !strings.Contains(out, `memory backend "pram"`) || !strings.Contains(out, "share=off") {
		t.Errorf("plan: exit %d, output does not name the backend:\n%s", code, out)
	}
	code, _, errOut := runLU(t, "restart-qemu", "--state-dir", state, "private")
	if code != 3 || !strings.Contains(errOut, `memory backend "pram"`) || !strings.Contains(errOut, "nothing was changed") {
		t.Errorf("restart-qemu: exit %d, stderr does not refuse naming the backend:\n%s", code, errOut)
	}
	if g.pid() != pid || !alive(pid) {
		t.Fatalf("guest QEMU changed: pid %d → %d", pid, g.pid())
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Errorf("refused run left files: %v", ents)
	}
	g.checkContinues(last)
}

// TestQMPHang: one QEMU whose monitor never answers (the process is
// stopped) → a clear timeout error naming it; the other VM is untouched, and
// with --skip-unsafe it alone is restarted.
func TestQMPHang(t *testing.T) {
	gs := bootAll(t, guestSpec{name: "hung"}, guestSpec{name: "fine"})
	hung, fine := gs[0], gs[1]
	hungPID, finePID := hung.pid(), fine.pid()
	if err := syscall.Kill(hungPID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(hungPID, syscall.SIGCONT) })
	state := t.TempDir()
	start := time.Now()
	code, _, errOut := runLU(t, "restart-qemu", "--qmp-timeout", "2s", "--state-dir", state, "hung", "fine")
	if code != 3 || !strings.Contains(errOut, "hung: QMP") || !strings.Contains(errOut, "no greeting before the deadline") {
		t.Errorf("exit %d; stderr does not report the hung monitor:\n%s", code, errOut)
	}
	if d := time.Since(start); d > 60*time.Second {
		t.Errorf("refusal took %s: the QMP deadline did not apply", d)
	}
	if fine.pid() != finePID || !alive(finePID) {
		t.Fatalf("the fine VM was touched")
	}
	last, _ := fine.lastBeat()
	code, out, errOut := runLU(t, "restart-qemu", "--qmp-timeout", "2s", "--skip-unsafe", "--json", "--state-dir", state, "hung", "fine")
	if code != 1 || !strings.Contains(errOut, "skipped unsafe VMs") {
		t.Errorf("--skip-unsafe: exit %d, stderr:\n%s", code, errOut)
	}
	r := parseResult(t, out)
	if len(r.VMs) != 1 || r.VMs[0].Name != "fine" || r.VMs[0].Status != "running" {
		t.Fatalf("--skip-unsafe result: %+v", r)
	}
	fine.checkContinues(last)
	syscall.Kill(hungPID, syscall.SIGCONT)
	hb, _ := hung.lastBeat()
	hung.checkContinues(hb)
}

// TestRollback: one VM's state file cannot be written (its QEMU sees the
// state directory read-only) → the save fails, every VM resumes on its old
// QEMU, and the tool says so.
func TestRollback(t *testing.T) {
	state := t.TempDir()
	os.Chmod(state, 0o700)
	// QEMU "ro" runs in a mount namespace where the state directory is a
	// read-only bind mount: its migrate to file fails with EROFS.
	wrap := []string{"unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"`, state}
	gs := bootAll(t, guestSpec{name: "ok1"}, guestSpec{name: "ro", wrapper: wrap}, guestSpec{name: "ok2"})
	var pids []int
	var last []beat
	for _, g := range gs {
		pids = append(pids, g.pid())
		b, _ := g.lastBeat()
		last = append(last, b)
	}
	code, out, errOut := runLU(t, "restart-qemu", "--state-dir", state, "ok1", "ro", "ok2")
	if code != 1 || !strings.Contains(errOut, "every VM resumed on its old QEMU") {
		t.Errorf("exit %d; stderr:\n%s", code, errOut)
	}
	if !strings.Contains(out, "resumed") {
		t.Errorf("output does not say the VMs resumed:\n%s", out)
	}
	for i, g := range gs {
		if g.pid() != pids[i] || !alive(pids[i]) {
			t.Errorf("%s: old QEMU %d gone (now %d)", g.name, pids[i], g.pid())
		}
		g.checkContinues(last[i])
	}
	m, err := manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range m.VMs {
		if v.Status != manifest.StatusResumed {
			t.Errorf("%s: manifest status %s, want resumed", v.Name, v.Status)
		}
	}
	if _, err := os.Stat(filepath.Join(state, "ok1.state.aborted")); err != nil {
		t.Errorf("aborted state file not set aside: %v", err)
	}
	// Nothing left behind blocks a later restart of a resumed VM.
	last0, _ := gs[0].lastBeat()
	if code, _, _ := runLU(t, "restart-qemu", "--state-dir", state, "ok1"); code != 0 {
		t.Fatalf("restart after rollback: exit %d", code)
	}
	gs[0].checkContinues(last0)

	// --each: the same failure sends back "ro" alone; ok1 and ok2 run on
	// new QEMUs. (The same state directory: ro's is read-only there.)
	t.Run("Each", func(t *testing.T) {
		for _, g := range gs {
			g.t = t
		}
		var pids []int
		var last []beat
		for _, g := range gs {
			pids = append(pids, g.pid())
			b, _ := g.lastBeat()
			last = append(last, b)
		}
		code, _, errOut := runLU(t, "restart-qemu", "--each", "--state-dir", state, "ok1", "ro", "ok2")
		// The error lines (not the log's INFO lines, which name every guest).
		var said []string
		for _, l := range strings.Split(errOut, "\n") {
			if !strings.HasPrefix(l, "time=") && strings.TrimSpace(l) != "" {
				said = append(said, l)
			}
		}
		errLines := strings.Join(said, "\n")
		if code != 1 || !strings.Contains(errLines, "ro: save failed, resumed on its old QEMU") || strings.Contains(errLines, "ok1") || strings.Contains(errLines, "ok2") {
			t.Errorf("exit %d; stderr does not name ro alone:\n%s", code, errOut)
		}
		m, err := manifest.Read(filepath.Join(state, manifest.FileName))
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]manifest.Status{"ok1": manifest.StatusRunning, "ro": manifest.StatusResumed, "ok2": manifest.StatusRunning}
		for _, v := range m.VMs {
			if v.Status != want[v.Name] {
				t.Errorf("%s: manifest status %s, want %s (%s)", v.Name, v.Status, want[v.Name], v.Error)
			}
		}
		for i, g := range gs {
			if moved := g.pid() != pids[i]; moved != (g.name != "ro") || !alive(g.pid()) {
				t.Errorf("%s: QEMU pid %d before, %d after (alive %v); want a new QEMU for ok1 and ok2 and the old one for ro", g.name, pids[i], g.pid(), alive(g.pid()))
			}
			if g.name != "ro" && alive(pids[i]) {
				t.Errorf("%s: old QEMU %d still runs beside its new one", g.name, pids[i])
			}
			g.checkContinues(last[i])
		}
	})
}

// TestSaveRestoreChrooted: the two halves as separate commands, and the
// restore running QEMU chrooted into a root (as PID 1 runs the host's QEMU
// from the mounted host root): here a recursive bind of / .
func TestSaveRestoreChrooted(t *testing.T) {
	g := bootAll(t, guestSpec{name: "chroot"})[0]
	last, _ := g.lastBeat()
	oldPID := g.pid()
	state := t.TempDir()
	if code, _, _ := runLU(t, "save", "--state-dir", state, "chroot"); code != 0 {
		t.Fatalf("save exit %d", code)
	}
	if alive(oldPID) {
		t.Fatal("old QEMU still runs after save")
	}
	root := t.TempDir()
	if out, err := exec.Command("mount", "--rbind", "/", root).CombinedOutput(); err != nil {
		t.Fatalf("mount --rbind: %v %s", err, out)
	}
	exec.Command("mount", "--make-rprivate", root).Run()
	t.Cleanup(func() { exec.Command("umount", "-R", "-l", root).Run() })

	code, out, _ := runLU(t, "restore", "--json", "--root", root, "--manifest", filepath.Join(state, manifest.FileName))
	if code != 0 {
		t.Fatalf("restore exit %d", code)
	}
	r := parseResult(t, out)
	if len(r.VMs) != 1 || r.VMs[0].Status != "running" || r.VMs[0].NewPID == 0 {
		t.Fatalf("result %+v", r)
	}
	newPID := r.VMs[0].NewPID
	t.Cleanup(func() { syscall.Kill(newPID, syscall.SIGKILL) })
	if got, _ := os.Readlink(fmt.Sprintf("/proc/%d/root", newPID)); got != root {
		t.Errorf("new QEMU's root is %q, want %q", got, root)
	}
	g.checkContinues(last)
	// Running restore again changes nothing: the guest is running.
	code, out, _ = runLU(t, "restore", "--json", "--root", root, "--manifest", filepath.Join(state, manifest.FileName))
	if r2 := parseResult(t, out); code != 0 || r2.VMs[0].NewPID != newPID {
		t.Errorf("second restore: exit %d, %+v", code, r2)
	}
}

// TestEarlyStartFdMonitor: a guest whose QMP monitor is a socket passed by
// fd, as libvirt starts guests. restart-qemu starts its new QEMU early with
// a copy of that socket and restarts it. A restart killed during its early
// start leaves two QEMUs listening on that one socket, either of which may
// answer a connection: recover tells them apart by the answering QEMU's
// vCPU threads, stops the new one (it never got its state) and finds the
// guest running on the old one.
func TestEarlyStartFdMonitor(t *testing.T) {
	g := bootAll(t, guestSpec{name: "fdmon", qmpFD: true})[0]
	last, _ := g.lastBeat()
	state := t.TempDir()
	code, out, _ := runLU(t, "restart-qemu", "--json", "--state-dir", state, "fdmon")
	if code != 0 {
		t.Fatalf("restart-qemu exit %d", code)
	}
	if r := parseResult(t, out); len(r.VMs) != 1 || r.VMs[0].Status != "running" {
		t.Fatalf("result: %+v", r)
	}
	m, err := manifest.Read(filepath.Join(state, manifest.FileName))
	if err != nil {
		t.Fatal(err)
	}
	checkEarlyStart(t, m, g)
	g.checkContinues(last)

	last, _ = g.lastBeat()
	oldPID := g.pid()
	state2 := t.TempDir()
	if code, _, _ := runLUWith(t, "liveupdate-fault", []string{"LIVEUPDATE_FAULT=early-start=kill"}, "restart-qemu", "--state-dir", state2, "fdmon"); code != 128+int(syscall.SIGKILL) {
		t.Fatalf("restart-qemu with early-start=kill: exit %d", code)
	}
	// Both QEMUs accept on the one listening socket: recover tells them
	// apart by the vCPU threads of the one that answers, stops the twin
	// that never got its state and leaves the old one running the guest.
	code, out, errOut := runLU(t, "recover", "--qmp-timeout", "2s", "--state-dir", state2)
	if code != 0 || !regexp.MustCompile(`fdmon +running`).MatchString(out) || !strings.Contains(errOut, "stopping a new QEMU started early") {
		t.Fatalf("recover with two QEMUs on one monitor socket: exit %d\n%s\n%s", code, out, errOut)
	}
	if !alive(oldPID) {
		t.Fatalf("recover killed the old QEMU, which runs the guest")
	}
	if out, _ := exec.Command("pgrep", "-f", "--", "-name fdmon").Output(); len(strings.Fields(string(out))) != 1 {
		t.Errorf("QEMUs of fdmon after recover: %q, want the old one only", out)
	}
	recoverAll(t, state2)
	g.checkContinues(last)
	if g.pid() != oldPID {
		t.Errorf("pidfile names %d, not the old QEMU %d that runs the guest", g.pid(), oldPID)
	}
}

// TestRestartEach: restart-qemu --each takes each guest on its own. With
// --parallel 1 the guests' turns (save → load → cont) follow one another
// and never overlap — no guest waits, stopped, for another's save; with
// --sequential too, each goes save → quit → start → load alone. Every
// guest runs on a new QEMU afterwards, heartbeat continuing.
func TestRestartEach(t *testing.T) {
	gs := bootAll(t, guestSpec{name: "e1"}, guestSpec{name: "e2"}, guestSpec{name: "e3"})
	for _, c := range []struct {
		name string
		args []string
	}{
		{"OneAtATime", []string{"--each", "--parallel", "1"}},
		{"OneAtATimeSequential", []string{"--each", "--parallel", "1", "--sequential"}},
		{"AllAtOnce", []string{"--each", "--parallel", "3"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, g := range gs {
				g.t = t
			}
			var pids []int
			var last []beat
			for _, g := range gs {
				pids = append(pids, g.pid())
				b, _ := g.lastBeat()
				last = append(last, b)
			}
			state := t.TempDir()
			args := append(append([]string{"restart-qemu", "--state-dir", state}, c.args...), "e1", "e2", "e3")
			if code, _, _ := runLU(t, args...); code != 0 {
				t.Fatalf("restart-qemu exit %d", code)
			}
			for i, g := range gs {
				g.checkContinues(last[i])
				if g.pid() == pids[i] || alive(pids[i]) {
					t.Errorf("%s: QEMU pid %d before, %d after, old alive %v: want a new QEMU and the old one gone", g.name, pids[i], g.pid(), alive(pids[i]))
				}
			}
			m, err := manifest.Read(filepath.Join(state, manifest.FileName))
			if err != nil {
				t.Fatal(err)
			}
			// Each guest's turn: from its save's start to its restore's end.
			type turn struct{ start, end time.Time }
			turns := map[string]*turn{}
			for _, p := range m.Phases {
				if p.VM == "" {
					continue
				}
				if turns[p.VM] == nil {
					turns[p.VM] = &turn{}
				}
				switch p.Name {
				case "save":
					turns[p.VM].start = p.Start
				case "restore":
					turns[p.VM].end = p.End
				}
			}
			for _, v := range m.VMs {
				if tu := turns[v.Name]; v.Status != manifest.StatusRunning || tu == nil || tu.start.IsZero() || tu.end.IsZero() {
					t.Fatalf("%s: status %s, turn %+v: want running, with its save and restore timed", v.Name, v.Status, tu)
				}
			}
			overlaps := 0
			for a, ta := range turns {
				for b, tb := range turns {
					if a < b && ta.start.Before(tb.end) && tb.start.Before(ta.end) {
						overlaps++
						if slices.Contains(c.args, "1") {
							t.Errorf("%s's turn (%s – %s) overlaps %s's (%s – %s) with --parallel 1", a, ta.start.Format(time.StampMicro), ta.end.Format(time.StampMicro), b, tb.start.Format(time.StampMicro), tb.end.Format(time.StampMicro))
						}
					}
				}
			}
			t.Logf("%s: %d of 3 turn pairs overlapped", c.name, overlaps)
		})
	}
}
