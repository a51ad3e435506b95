package qemuproc

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStartedGuest(t *testing.T) {
	for _, tc := range []struct {
		name, trace string
		want        bool
	}{
		{"waiting for its state", "runstate_set current_run_state 0 (prelaunch) new_state 5 (inmigrate)\n", false},
		{"loaded, then running", "runstate_set current_run_state 0 (prelaunch) new_state 5 (inmigrate)\nqemu-system-x86_64: warning: something else\nrunstate_set current_run_state 5 (inmigrate) new_state 9 (running)\n", true},
		{"loaded paused (-S, or a paused guest)", "runstate_set current_run_state 5 (inmigrate) new_state 4 (paused)\n", false},
		{"ran, then paused", "runstate_set current_run_state 4 (paused) new_state 9 (running)\nrunstate_set current_run_state 9 (running) new_state 4 (paused)\n", true},
		{"-msg timestamp=on", "4242@1796653914.527826:runstate_set current_run_state 5 (inmigrate) new_state 9 (running)\n", true},
		{"cut short", "runstate_set current_run_state 5 (inmigrate) new_state 9 (runn", false},
		{"running only as the state left", "runstate_set current_run_state 9 (running) new_state 4 (paused)\n", false},
		{"another trace point", "vm_state_notify running 1 reason 9 (running)\n", false},
		{"empty (never written)", "", false},
	} {
		if got := StartedGuest(tc.trace); got != tc.want {
			t.Errorf("%s: StartedGuest(%q) = %v, want %v", tc.name, tc.trace, got, tc.want)
		}
	}
}

func TestStartedAt(t *testing.T) {
	for _, tc := range []struct {
		name, trace string
		want        time.Time // zero: none
	}{
		{"stamped", "4242@1796653914.527826:runstate_set current_run_state 5 (inmigrate) new_state 9 (running)\n", time.Unix(1796653914, 527826000)},
		{"the first entry into running", "7@1796653914.000100:runstate_set current_run_state 1 (inmigrate) new_state 9 (running)\n7@1796653915.000200:runstate_set current_run_state 4 (paused) new_state 9 (running)\n", time.Unix(1796653914, 100000)},
		{"no -msg timestamp=on", "runstate_set current_run_state 5 (inmigrate) new_state 9 (running)\n", time.Time{}},
		{"never ran", "7@1796653914.000100:runstate_set current_run_state 0 (prelaunch) new_state 1 (inmigrate)\n", time.Time{}},
		{"a stamp cut", "7@1796653914.1:runstate_set current_run_state 1 (inmigrate) new_state 9 (running)\n", time.Time{}},
		{"not a stamp", "x@y.z:runstate_set current_run_state 1 (inmigrate) new_state 9 (running)\n", time.Time{}},
	} {
		got, ok := StartedAt(tc.trace)
		if ok != !tc.want.IsZero() || !got.Equal(tc.want) {
			t.Errorf("%s: StartedAt = %v, %v; want %v", tc.name, got, ok, tc.want)
		}
	}
}

// TestStartedGuestQEMU: the trace as this machine's QEMU writes it, before
// and after it runs a guest (cont over its monitor on stdio), stamped with
// -msg timestamp=on by the wall clock.
func TestStartedGuestQEMU(t *testing.T) {
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("no qemu-system-x86_64")
	}
	for _, tc := range []struct {
		cmds string
		want bool
	}{
		{`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n", false},
		{`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"cont"}` + "\n" + `{"execute":"quit"}` + "\n", true},
	} {
		trace := filepath.Join(t.TempDir(), "run.trace")
		cmd := exec.Command(bin, "-accel", "tcg", "-m", "32", "-nodefaults", "-display", "none", "-S",
			"-msg", "timestamp=on", "-trace", "enable=runstate_set,file="+trace, "-qmp", "stdio")
		cmd.Stdin = strings.NewReader(tc.cmds)
		before := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", bin, err, out)
		}
		after := time.Now()
		b, err := os.ReadFile(trace)
		if err != nil {
			t.Fatal(err)
		}
		if got := StartedGuest(string(b)); got != tc.want {
			t.Errorf("after %q: StartedGuest = %v, want %v; the trace:\n%s", tc.cmds, got, tc.want, b)
		}
		at, ok := StartedAt(string(b))
		if ok != tc.want || (ok && (at.Before(before) || at.After(after))) {
			t.Errorf("after %q: StartedAt = %v, %v; want %v, between %v and %v; the trace:\n%s", tc.cmds, at, ok, tc.want, before, after, b)
		}
	}
}

func FuzzStartedGuest(f *testing.F) {
	f.Add("runstate_set current_run_state 5 (inmigrate) new_state 9 (running)\n")
	f.Add("1@2.3:runstate_set current_run_state 9 (running) new_state 4 (paused)")
	f.Fuzz(func(t *testing.T, trace string) {
		started := StartedGuest(trace)
		if started && !strings.Contains(trace, "(running)") {
			t.Fatalf("StartedGuest(%q) without a running state", trace)
		}
		if at, ok := StartedAt(trace); ok && (!started || at.Unix() <= 0) {
			t.Fatalf("StartedAt(%q) = %v without a stamped running state", trace, at)
		}
	})
}
