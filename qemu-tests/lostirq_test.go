package qemutests

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// TestLostCompletionIRQ reproduces QEMU 10.0.2's lost completion interrupt
// (README, "A QEMU 10.0.2 bug to know of") and proves the harness'
// recogniser on it: one guest whose qcow2 disk is on an iothread, as
// TestFaults' f2, restarted up to LIVEUPDATE_LOSTIRQ_N times until its disk
// writer stalls. A stall must have the bug's picture (lostCompletionIRQ),
// every acknowledged record must be on the image, and the guest must go on
// beating; anything else fails. Skipped unless LIVEUPDATE_LOSTIRQ_N is set
// (about one restart in a hundred to a few hundred hits it: minutes).
func TestLostCompletionIRQ(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("LIVEUPDATE_LOSTIRQ_N"))
	if n <= 0 {
		t.Skip("set LIVEUPDATE_LOSTIRQ_N (restarts to try)")
	}
	g := bootAll(t, guestSpec{name: "irq", disk: &diskSpec{format: "qcow2", frontend: "blockdev", iothread: true, cache: "writeback", aio: "threads"}})[0]
	for i := 1; i <= n; i++ {
		before, _ := g.lastBeat()
		before.ack = g.lastAck()
		if code, _, errOut := runLU(t, "restart-qemu", "--state-dir", t.TempDir(), "irq"); code != 0 {
			t.Fatalf("restart %d: exit %d\n%s", i, code, errOut)
		}
		// A short wait first: most restarts go on at once, and only a
		// stall is worth checkAcksContinue's full minute.
		deadline := time.Now().Add(10 * time.Second)
		for g.lastAck() <= before.ack+2 && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		g.checkContinues(before) // fails on any stall but QEMU's
		if g.lostIRQ != "" {
			t.Logf("restart %d of %d: QEMU lost the completion interrupt of the guest's disk (ACK %d): %s", i, n, g.lastAck(), g.lostIRQ)
			return
		}
	}
	t.Logf("%d restarts, the guest's disk writer went on after each", n)
}
