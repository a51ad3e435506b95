package qemutests

import (
	"fmt"
	"os"
	"sort"
	"testing"
)

// Benchmarks of the QEMU-only live restart. They measure, they assert
// nothing about speed; `make bench` runs them and records the figures.
//
//	go test -run XXX -bench Restart -benchtime 5x ./qemu-tests

func benchRestart(b *testing.B, n int) {
	var specs []guestSpec
	var names []string
	for i := range n {
		name := fmt.Sprintf("bench%d", i)
		specs = append(specs, guestSpec{name: name})
		names = append(names, name)
	}
	gs := bootAll(b, specs...)
	state := b.TempDir()
	var blackouts, stateBytes []float64
	b.ResetTimer()
	for b.Loop() {
		code, out, _ := runLU(b, append([]string{"restart-qemu", "--json", "--state-dir", state}, names...)...)
		if code != 0 {
			b.Fatalf("restart-qemu exit %d", code)
		}
		for _, vm := range parseResult(b, out).VMs {
			blackouts = append(blackouts, vm.BlackoutMS)
			stateBytes = append(stateBytes, float64(vm.StateBytes))
		}
	}
	b.StopTimer()
	for _, g := range gs {
		last, _ := g.lastBeat()
		g.checkContinues(last)
	}
	sort.Float64s(blackouts)
	b.ReportMetric(median(blackouts), "blackout-median-ms")
	b.ReportMetric(blackouts[0], "blackout-min-ms")
	b.ReportMetric(blackouts[len(blackouts)-1], "blackout-max-ms")
	b.ReportMetric(median(stateBytes), "state-bytes")
	b.ReportMetric(256<<20, "ram-bytes")
	fmt.Fprintf(os.Stderr, "restart-qemu %d guest(s): blackouts (ms) %v\n", n, blackouts)
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

func BenchmarkRestart1Guest(b *testing.B)  { benchRestart(b, 1) }
func BenchmarkRestart3Guests(b *testing.B) { benchRestart(b, 3) }
