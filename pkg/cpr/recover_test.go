package cpr

import "testing"

// TestDecide: what recover does for each observed state of a guest, the
// judgement that the fault tests reach only through real QEMU.
func TestDecide(t *testing.T) {
	cases := []struct {
		name string
		o    observed
		want action
	}{
		{"twins on one monitor passed by fd", observed{qemus: 2, found: true, answers: true, status: "running"}, reportTwins},
		{"twins apart: the monitor path is the twin's", observed{qemus: 2, twinsApart: true, found: true, answers: true, status: "running"}, markRunning},
		{"a hung monitor is never touched", observed{qemus: 1, found: true, answers: false, isOld: true, stateFile: true}, reportHung},
		{"the old QEMU runs the guest (never stopped, or resumed)", observed{qemus: 1, found: true, answers: true, status: "running", isOld: true, stateFile: true}, markRunning},
		{"a new QEMU runs the guest", observed{qemus: 1, found: true, answers: true, status: "running", stateFile: true}, markRunning},
		{"the old QEMU lives, paused after its save", observed{qemus: 1, found: true, answers: true, status: "postmigrate", isOld: true, stateFile: true}, resumeOld},
		{"the old QEMU lives, paused by the operator", observed{qemus: 1, found: true, answers: true, status: "paused", isOld: true}, resumeOld},
		{"a new QEMU that never got its state", observed{qemus: 1, found: true, answers: true, status: "inmigrate", stateFile: true}, restartNew},
		{"a new QEMU loaded, not continued", observed{qemus: 1, found: true, answers: true, status: "paused", stateFile: true}, contLoaded},
		{"no QEMU, the state file is there", observed{stateFile: true}, restoreState},
		{"no QEMU, no state file", observed{}, reportLost},
	}
	for _, c := range cases {
		if got := decide(c.o); got != c.want {
			t.Errorf("%s: decide(%+v) = %d, want %d", c.name, c.o, got, c.want)
		}
	}
}
