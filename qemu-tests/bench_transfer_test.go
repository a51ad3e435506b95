package qemutests

import (
	"bytes"
	"context"
	"encoding/json"
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

	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// P1t: restart-qemu of a guest started with -machine aux-ram-share=on (it
// goes by cpr-transfer) against QEMU's own cpr-transfer driven by hand over
// QMP on a twin guest, turn by turn in the same run, so that the machine's
// load weighs on both alike. The hand-driven one is what an operator would
// script: new QEMU with main and cpr -incoming channels (no -S: QEMU runs
// the guest when the stream ends), migrate-set-parameters mode=cpr-transfer,
// migrate channels=[main, cpr], the old QEMU killed afterwards.
func BenchmarkRestartTransfer(b *testing.B) {
	spec := func(name string) guestSpec {
		return guestSpec{name: name, extra: []string{"-machine", "aux-ram-share=on"}, kargs: []string{"hb.check_ms=60000"}}
	}
	benchTwins(b, "P1t", spec("bpt-lu"), spec("bpt-hand"), "cpr-transfer", transferByHand)
}

// benchTwins measures restart-qemu on the first of two twin guests against
// a procedure driven by hand over QMP on the second (byHand, which returns
// its blackout in ms), turn by turn in the same run so that the machine's
// load weighs on both alike, and prints the BENCH line (id) with both. A
// restart that goes another way than mode (when set) fails it.
func benchTwins(b *testing.B, id string, ourSpec, handSpec guestSpec, mode string, byHand func(testing.TB, *guest, string) float64) {
	gs := bootAll(b, ourSpec, handSpec)
	ours, hand := gs[0], gs[1]
	state := b.TempDir()
	var lu, byHandMS []float64
	b.ResetTimer()
	for b.Loop() {
		code, out, _ := runLU(b, "restart-qemu", "--json", "--state-dir", state, ours.name)
		if code != 0 {
			b.Fatalf("restart-qemu exit %d", code)
		}
		for _, vm := range parseResult(b, out).VMs {
			if mode != "" && vm.Mode != mode {
				b.Fatalf("%s went the %s way, not by %s", vm.Name, vm.Mode, mode)
			}
			lu = append(lu, vm.BlackoutMS)
		}
		byHandMS = append(byHandMS, byHand(b, hand, b.TempDir()))
	}
	b.StopTimer()
	for _, g := range gs {
		last, _ := g.lastBeat()
		g.checkContinues(last)
	}
	sort.Float64s(lu)
	sort.Float64s(byHandMS)
	b.ReportMetric(median(lu), "blackout-median-ms")
	b.ReportMetric(median(byHandMS), "by-hand-median-ms")
	raw := func(v []float64) string { return strings.Trim(strings.Join(strings.Fields(fmt.Sprint(v)), ","), "[]") }
	fmt.Fprintf(os.Stderr, "BENCH id=%s name=%s guests=1 ram_mib=256 touched_mib=16 copy_ram=false each=false samples=%d median_ms=%.1f min_ms=%.1f max_ms=%.1f hand_median_ms=%.1f hand_min_ms=%.1f hand_max_ms=%.1f state_bytes=0 raw=%s hand_raw=%s\n",
		id, b.Name(), len(lu), median(lu), lu[0], lu[len(lu)-1], median(byHandMS), byHandMS[0], byHandMS[len(byHandMS)-1], raw(lu), raw(byHandMS))
}

// qemuArgv is the command line of QEMU pid, as /proc shows it (read it
// before that QEMU quits).
func qemuArgv(b testing.TB, pid int) []string {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		b.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
}

// startAgain starts a QEMU command line (qemuArgv) again with extra
// options, in the foreground and its own session; its output goes to the
// returned buffer.
func startAgain(b testing.TB, argv []string, extra ...string) (*exec.Cmd, *bytes.Buffer) {
	b.Helper()
	args := slices.DeleteFunc(slices.Clone(argv[1:]), func(a string) bool { return a == "-daemonize" })
	var log bytes.Buffer
	cmd := exec.Command(argv[0], append(args, extra...)...)
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go cmd.Wait()
	return cmd, &log
}

// dialNew reaches the monitor of the QEMU started as cmd at path, as soon
// as it answers.
func dialNew(ctx context.Context, b testing.TB, path string, cmd *exec.Cmd, log *bytes.Buffer) *qmp.Client {
	b.Helper()
	for {
		c, err := qmp.DialPeer(ctx, path, cmd.Process.Pid)
		if err == nil {
			return c
		}
		if ctx.Err() != nil {
			b.Fatalf("the new QEMU's monitor: %v; %s", err, log.String())
		}
		time.Sleep(time.Millisecond)
	}
}

// transferByHand hands g's guest over to a new QEMU by cpr-transfer, driven
// over QMP, and returns its blackout in ms (new QEMU's RESUME − old QEMU's
// STOP). The old QEMU's monitor and pidfile are moved aside first, so that
// the new one makes its own at the same paths (g keeps finding its QEMU).
func transferByHand(b testing.TB, g *guest, dir string) float64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pid := g.pid()
	argv := qemuArgv(b, pid)
	old, err := qmp.DialPeer(ctx, g.qmp, pid)
	if err != nil {
		b.Fatal(err)
	}
	defer old.Close()
	for _, p := range []string{g.qmp, g.pidfile} {
		if err := os.Rename(p, p+".old"); err != nil {
			b.Fatal(err)
		}
	}
	main, cprSock := filepath.Join(dir, "main.sock"), filepath.Join(dir, "cpr.sock")
	ch := func(kind, path string) string {
		j, _ := json.Marshal(qemuargv.TransferChannel(kind, path))
		return string(j)
	}
	cmd, log := startAgain(b, argv, "-incoming", ch("main", main), "-incoming", ch("cpr", cprSock))
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		if ok, _ := qemuproc.UnixListening("/proc", cmd.Process.Pid, cprSock); ok {
			break // listening, not just bound: a migrate in between is refused
		}
		if time.Now().After(deadline) {
			b.Fatalf("the new QEMU never listened on %s: %s", cprSock, log.String())
		}
	}
	mark := len(old.Events())
	if err := old.Execute(ctx, "migrate-set-parameters", map[string]any{"mode": "cpr-transfer"}, nil); err != nil {
		b.Fatal(err)
	}
	chans := []any{qemuargv.TransferChannel("main", main), qemuargv.TransferChannel("cpr", cprSock)}
	if err := old.Execute(ctx, "migrate", map[string]any{"channels": chans}, nil); err != nil {
		b.Fatalf("migrate: %v", err)
	}
	nw := dialNew(ctx, b, g.qmp, cmd, log)
	defer nw.Close()
	resume, _, err := nw.WaitEvent(ctx, "RESUME", 0, nil)
	if err != nil {
		b.Fatalf("no RESUME from the new QEMU: %v; %s", err, log.String())
	}
	stop, _, err := old.WaitEvent(ctx, "STOP", mark, nil)
	if err != nil {
		b.Fatalf("no STOP from the old QEMU: %v", err)
	}
	syscall.Kill(pid, syscall.SIGKILL) // quit would unlink the new QEMU's monitor
	for _, p := range []string{g.qmp, g.pidfile} {
		os.Remove(p + ".old")
	}
	return float64(resume.Time.Sub(stop.Time).Microseconds()) / 1000
}
