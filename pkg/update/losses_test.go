package update

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

func TestKexecLosses(t *testing.T) {
	shm, err := os.MkdirTemp("/dev/shm", "lu-losses")
	if err != nil {
		t.Skip("no /dev/shm")
	}
	defer os.RemoveAll(shm)
	disk := t.TempDir() // the test's temporary directory: a disk here, unless TMPDIR is tmpfs
	for _, f := range []string{filepath.Join(shm, "vmlinuz"), filepath.Join(shm, "ram"), filepath.Join(disk, "disk.img")} {
		os.WriteFile(f, nil, 0o644)
	}
	c, err := qemuargv.Parse([]string{"qemu", "-kernel", filepath.Join(shm, "vmlinuz"),
		"-object", "memory-backend-file,id=r,size=1M,share=on,mem-path=" + filepath.Join(shm, "ram"),
		"-drive", "file=" + filepath.Join(disk, "disk.img") + ",if=virtio,format=raw"})
	if err != nil {
		t.Fatal(err)
	}
	got := kexecLosses(&discover.Process{Cmdline: c, Cwd: "/"}, "/run/netns/blue", "/")
	want := []string{"-kernel " + filepath.Join(shm, "vmlinuz") + " is in memory", "network namespace /run/netns/blue"}
	diskInMemory := len(got) == 3
	if diskInMemory {
		t.Logf("the test's temporary directory is in memory too: %s", got[1])
		got = append(got[:1], got[2:]...)
	}
	if len(got) != len(want) {
		t.Fatalf("kexecLosses = %q, want %d problems like %q", got, len(want), want)
	}
	for i := range want {
		if !strings.Contains(got[i], want[i]) {
			t.Errorf("problem %d = %q, want it to say %q", i, got[i], want[i])
		}
	}
}
