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
		"-global", "migration.x-events=on",
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
	want[len(want)-5] = "enable=runstate_set,file=/s/vm2.run.trace"
	if got := r2.WithTransfer("/s/vm.main.sock", "/s/vm.cpr.sock", "/s/vm2.run.trace").Argv(); !slices.Equal(got, want) {
		t.Errorf("argv restarted again\n got %q\nwant %q", got, want)
	}
	if got := strings.Join(r2.Argv(), " "); strings.Contains(got, "runstate_set") || !strings.Contains(got, " -S ") {
		t.Errorf("the cpr-reboot way after a transfer: %q, want -S and no run trace", got)
	}
}
