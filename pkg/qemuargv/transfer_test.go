package qemuargv

import (
	"slices"
	"strings"
	"testing"
)

func TestAuxRAMShare(t *testing.T) {
	for _, tc := range []struct {
		argv []string
		want bool
	}{
		{[]string{"qemu", "-machine", "pc,aux-ram-share=on"}, true},
		{[]string{"qemu", "-M", "q35", "-machine", "aux-ram-share=yes"}, true},
		{[]string{"qemu", "-machine", `{"type":"pc","aux-ram-share":"on"}`}, true},
		{[]string{"qemu", "-machine", "pc,aux-ram-share=on", "-machine", "aux-ram-share=off"}, false},
		{[]string{"qemu", "-machine", "pc"}, false},
		{[]string{"qemu"}, false},
	} {
		c, err := Parse(tc.argv)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.AuxRAMShare(); got != tc.want {
			t.Errorf("%q: AuxRAMShare %v, want %v", tc.argv, got, tc.want)
		}
	}
}

func TestWithTransfer(t *testing.T) {
	c, err := Parse([]string{"qemu", "-machine", "pc,aux-ram-share=on", "-m", "256M"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.ForRestart(RestartOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got := r.WithTransfer("/s/vm.main.sock", "/s/vm.cpr.sock", "/s/vm.run.trace")
	want := []string{"qemu", "-machine", "pc,aux-ram-share=on", "-m", "256M",
		"-global", "migration.x-events=on", "-msg", "timestamp=on",
		"-trace", "enable=runstate_set,file=/s/vm.run.trace",
		"-incoming", `{"addr":{"path":"/s/vm.main.sock","transport":"socket","type":"unix"},"channel-type":"main"}`,
		"-incoming", `{"addr":{"path":"/s/vm.cpr.sock","transport":"socket","type":"unix"},"channel-type":"cpr"}`}
	if !slices.Equal(got.Argv(), want) {
		t.Errorf("argv\n got %q\nwant %q", got.Argv(), want)
	}
	// The guest restarted again (its command line read back from the new
	// QEMU, which may have been started -S by its owner): nothing repeated,
	// -S gone, the trace's file that of the new run; the cpr-reboot way
	// drops the trace.
	again, err := Parse(append(got.Argv(), "-S"))
	if err != nil {
		t.Fatal(err)
	}
	r2, err := again.ForRestart(RestartOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// (-msg timestamp=on stays where the first transfer put it.)
	want2 := []string{"qemu", "-machine", "pc,aux-ram-share=on", "-m", "256M", "-msg", "timestamp=on",
		"-global", "migration.x-events=on",
		"-trace", "enable=runstate_set,file=/s/vm2.run.trace",
		want[len(want)-4], want[len(want)-3], want[len(want)-2], want[len(want)-1]}
	if got := r2.WithTransfer("/s/vm.main.sock", "/s/vm.cpr.sock", "/s/vm2.run.trace").Argv(); !slices.Equal(got, want2) {
		t.Errorf("argv restarted again\n got %q\nwant %q", got, want2)
	}
	// A comma in the trace's path is doubled, as QEMU's options want it
	// (a state directory named "a,b" made QEMU refuse the -trace).
	if got := strings.Join(r.WithTransfer("/m", "/c", "/s/a,b/vm.run.trace").Argv(), " "); !strings.Contains(got, "-trace enable=runstate_set,file=/s/a,,b/vm.run.trace ") {
		t.Errorf("a trace path with a comma: %q", got)
	}
	// Its owner's -msg: kept; timestamps turned on after it only if off.
	for _, tc := range []struct {
		msg  string
		adds bool
	}{{"timestamp=on", false}, {"timestamp=off", true}, {"guest-name=on", true}, {"guest-name=on,timestamp=on", false}} {
		c, err := Parse([]string{"qemu", "-machine", "pc,aux-ram-share=on", "-msg", tc.msg})
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Join(c.WithTransfer("/m", "/c", "/t").Argv(), " ")
		if n := strings.Count(got, "-msg "); !strings.Contains(got, "-msg "+tc.msg) || (n == 2) != tc.adds {
			t.Errorf("-msg %s: %q, want it kept and timestamp=on added: %v", tc.msg, got, tc.adds)
		}
	}
	if got := strings.Join(r2.Argv(), " "); strings.Contains(got, "runstate_set") || !strings.Contains(got, " -S ") {
		t.Errorf("the cpr-reboot way after a transfer: %q, want -S and no run trace", got)
	}
}
