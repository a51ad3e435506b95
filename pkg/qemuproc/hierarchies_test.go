package qemuproc

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// A hybrid host as this project's test machine is (v1 controllers, v2 at
// unified), and libvirt's placement of a QEMU there.
const hybridMountinfo = `24 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
25 24 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
26 24 0:24 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
27 24 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpuacct,cpu
28 24 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
29 24 0:27 /machine /srv/bind rw - cgroup cgroup rw,cpuset
30 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
`

func TestCgroupMounts(t *testing.T) {
	got := cgroupMounts(hybridMountinfo)
	want := map[string]string{"": "/sys/fs/cgroup/unified", "name=systemd": "/sys/fs/cgroup/systemd",
		"cpu,cpuacct": "/sys/fs/cgroup/cpu,cpuacct", "memory": "/sys/fs/cgroup/memory"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("cgroupMounts = %v, want %v", got, want)
	}
}

func TestJoinHierarchies(t *testing.T) {
	root := t.TempDir()
	lines := Hierarchies("12:cpu,cpuacct:/machine/qemu-1-vm.libvirt-qemu/emulator\n4:memory:/machine/qemu-1-vm.libvirt-qemu\n" +
		"3:cpuset:/machine/x\n1:name=systemd:/\n0::/machine/qemu-1-vm.libvirt-qemu/emulator\n")
	if len(lines) != 5 {
		t.Fatalf("Hierarchies: %q", lines)
	}
	for _, d := range []string{"sys/fs/cgroup/cpu,cpuacct/machine/qemu-1-vm.libvirt-qemu/emulator", "sys/fs/cgroup/memory/machine/qemu-1-vm.libvirt-qemu",
		"sys/fs/cgroup/unified/machine/qemu-1-vm.libvirt-qemu/emulator", "sys/fs/cgroup/systemd"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	// cpuset is not mounted (only a bind of a sub-cgroup): skipped.
	if err := JoinHierarchies(4242, lines, hybridMountinfo, root); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"sys/fs/cgroup/cpu,cpuacct/machine/qemu-1-vm.libvirt-qemu/emulator", "sys/fs/cgroup/memory/machine/qemu-1-vm.libvirt-qemu",
		"sys/fs/cgroup/unified/machine/qemu-1-vm.libvirt-qemu/emulator", "sys/fs/cgroup/systemd"} {
		if b, err := os.ReadFile(filepath.Join(root, d, "cgroup.procs")); err != nil || string(b) != "4242" {
			t.Errorf("%s/cgroup.procs: %q %v", d, b, err)
		}
	}
	// A cgroup gone: the error names it.
	os.RemoveAll(filepath.Join(root, "sys/fs/cgroup/memory/machine"))
	if err := JoinHierarchies(4242, lines, hybridMountinfo, root); err == nil {
		t.Errorf("joining a missing cgroup succeeded")
	}
}

func FuzzCgroupMounts(f *testing.F) {
	f.Add(hybridMountinfo, "4:memory:/a\n0::/b")
	f.Fuzz(func(t *testing.T, mi, cg string) {
		for k, v := range cgroupMounts(mi) {
			if v == "" && k != "" {
				t.Fatalf("hierarchy %q with no mount point", k)
			}
		}
		for _, l := range Hierarchies(cg) {
			if len(l) == 0 {
				t.Fatal("empty hierarchy line")
			}
		}
	})
}
