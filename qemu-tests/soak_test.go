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

func countHost(stateDir string) hostCounts {
	var c hostCounts
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		exe, err := os.Readlink(p + "/exe")
		if err != nil || !strings.Contains(filepath.Base(exe), "qemu-system") {
			continue
		}
		c.QEMUs++
		fds, _ := os.ReadDir(p + "/fd")
		c.QEMUFd += len(fds)
	}
	taps, _ := filepath.Glob("/sys/class/net/*/tun_flags")
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
// the host holds (QEMU processes, their fds, taps, mounts, cgroups, files
// in the state directory): any growth over the cycles is a leak and fails
// the test. Skipped unless LIVEUPDATE_SOAK_CYCLES is set; the counts go to
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
		c := countHost(state)
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
