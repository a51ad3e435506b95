package qemuproc

import (
	"strconv"
	"strings"
	"time"
)

// StartedGuest tells whether a QEMU's run trace says it ran the guest: the
// file its -trace enable=runstate_set,file=… writes, one line per run-state
// change, "runstate_set current_run_state 5 (inmigrate) new_state 9
// (running)" (after a "PID@SECONDS.MICROSECONDS:" prefix under -msg
// timestamp=on). QEMU writes and flushes that line before it resumes any
// vCPU or device, so a QEMU that ended without it never ran the guest. A
// line cut short (QEMU died writing it) is no such line: it died before it
// ran the guest.
func StartedGuest(trace string) bool {
	_, ok := startedLine(trace)
	return ok
}

// StartedAt is when the run trace's first entry into running was written
// (its -msg timestamp=on prefix, the host's wall clock, as QMP's event
// times), or false if it has no such line or no time.
func StartedAt(trace string) (time.Time, bool) {
	l, ok := startedLine(trace)
	if !ok {
		return time.Time{}, false
	}
	pre, _, _ := strings.Cut(l, "runstate_set ")
	_, stamp, ok := strings.Cut(strings.TrimSuffix(pre, ":"), "@")
	if !ok {
		return time.Time{}, false
	}
	secs, usecs, ok := strings.Cut(stamp, ".")
	s, err1 := strconv.ParseInt(secs, 10, 64)
	us, err2 := strconv.ParseInt(usecs, 10, 64)
	if !ok || err1 != nil || err2 != nil || s <= 0 || us < 0 || us >= 1e6 || len(usecs) != 6 {
		return time.Time{}, false
	}
	return time.Unix(s, us*1000), true
}

// startedLine is the trace's first line entering running.
func startedLine(trace string) (string, bool) {
	for _, l := range strings.Split(trace, "\n") {
		_, ev, ok := strings.Cut(l, "runstate_set current_run_state ")
		if !ok {
			continue
		}
		if _, to, ok := strings.Cut(ev, " new_state "); ok && strings.HasSuffix(strings.TrimSpace(to), " (running)") {
			return l, true
		}
	}
	return "", false
}
