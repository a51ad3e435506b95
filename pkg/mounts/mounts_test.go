package mounts

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestMountOptions(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mounts")
	os.WriteFile(p, []byte("proc /proc proc rw 0 0\n/dev/pmem0 /mnt/pmem ext4 rw,relatime,dax=always 0 0\n/dev/x /a\\040b ext4 ro 0 0\n"), 0o644)
	tests := []struct {
		dir, want string
		dax       bool
	}{{"/mnt/pmem", "rw,relatime,dax=always", true}, {"/proc", "rw", false}, {"/a b", "ro", false}}
	for _, tt := range tests {
		got, err := MountOptions(p, tt.dir)
		if err != nil || got != tt.want || HasDAX(got) != tt.dax {
			t.Errorf("MountOptions(%q) = %q, %v", tt.dir, got, err)
		}
	}
	if _, err := MountOptions(p, "/nope"); err == nil {
		t.Error("missing mount point not reported")
	}
}

// TestProbe formats an image file and checks it is recognised, and that a
// zeroed image counts as empty while one with random bytes does not.
func TestProbe(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	os.WriteFile(img, make([]byte, 8<<20), 0o644)
	if fs, empty, err := probeFS(img); err != nil || fs != "" || !empty {
		t.Fatalf("zero image: %q %v %v", fs, empty, err)
	}
	junk := filepath.Join(dir, "junk")
	b := make([]byte, 8<<20)
	b[4096] = 1
	os.WriteFile(junk, b, 0o644)
	if fs, empty, _ := probeFS(junk); fs != "" || empty {
		t.Fatalf("junk image: %q empty=%v", fs, empty)
	}
	if err := MountPMEM(junk, filepath.Join(dir, "m"), true, nil); err == nil {
		t.Fatal("MountPMEM would format a non-empty device")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 not installed")
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-L", "hostroot", img).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if fs, _, err := probeFS(img); err != nil || fs != "ext4" {
		t.Fatalf("ext4 image: %q %v", fs, err)
	}
	if l, err := ext4Label(img); err != nil || l != "hostroot" {
		t.Fatalf("label %q %v", l, err)
	}
}
