package qemutests

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// TestDrift: what was changed at run time, which a restart from the
// command line would not have, is refused before anything is touched — a
// hot-plugged disk (named), and an external snapshot (the overlay named:
// a restart would open the base image under a guest that wrote to the
// overlay) — and a guest whose hot-plugged disk is gone again is safe.
func TestDrift(t *testing.T) {
	dir := t.TempDir()
	base, second, overlay := filepath.Join(dir, "base.img"), filepath.Join(dir, "second.img"), filepath.Join(dir, "overlay.qcow2")
	for _, img := range []string{base, second} {
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "raw", img, "16M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img: %v %s", err, out)
		}
	}
	g := bootAll(t, guestSpec{name: "drift", extra: []string{
		"-drive", "file=" + base + ",if=none,id=drive0,format=raw", "-device", "virtio-blk-pci,drive=drive0,id=disk0",
		// A SCSI disk unplugs at once, without the guest's say.
		"-device", "virtio-scsi-pci,id=scsi0"}})[0]
	pid := g.pid()
	last, _ := g.lastBeat()
	state := t.TempDir()
	plan := func(wantCode int, want ...string) {
		t.Helper()
		code, out, _ := runLU(t, "plan", "--state-dir", state, "drift")
		if code != wantCode {
			t.Errorf("plan: exit %d, want %d:\n%s", code, wantCode, out)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("plan's output does not say %q:\n%s", w, out)
			}
		}
	}
	plan(0)

	// A second disk, hot-plugged the way libvirt does it.
	g.qmpExecute("blockdev-add", map[string]any{"driver": "raw", "node-name": "disk1",
		"file": map[string]any{"driver": "file", "filename": second}}, nil)
	g.qmpExecute("device_add", map[string]any{"driver": "scsi-hd", "drive": "disk1", "id": "scsi-disk1", "bus": "scsi0.0"}, nil)
	plan(exitRefusedCode, "disk scsi-disk1 (node disk1, "+second+") was hot-plugged at run time")

	// Unplugged again: nothing differs.
	g.qmpExecute("device_del", map[string]any{"id": "scsi-disk1"}, nil)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := qmpTry(g, "blockdev-del", map[string]any{"node-name": "disk1"})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("blockdev-del disk1: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	plan(0)

	// An external snapshot: the guest writes to the overlay from now on.
	g.qmpExecute("blockdev-snapshot-sync", map[string]any{"device": "drive0", "snapshot-file": overlay, "format": "qcow2"}, nil)
	plan(exitRefusedCode, "disk disk0's active image is now "+overlay+" (an external snapshot over "+base+"), but the command line opens "+base)

	if g.pid() != pid || !alive(pid) {
		t.Fatalf("guest QEMU changed: pid %d → %d", pid, g.pid())
	}
	g.checkContinues(last)
}

// qmpTry runs one QMP command and returns its error.
func qmpTry(g *guest, cmd string, args any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, g.qmp)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Execute(ctx, cmd, args, nil)
}
