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
		{"libvirt holds the monitor of the new QEMU the run confirmed", observed{qemus: 1, found: true, answers: false, libvirtRuns: true}, libvirtHasIt},
		{"a new QEMU waits for a state there is no file of (a cpr-transfer cut off)", observed{qemus: 1, found: true, answers: true, status: "inmigrate"}, reportTorn},
		{"a new QEMU waits for its state file", observed{qemus: 1, found: true, answers: true, status: "inmigrate", stateFile: true}, restartNew},
		{"libvirt holds the monitor, not confirmed by the run", observed{qemus: 1, found: true, answers: false, stateFile: true}, reportHung},
		{"the old QEMU runs the guest (never stopped, or resumed)", observed{qemus: 1, found: true, answers: true, status: "running", isOld: true, stateFile: true, wasRunning: true}, markRunning},
		{"a new QEMU runs the guest", observed{qemus: 1, found: true, answers: true, status: "running", stateFile: true, wasRunning: true}, markRunning},
		{"the old QEMU lives, paused after its save", observed{qemus: 1, found: true, answers: true, status: "postmigrate", isOld: true, stateFile: true, wasRunning: true}, resumeOld},
		{"the old QEMU lives, paused by the operator before", observed{qemus: 1, found: true, answers: true, status: "paused", isOld: true, wasRunning: true}, resumeOld},
		{"a new QEMU that never got its state", observed{qemus: 1, found: true, answers: true, status: "inmigrate", stateFile: true, wasRunning: true}, restartNew},
		{"a new QEMU loaded, not continued", observed{qemus: 1, found: true, answers: true, status: "paused", stateFile: true, wasRunning: true}, contLoaded},
		{"a new QEMU loaded, consumed, not continued", observed{qemus: 1, found: true, answers: true, status: "paused", consumed: true, wasRunning: true}, contLoaded},
		// A guest paused before the run stays paused.
		{"paused guest: the new QEMU loaded it", observed{qemus: 1, found: true, answers: true, status: "paused", stateFile: true}, markRunning},
		{"paused guest: its old QEMU after the save", observed{qemus: 1, found: true, answers: true, status: "postmigrate", isOld: true, stateFile: true}, markRunning},
		{"paused guest: a new QEMU never got its state", observed{qemus: 1, found: true, answers: true, status: "inmigrate", stateFile: true}, restartNew},
		{"no QEMU, the state file is there", observed{stateFile: true}, restoreState},
		{"no QEMU, no state file", observed{}, reportLost},
	}
	for _, c := range cases {
		if got := decide(c.o); got != c.want {
			t.Errorf("%s: decide(%+v) = %d, want %d", c.name, c.o, got, c.want)
		}
	}
}
