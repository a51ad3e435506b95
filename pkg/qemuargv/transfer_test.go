package qemuargv

import (
	"slices"
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
	got := r.WithTransfer("/s/vm.main.sock", "/s/vm.cpr.sock").Argv()
	want := []string{"qemu", "-machine", "pc,aux-ram-share=on", "-m", "256M", "-S",
		"-global", "migration.x-events=on",
		"-incoming", `{"addr":{"path":"/s/vm.main.sock","transport":"socket","type":"unix"},"channel-type":"main"}`,
		"-incoming", `{"addr":{"path":"/s/vm.cpr.sock","transport":"socket","type":"unix"},"channel-type":"cpr"}`}
	if !slices.Equal(got, want) {
		t.Errorf("argv\n got %q\nwant %q", got, want)
	}
}
