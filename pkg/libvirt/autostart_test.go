package libvirt

import (
	"os"
	"path/filepath"
	"testing"
)

func TestHoldAutostart(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, AutostartDir)
	os.MkdirAll(dir, 0o755)
	if err := os.Symlink("/etc/libvirt/qemu/g.xml", filepath.Join(dir, "g.xml")); err != nil {
		t.Fatal(err)
	}
	if held, err := HoldAutostart(root, "g"); !held || err != nil {
		t.Fatalf("HoldAutostart = %v, %v", held, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "g.xml")); err == nil {
		t.Fatalf("the autostart link is still where libvirt looks")
	}
	if held, err := HoldAutostart(root, "other"); held || err != nil {
		t.Fatalf("a domain without autostart: %v, %v", held, err)
	}
	if back, err := ReleaseAutostart(root, "g"); !back || err != nil {
		t.Fatalf("ReleaseAutostart = %v, %v", back, err)
	}
	if target, err := os.Readlink(filepath.Join(dir, "g.xml")); err != nil || target != "/etc/libvirt/qemu/g.xml" {
		t.Fatalf("the link after release: %q %v", target, err)
	}
	if back, err := ReleaseAutostart(root, "g"); back || err != nil {
		t.Fatalf("a second release: %v, %v", back, err)
	}
}
