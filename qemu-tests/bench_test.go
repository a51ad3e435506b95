package qemutests

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/timeline"
)

// Benchmarks of the QEMU-only live restart (issue 5's P1–P4). They
// measure; they assert nothing about speed. `make bench` runs them (with
// the nested update's figures for P5–P7) and rewrites docs/benchmarks.md
// from the BENCH lines they print:
//
//	go test -run '^$' -bench . -benchtime 5x ./qemu-tests

// benchOpts shape one benchmark's guests.
type benchOpts struct {
	id      string // P1…
	guests  int
	ramMiB  int  // guest RAM, a shared file backend on /dev/shm
	touched int  // MiB the guest fills with a pattern and checks (hb.mem_mib)
	copyRAM bool // the naive way: RAM through the state file
	each    bool // restart-qemu --each: every guest on its own
	// disk: each guest writes to a disk of this shape all along (the disk
	// writer, a record and its fdatasync every few ms).
	disk *diskSpec
}

func benchRestart(b *testing.B, o benchOpts) {
	var specs []guestSpec
	var names []string
	for i := range o.guests {
		name := fmt.Sprintf("b%s-%d", strings.ToLower(o.id), i)
		ram := "/dev/shm/lu-test-" + name + ".ram"
		specs = append(specs, guestSpec{name: name,
			memory: []string{"-m", fmt.Sprint(o.ramMiB), "-machine", "pc,memory-backend=ram0",
				"-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=on", o.ramMiB, ram)},
			kargs: []string{fmt.Sprintf("hb.mem_mib=%d", o.touched), "hb.check_ms=60000"}, disk: o.disk})
		names = append(names, name)
		b.Cleanup(func() { os.Remove(ram) })
	}
	gs := bootAll(b, specs...)
	state := b.TempDir()
	args := []string{"restart-qemu", "--json", "--state-dir", state}
	if o.copyRAM {
		args = append(args, "--copy-ram")
	}
	if o.each {
		args = append(args, "--each")
	}
	var blackouts, stateBytes []float64
	b.ResetTimer()
	for b.Loop() {
		code, out, _ := runLU(b, append(args, names...)...)
		if code != 0 {
			b.Fatalf("restart-qemu exit %d", code)
		}
		for _, vm := range parseResult(b, out).VMs {
			blackouts = append(blackouts, vm.BlackoutMS)
			stateBytes = append(stateBytes, float64(vm.StateBytes))
		}
		// Each guest's blackout of this run cut into its parts, for
		// docs/benchmarks.md: every run's, so that the table's max is
		// the tail's and says where the longest blackout went.
		benchSplit(b, state)
	}
	b.StopTimer()
	// Where the last run's time went (the phases of every VM), printed by
	// the benchmark's log.
	if _, out, _ := runLU(b, "status", "--state-dir", state); out != "" {
		b.Logf("status of the last run:\n%s", out)
	}
	for _, g := range gs {
		last, _ := g.lastBeat()
		g.checkContinues(last)
	}
	sort.Float64s(blackouts)
	b.ReportMetric(median(blackouts), "blackout-median-ms")
	b.ReportMetric(blackouts[0], "blackout-min-ms")
	b.ReportMetric(blackouts[len(blackouts)-1], "blackout-max-ms")
	// One line per benchmark for scripts/bench.sh.
	fmt.Fprintf(os.Stderr, "BENCH id=%s name=%s guests=%d ram_mib=%d touched_mib=%d copy_ram=%v each=%v disk=%v samples=%d median_ms=%.1f min_ms=%.1f max_ms=%.1f state_bytes=%.0f raw=%s\n",
		o.id, b.Name(), o.guests, o.ramMiB, o.touched, o.copyRAM, o.each, o.disk != nil, len(blackouts), median(blackouts), blackouts[0], blackouts[len(blackouts)-1],
		median(stateBytes), strings.Trim(strings.Join(strings.Fields(fmt.Sprint(blackouts)), ","), "[]"))
}

// benchSplit prints, for each guest of the run last recorded in state, one
// BENCHSPLIT line: its blackout (old QEMU's STOP → new QEMU's RESUME) cut
// at the run's phase boundaries — the rest of its save after the STOP, the
// wait until its load begins (for the other guests' saves, without
// --each), its load, its cont, and cont's end to the RESUME.
func benchSplit(b *testing.B, state string) {
	_, out, _ := runLU(b, "status", "--state-dir", state, "--json")
	var tl timeline.Timeline
	if err := json.Unmarshal([]byte(out), &tl); err != nil {
		b.Logf("status --json of the last run: %v", err)
		return
	}
	ms := func(a, z time.Time) float64 { return float64(z.Sub(a).Microseconds()) / 1000 }
	for _, g := range tl.Guests {
		sp := map[string]timeline.Span{}
		for _, x := range tl.Spans {
			if x.Row == g.Name {
				sp[x.Name] = x
			}
		}
		save, load, cont := sp["save"], sp["load"], sp["cont"]
		if g.Stopped.IsZero() || save.End.IsZero() || load.End.IsZero() || cont.End.IsZero() {
			continue
		}
		fmt.Fprintf(os.Stderr, "BENCHSPLIT name=%s guest=%s blackout_ms=%.1f save_ms=%.1f wait_ms=%.1f load_ms=%.1f cont_ms=%.1f resume_ms=%.1f\n",
			b.Name(), g.Name, float64(g.Blackout.Microseconds())/1000, ms(g.Stopped, save.End), ms(save.End, load.Start),
			ms(load.Start, load.End), ms(cont.Start, cont.End), ms(cont.End, g.Resumed))
	}
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// P1: one 256 MiB guest.
func BenchmarkRestart1Guest(b *testing.B) {
	benchRestart(b, benchOpts{id: "P1", guests: 1, ramMiB: 256, touched: 16})
}

// P2: sixteen guests at once.
func BenchmarkRestart16Guests(b *testing.B) {
	benchRestart(b, benchOpts{id: "P2", guests: 16, ramMiB: 256, touched: 16})
}

// P2 with --each: each guest saved, loaded and continued on its own, as
// many at once as there are CPUs.
func BenchmarkRestart16GuestsEach(b *testing.B) {
	benchRestart(b, benchOpts{id: "P2e", guests: 16, ramMiB: 256, touched: 16, each: true})
}

// P8 (issue 15): 2 and 8 guests restarted together, each writing to a
// disk all along, against the same count without disks. The disk is qcow2
// as libvirt attaches it (-blockdev, cache=writeback, aio=threads), not on
// an iothread (README: QEMU 10.0.2 can lose a completion interrupt there).
func BenchmarkRestartDisks(b *testing.B) {
	disk := &diskSpec{format: "qcow2", frontend: "blockdev", cache: "writeback", aio: "threads"}
	for _, n := range []int{2, 8} {
		for _, d := range []*diskSpec{nil, disk} {
			name := fmt.Sprintf("%dGuests", n)
			if d != nil {
				name += "Disk"
			}
			b.Run(name, func(b *testing.B) {
				benchRestart(b, benchOpts{id: "P8", guests: n, ramMiB: 256, touched: 16, disk: d})
			})
		}
	}
	// The 8 disk guests once more, each on its own (--each): what taking
	// fewer loads and conts at once gives back.
	b.Run("8GuestsDiskEach", func(b *testing.B) {
		benchRestart(b, benchOpts{id: "P8e", guests: 8, ramMiB: 256, touched: 16, disk: disk, each: true})
	})
}

// P3: the blackout against guest RAM size (the RAM is not copied, so it
// should not grow). The three guests run side by side and are restarted
// one at a time in turn, so that whatever else the machine does weighs on
// each size alike; p3Rounds samples of each size per run. Each fills and
// checks up to 512 MiB of its RAM.
const p3Rounds = 6

func BenchmarkRestartRAM(b *testing.B) {
	sizes := []int{256, 4096, 8192}
	var specs []guestSpec
	for _, mib := range sizes {
		name := fmt.Sprintf("bp3-%d", mib)
		ram := "/dev/shm/lu-test-" + name + ".ram"
		specs = append(specs, guestSpec{name: name,
			memory: []string{"-m", fmt.Sprint(mib), "-machine", "pc,memory-backend=ram0",
				"-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=on", mib, ram)},
			kargs: []string{fmt.Sprintf("hb.mem_mib=%d", min(mib/2, 512)), "hb.check_ms=60000"}})
		b.Cleanup(func() { os.Remove(ram) })
	}
	gs := bootAll(b, specs...)
	blackouts := make([][]float64, len(sizes))
	state := b.TempDir()
	b.ResetTimer()
	// p3Rounds rounds a run, each size once a round, the order rotated
	// from round to round: single blackouts of ≈ 25 ms spread over 15–45 ms
	// here, so a median of ten moves by more than the 10 % being judged
	// (≈ 2.5 ms); sixty per size bring its error well below that. And no
	// size may always go first.
	round := 0
	for b.Loop() {
		for range p3Rounds {
			for k := range gs {
				i := (k + round) % len(gs)
				code, out, _ := runLU(b, "restart-qemu", "--json", "--state-dir", state, gs[i].name)
				if code != 0 {
					b.Fatalf("restart-qemu %s exit %d", gs[i].name, code)
				}
				for _, vm := range parseResult(b, out).VMs {
					blackouts[i] = append(blackouts[i], vm.BlackoutMS)
				}
			}
			round++
		}
	}
	b.StopTimer()
	for i, g := range gs {
		last, _ := g.lastBeat()
		g.checkContinues(last)
		v := append([]float64(nil), blackouts[i]...)
		sort.Float64s(v)
		fmt.Fprintf(os.Stderr, "BENCH id=P3 name=BenchmarkRestartRAM/%dMiB guests=1 ram_mib=%d touched_mib=%d copy_ram=false samples=%d median_ms=%.1f min_ms=%.1f max_ms=%.1f state_bytes=0 raw=%s\n",
			sizes[i], sizes[i], min(sizes[i]/2, 512), len(v), median(v), v[0], v[len(v)-1], strings.Trim(strings.Join(strings.Fields(fmt.Sprint(v)), ","), "[]"))
	}
}

// P4: the naive way at 4 GiB — the same restart with guest RAM copied
// through the state file — against ours, the guest having written 1 GiB.
func BenchmarkRestart4GiB(b *testing.B) {
	for _, naive := range []bool{false, true} {
		name := "shared"
		if naive {
			name = "copied"
		}
		b.Run(name, func(b *testing.B) {
			benchRestart(b, benchOpts{id: "P4", guests: 1, ramMiB: 4096, touched: 1024, copyRAM: naive})
		})
	}
}

// P9 (issue 15): a guest libvirt manages, with VNC on a TCP port, restarted
// the fast way (the twin takes the VNC port after the old QEMU) while
// libvirt's daemon is stopped; libvirt is started again at the end and must
// manage the guest on its last QEMU.
func BenchmarkRestartLibvirtVNC(b *testing.B) {
	lv := startLibvirt(b)
	const name = "lu-bench-p9"
	g, _ := lv.startDomain(b, domSpec{name: name})
	first := g.waitBeat(3, 120*time.Second)
	lv.stopLibvirtd()
	state := b.TempDir()
	var blackouts []float64
	b.ResetTimer()
	for b.Loop() {
		code, out, errOut := runLU(b, "restart-qemu", "--json", "--state-dir", state, name)
		if code != 0 || strings.Contains(errOut, "sequential way") {
			b.Fatalf("restart-qemu exit %d (the fast path is what is measured):\n%s", code, errOut)
		}
		for _, vm := range parseResult(b, out).VMs {
			blackouts = append(blackouts, vm.BlackoutMS)
		}
	}
	b.StopTimer()
	g.checkContinues(first)
	lv.startLibvirtd()
	if st := strings.TrimSpace(virsh(b, "domstate", name)); st != "running" {
		b.Fatalf("libvirt says %q after the restarts", st)
	}
	sort.Float64s(blackouts)
	b.ReportMetric(median(blackouts), "blackout-median-ms")
	fmt.Fprintf(os.Stderr, "BENCH id=P9 name=%s guests=1 ram_mib=256 touched_mib=16 copy_ram=false samples=%d median_ms=%.1f min_ms=%.1f max_ms=%.1f state_bytes=0 raw=%s\n",
		b.Name(), len(blackouts), median(blackouts), blackouts[0], blackouts[len(blackouts)-1],
		strings.Trim(strings.Join(strings.Fields(fmt.Sprint(blackouts)), ","), "[]"))
}
