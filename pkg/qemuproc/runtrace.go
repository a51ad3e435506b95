package qemuproc

import "strings"

// StartedGuest tells whether a QEMU's run trace says it ran the guest: the
// file its -trace enable=runstate_set,file=… writes, one line per run-state
// change, "runstate_set current_run_state 5 (inmigrate) new_state 9
// (running)" (after a "PID@SECONDS:" prefix under -msg timestamp=on). QEMU
// writes and flushes that line before it resumes any vCPU or device, so a
// QEMU that ended without it never ran the guest. A line cut short (QEMU
// died writing it) is no such line: it died before it ran the guest.
func StartedGuest(trace string) bool {
	for _, l := range strings.Split(trace, "\n") {
		_, ev, ok := strings.Cut(l, "runstate_set current_run_state ")
		if !ok {
			continue
		}
		if _, to, ok := strings.Cut(ev, " new_state "); ok && strings.HasSuffix(strings.TrimSpace(to), " (running)") {
			return true
		}
	}
	return false
}
