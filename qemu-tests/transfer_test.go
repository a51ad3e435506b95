package qemutests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// TestRestartTransfer: restart-qemu hands a guest started with -machine
// aux-ram-share=on over by QEMU's cpr-transfer — no state file, the device
// state streamed to the new QEMU — and its neighbour without it the
// cpr-reboot way, in one run; with --each too, and with --no-transfer both
// go the cpr-reboot way. Each time: a new QEMU runs each guest, the old one
// is gone, heartbeats go on with the same boot id and an intact RAM
// checksum, every acknowledged disk record is on the image, and the
// transfer's sockets are gone from the state directory.
func TestRestartTransfer(t *testing.T) {
	gs := bootAll(t,
		guestSpec{name: "x1", extra: []string{"-machine", "aux-ram-share=on"},
			disk: &diskSpec{format: "qcow2", frontend: "blockdev", cache: "none", aio: "threads"}},
		guestSpec{name: "r1"})
	for _, c := range []struct {
		name     string
		args     []string
		transfer bool // x1 goes by cpr-transfer
	}{
		{"AllTogether", nil, true},
		{"Each", []string{"--each"}, true},
		{"NoTransfer", []string{"--no-transfer"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, g := range gs {
				g.t = t
			}
			var pids []int
			var last []beat
			for _, g := range gs {
				pids = append(pids, g.pid())
				b, _ := g.lastBeat()
				last = append(last, b)
			}
			state := t.TempDir()
			args := append(append([]string{"restart-qemu", "--state-dir", state}, c.args...), "x1", "r1")
			if code, _, _ := runLU(t, args...); code != 0 {
				t.Fatalf("restart-qemu exit %d", code)
			}
			for i, g := range gs {
				g.checkContinues(last[i])
				if g.pid() == pids[i] || alive(pids[i]) {
					t.Errorf("%s: QEMU pid %d before, %d after, old alive %v: want a new QEMU and the old one gone", g.name, pids[i], g.pid(), alive(pids[i]))
				}
			}
			m, err := manifest.Read(filepath.Join(state, manifest.FileName))
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range m.VMs {
				if v.Status != manifest.StatusRunning || v.Blackout() <= 0 {
					t.Errorf("%s: status %s, blackout %v: want running, its blackout measured", v.Name, v.Status, v.Blackout())
				}
				wantTransfer := c.transfer && v.Name == "x1"
				if (v.Transfer != nil) != wantTransfer {
					t.Errorf("%s: transfer %+v, want cpr-transfer %v", v.Name, v.Transfer, wantTransfer)
				}
				saved, _ := os.ReadFile(filepath.Join(state, v.Name+".state.done"))
				if isNote := strings.HasPrefix(string(saved), "cpr-transfer:"); isNote != wantTransfer || (!wantTransfer && v.StateSize == 0) {
					t.Errorf("%s: its state file (%d bytes, recorded %d) is a transfer's note: %v, want %v", v.Name, len(saved), v.StateSize, isNote, wantTransfer)
				}
				t.Logf("%s: %s, blackout %v", v.Name, map[bool]string{true: "cpr-transfer", false: "cpr-reboot"}[v.Transfer != nil], v.Blackout())
			}
			socks, _ := filepath.Glob(filepath.Join(state, "*.sock"))
			if len(socks) > 0 {
				t.Errorf("sockets left in the state directory: %v", socks)
			}
		})
	}
}
