package qemutests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// P1 (issue 15): restart-qemu of one guest against the manual CPR procedure
// an operator would script over QMP on its twin, turn by turn in the same
// run: on the old QEMU migrate-set-capabilities x-ignore-shared,
// migrate-set-parameters mode=cpr-reboot, migrate file:, wait until it
// completed, quit; then the same command line again with -incoming defer,
// the same capability and mode, migrate-incoming file:, wait, cont. The
// blackout of both is the new QEMU's RESUME − the old QEMU's STOP.
func BenchmarkRestartManual(b *testing.B) {
	spec := func(name string) guestSpec { return guestSpec{name: name, kargs: []string{"hb.check_ms=60000"}} }
	gs := bootAll(b, spec("bpm-lu"), spec("bpm-hand"))
	ours, hand := gs[0], gs[1]
	state := b.TempDir()
	var lu, byHand []float64
	b.ResetTimer()
	for b.Loop() {
		code, out, _ := runLU(b, "restart-qemu", "--json", "--state-dir", state, ours.name)
		if code != 0 {
			b.Fatalf("restart-qemu exit %d", code)
		}
		for _, vm := range parseResult(b, out).VMs {
			lu = append(lu, vm.BlackoutMS)
		}
		byHand = append(byHand, cprRebootByHand(b, hand, b.TempDir()))
	}
	b.StopTimer()
	for _, g := range gs {
		last, _ := g.lastBeat()
		g.checkContinues(last)
	}
	sort.Float64s(lu)
	sort.Float64s(byHand)
	b.ReportMetric(median(lu), "blackout-median-ms")
	b.ReportMetric(median(byHand), "by-hand-median-ms")
	raw := func(v []float64) string { return strings.Trim(strings.Join(strings.Fields(fmt.Sprint(v)), ","), "[]") }
	fmt.Fprintf(os.Stderr, "BENCH id=P1m name=%s guests=1 ram_mib=256 touched_mib=16 copy_ram=false each=false samples=%d median_ms=%.1f min_ms=%.1f max_ms=%.1f hand_median_ms=%.1f hand_min_ms=%.1f hand_max_ms=%.1f state_bytes=0 raw=%s hand_raw=%s\n",
		b.Name(), len(lu), median(lu), lu[0], lu[len(lu)-1], median(byHand), byHand[0], byHand[len(byHand)-1], raw(lu), raw(byHand))
}

// cprRebootByHand restarts g's guest by the manual cpr-reboot procedure
// (BenchmarkRestartManual) and returns its blackout in ms.
func cprRebootByHand(b testing.TB, g *guest, dir string) float64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pid := g.pid()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		b.Fatal(err)
	}
	argv := strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
	stateURI := "file:" + filepath.Join(dir, "vm.state")
	setup := func(c *qmp.Client) {
		if err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}, nil); err != nil {
			b.Fatal(err)
		}
		if err := c.Execute(ctx, "migrate-set-parameters", map[string]any{"mode": "cpr-reboot"}, nil); err != nil {
			b.Fatal(err)
		}
	}
	// As a script would: query-migrate until the migration is over.
	wait := func(c *qmp.Client, what string) {
		for {
			var st struct {
				Status    string `json:"status"`
				ErrorDesc string `json:"error-desc"`
			}
			if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
				b.Fatalf("%s: %v", what, err)
			}
			switch st.Status {
			case "completed":
				return
			case "failed", "cancelled":
				b.Fatalf("%s: %s %s", what, st.Status, st.ErrorDesc)
			}
			time.Sleep(time.Millisecond)
		}
	}
	old, err := qmp.DialPeer(ctx, g.qmp, pid)
	if err != nil {
		b.Fatal(err)
	}
	defer old.Close()
	setup(old)
	mark := len(old.Events())
	if err := old.Execute(ctx, "migrate", map[string]any{"uri": stateURI}, nil); err != nil {
		b.Fatalf("migrate: %v", err)
	}
	wait(old, "saving")
	stop, _, err := old.WaitEvent(ctx, "STOP", mark, nil)
	if err != nil {
		b.Fatalf("no STOP from the old QEMU: %v", err)
	}
	old.Execute(ctx, "quit", nil, nil)
	for syscall.Kill(pid, 0) == nil {
		time.Sleep(time.Millisecond)
	}
	args := slices.DeleteFunc(slices.Clone(argv[1:]), func(a string) bool { return a == "-daemonize" })
	args = append(args, "-incoming", "defer")
	var log bytes.Buffer
	cmd := exec.Command(argv[0], args...)
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go cmd.Wait()
	var nw *qmp.Client
	for nw == nil {
		if nw, err = qmp.DialPeer(ctx, g.qmp, cmd.Process.Pid); err != nil {
			if ctx.Err() != nil {
				b.Fatalf("the new QEMU's monitor: %v; %s", err, log.String())
			}
			nw = nil
			time.Sleep(time.Millisecond)
		}
	}
	defer nw.Close()
	setup(nw)
	if err := nw.Execute(ctx, "migrate-incoming", map[string]any{"uri": stateURI}, nil); err != nil {
		b.Fatalf("migrate-incoming: %v; %s", err, log.String())
	}
	wait(nw, "loading")
	var st struct{ Status string }
	if nw.Execute(ctx, "query-status", nil, &st); st.Status != "running" {
		if err := nw.Execute(ctx, "cont", nil, nil); err != nil {
			b.Fatalf("cont: %v", err)
		}
	}
	resume, _, err := nw.WaitEvent(ctx, "RESUME", 0, nil)
	if err != nil {
		b.Fatalf("no RESUME from the new QEMU: %v; %s", err, log.String())
	}
	return float64(resume.Time.Sub(stop.Time).Microseconds()) / 1000
}
