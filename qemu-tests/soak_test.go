package qemutests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// hostCounts is what the host holds that a cycle could leak.
type hostCounts struct {
	QEMUs  int `json:"qemus"`
	QEMUFd int `json:"qemu_fds"`
	Taps   int `json:"taps"`
	Mounts int `json:"mounts"`
	Cgroup int `json:"cgroups"`
	Files  int `json:"state_dir_files"`
}

// countHost counts what the host holds for the guests named names: their
// QEMUs and those QEMUs' fds, the taps of tapPrefix, and — host-wide — the
// mounts, the cgroup v2 tree and the state directory's files. Other suites
// run QEMUs and taps on the same machine at the same time: counting theirs
// would take their coming and going for our leak.
func countHost(stateDir string, names []string, tapPrefix string) hostCounts {
	var c hostCounts
	for _, name := range names {
		for _, pid := range qemusOf(name) {
			c.QEMUs++
			fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
			c.QEMUFd += len(fds)
		}
	}
	taps, _ := filepath.Glob("/sys/class/net/" + tapPrefix + "*/tun_flags")
	c.Taps = len(taps)
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		c.Mounts = strings.Count(string(b), "\n")
	}
	root := "/sys/fs/cgroup"
	if _, err := os.Stat(root + "/unified"); err == nil {
		root += "/unified" // cgroup v1 hybrid: the v2 tree
	}
	filepath.WalkDir(root, func(_ string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			c.Cgroup++
		}
		return nil
	})
	files, _ := os.ReadDir(stateDir)
	c.Files = len(files)
	return c
}

// TestSoakRestart (make soak): K guests — each with a tap QEMU opened by
// name — through M restart-qemu cycles. After every cycle it counts what
// the host holds (its guests' QEMU processes and their fds, its taps, the
// mounts, cgroups, files in the state directory): any growth over the
// cycles is a leak and fails the test. Skipped unless LIVEUPDATE_SOAK_CYCLES is set; the counts go to
// LIVEUPDATE_SOAK_OUT (JSON lines) for docs/reliability.md.
func TestSoakRestart(t *testing.T) {
	m, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_SOAK_CYCLES"))
	if m <= 0 {
		t.Skip("set LIVEUPDATE_SOAK_CYCLES (make soak)")
	}
	k := 3
	if v, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_SOAK_GUESTS")); v > 0 {
		k = v
	}
	var specs []guestSpec
	var names []string
	for i := range k {
		name := fmt.Sprintf("soak%d", i)
		specs = append(specs, guestSpec{name: name, extra: []string{
			"-netdev", fmt.Sprintf("tap,id=n0,ifname=lusoak%d,script=no,downscript=no", i),
			"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:5a:00:" + fmt.Sprintf("%02x", i)}})
		names = append(names, name)
	}
	gs := bootAll(t, specs...)
	state := t.TempDir()
	var out *os.File
	if p := os.Getenv("LIVEUPDATE_SOAK_OUT"); p != "" {
		out, _ = os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		defer out.Close()
	}
	// The first cycle settles what a restart leaves by design (the state
	// files kept as .done, the manifest): leaks are counted after it.
	var base hostCounts
	failures := 0
	for cycle := 1; cycle <= m; cycle++ {
		var before []beat
		for _, g := range gs {
			b, _ := g.lastBeat()
			before = append(before, b)
		}
		code, res, _ := runLU(t, append([]string{"restart-qemu", "--json", "--state-dir", state}, names...)...)
		ok := code == 0
		var blackouts []float64
		if ok {
			for _, vm := range parseResult(t, res).VMs {
				blackouts = append(blackouts, vm.BlackoutMS)
			}
			for i, g := range gs {
				g.checkContinues(before[i])
			}
		} else {
			failures++
		}
		c := countHost(state, names, "lusoak")
		if cycle == 1 {
			base = c
		}
		if out != nil {
			b, _ := json.Marshal(map[string]any{"kind": "restart", "cycle": cycle, "guests": k, "ok": ok, "blackouts_ms": blackouts, "counts": c})
			out.Write(append(b, '\n'))
		}
		if c != base {
			t.Errorf("cycle %d: the host holds %+v, after the first cycle %+v: a leak", cycle, c, base)
		}
	}
	if failures > 0 {
		t.Errorf("%d of %d cycles failed", failures, m)
	}
	t.Logf("%d guests, %d cycles, %d failures; host after each cycle: %+v", k, m, failures, base)
}
