//go:build faultinject

package fault

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
)

// Enabled tells whether this binary was built with fault injection.
const Enabled = true

var (
	mu      sync.Mutex
	actions = map[string]func(point, subject string){}
	counts  = map[string]int{}
)

// On registers what an action such as "killqemu" or "fill" does; f is
// given the point and its subject (AtFor's; "" from At).
func On(action string, f func(point, subject string)) {
	mu.Lock()
	actions[action] = f
	mu.Unlock()
}

// At marks a phase boundary and, when LIVEUPDATE_FAULT arms it, fails
// there. "point=action" fires the first time the point is reached,
// "point@n=action" the n-th time, "point:VM=action" ("point:VM@n") the
// first (n-th) time VM reaches it; each fires once per process.
func At(point string) error { return AtFor(point, "") }

// AtFor is At at a boundary one VM reaches (subject: its name), for the
// per-VM phases run in parallel: an action acting on a VM (killnew) acts on
// the one that got there.
func AtFor(point, subject string) error {
	mu.Lock()
	counts[point]++
	n := counts[point]
	counts[point+":"+subject]++
	nOf := counts[point+":"+subject]
	mu.Unlock()
	for _, spec := range strings.Split(os.Getenv("LIVEUPDATE_FAULT"), ",") {
		p, action, ok := strings.Cut(spec, "=")
		if !ok {
			continue
		}
		want := 1
		if name, nth, ok := strings.Cut(p, "@"); ok {
			p = name
			if _, err := fmt.Sscan(nth, &want); err != nil {
				continue
			}
		}
		got := n
		if name, vm, ok := strings.Cut(p, ":"); ok {
			if vm != subject {
				continue
			}
			p, got = name, nOf
		}
		if p != point || got != want {
			continue
		}
		mu.Lock()
		f := actions[action]
		mu.Unlock()
		at := point
		if subject != "" {
			at += " of " + subject
		}
		fmt.Fprintf(os.Stderr, "liveupdate: FAULT INJECTED: %s at %s (#%d)\n", action, at, n)
		switch action {
		case "kill":
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // never returns
		case "fail":
			return &Error{Point: point}
		default:
			if f != nil {
				f(point, subject)
				return nil
			}
			return &Error{Point: point}
		}
	}
	return nil
}
