package update

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

func TestGuestFiles(t *testing.T) {
	c, err := qemuargv.Parse([]string{"qemu", "-kernel", "/boot/vmlinuz", "-drive", "file=disk.img,if=virtio,format=raw",
		"-object", "memory-backend-file,id=r,size=1M,share=on,mem-path=/mnt/pmem/r"})
	if err != nil {
		t.Fatal(err)
	}
	rt := &preflight.Runtime{BlockNodes: []preflight.BlockNode{
		{NodeName: "#block1", Drv: "qcow2", File: "/var/lib/vm/overlay.qcow2"},
		{NodeName: "#block2", Drv: "file", File: "/var/lib/vm/overlay.qcow2"},
		{NodeName: "#block3", Drv: "file", File: "/data/base.img"}, // a backing file
		{NodeName: "#block4", Drv: "file", File: "disk.img"},       // the -drive's, relative
		{NodeName: "nbd0", Drv: "nbd", File: "nbd://srv/x"},
	}}
	var got []string
	for _, f := range guestFiles(&discover.Process{Cmdline: c, Cwd: "/var/lib/vm"}, rt) {
		got = append(got, f.Option+" "+f.Path)
	}
	want := []string{"-kernel /boot/vmlinuz", "-drive  file /var/lib/vm/disk.img", "block node #block2 /var/lib/vm/overlay.qcow2", "block node #block3 /data/base.img"}
	if !slices.Equal(got, want) {
		t.Errorf("guestFiles = %q, want %q", got, want)
	}
}

func TestUnreachable(t *testing.T) {
	table := "/dev/vda / ext4 rw 0 0\ndevtmpfs /dev devtmpfs rw 0 0\n/dev/pmem0 /mnt/pmem ext4 rw,dax=always 0 0\n" +
		"/dev/vdb /data ext4 rw 0 0\n/dev/mapper/vg-lv /srv xfs rw 0 0\nsrv:/export /nfs nfs4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n" +
		"/dev/md0 /var/lib/images ext4 rw 0 0\n"
	// As PID 1 of a first update sees it: the host root under /newroot.
	nested := "rootfs / rootfs rw 0 0\n/dev/vda /newroot ext4 rw 0 0\n/dev/pmem0 /mnt/pmem ext4 rw,dax=always 0 0\n" +
		"/dev/pmem0 /newroot/mnt/pmem ext4 rw,dax=always 0 0\n/dev/vdb /newroot/data ext4 rw 0 0\n"
	links := map[string]string{"/dev/vg/lv": "/dev/dm-3"}
	// The host's fstab lists /data (PID 1 mounts it), /srv by UUID (an LV:
	// the mounts table shows it), /nfs and /var/lib/images (MD).
	fstab, err := mounts.ParseFstab(strings.NewReader("UUID=1 / ext4 defaults 0 1\nUUID=2 /data ext4 defaults 0 2\n" +
		"UUID=3 /srv xfs defaults 0 2\nsrv:/export /nfs nfs4 _netdev 0 0\n/dev/md0 /var/lib/images ext4 defaults 0 2\n"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, table, root, file string
		nofstab                 bool     // the host has no fstab
		want                    []string // substrings of the one problem; none: reachable
	}{
		{name: "root filesystem", table: table, root: "/", file: "/var/lib/vm/disk.img"},
		{name: "PMEM", table: table, root: "/", file: "/mnt/pmem/vm/disk.img"},
		{name: "another disk in fstab", table: table, root: "/", file: "/data/disk.img"},
		{name: "another disk not in fstab", table: table, root: "/", nofstab: true, file: "/data/disk.img",
			want: []string{"-drive x /data/disk.img is on the filesystem mounted on /data (/dev/vdb, ext4)", "does not list", "Add it to /etc/fstab"}},
		{name: "LVM filesystem", table: table, root: "/", file: "/srv/disk.img", want: []string{"mounted on /srv (/dev/mapper/vg-lv, xfs)", "device-mapper"}},
		{name: "MD filesystem", table: table, root: "/", file: "/var/lib/images/a.qcow2", want: []string{"mounted on /var/lib/images (/dev/md0, ext4)", "device-mapper (LVM) or MD"}},
		{name: "NFS", table: table, root: "/", file: "/nfs/disk.img", want: []string{"mounted on /nfs (srv:/export, nfs4)", "network filesystem"}},
		{name: "tmpfs", table: table, root: "/", file: "/tmp/disk.img", want: []string{"mounted on /tmp (tmpfs, tmpfs)"}},
		{name: "tmpfs reported by kexecLosses", table: table, root: "/", file: "/tmp/skip.img"},
		{name: "host block device", table: table, root: "/", file: "/dev/sdb"},
		{name: "LVM volume", table: table, root: "/", file: "/dev/vg/lv", want: []string{"/dev/vg/lv is a device-mapper or MD device (dm-3)"}},
		{name: "MD device", table: table, root: "/", file: "/dev/md127", want: []string{"device-mapper or MD device (md127)"}},
		{name: "under PID 1: host root", table: nested, root: "/newroot", file: "/var/lib/vm/disk.img"},
		{name: "under PID 1: PMEM", table: nested, root: "/newroot", file: "/mnt/pmem/vm/disk.img"},
		{name: "under PID 1: another disk in fstab", table: nested, root: "/newroot", file: "/data/disk.img"},
		{name: "under PID 1: another disk not in fstab", table: nested, root: "/newroot", nofstab: true, file: "/data/disk.img", want: []string{"mounted on /newroot/data (/dev/vdb, ext4)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mf := filepath.Join(t.TempDir(), "mounts")
			if err := os.WriteFile(mf, []byte(tt.table), 0o644); err != nil {
				t.Fatal(err)
			}
			local := func(p string) string { return filepath.Join(tt.root, p) }
			fs := fstab
			if tt.nofstab {
				fs = nil
			}
			got := unreachable([]qemuargv.FileRef{{Option: "-drive x", Path: tt.file}}, mf, local, local("/"), "/dev/pmem0", fs,
				func(p string) string { return links[p] },
				func(f qemuargv.FileRef) bool { return f.Path == "/tmp/skip.img" })
			switch {
			case len(tt.want) == 0 && len(got) > 0:
				t.Fatalf("refused: %q", got)
			case len(tt.want) > 0 && len(got) != 1:
				t.Fatalf("got %q, want one problem saying %q", got, tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(got[0], w) {
					t.Errorf("%q does not say %q", got[0], w)
				}
			}
		})
	}
}

// TestPMEMFilesystems: guest RAM may be on the state directory's PMEM
// filesystem or on another PMEM one mounted with dax that the fstab lists
// (PID 1 mounts it before the restore); not on one the fstab does not
// list, nor on PMEM without dax, nor on a disk.
func TestPMEMFilesystems(t *testing.T) {
	table := []mounts.Entry{
		{Source: "/dev/vda1", Dir: "/", FSType: "ext4", Opts: "rw"},
		{Source: "/dev/pmem0", Dir: "/mnt/pmem", FSType: "ext4", Opts: "rw,dax=always"},
		{Source: "/dev/pmem1", Dir: "/mnt/pmem1", FSType: "ext4", Opts: "rw,dax=always"},
		{Source: "/dev/pmem2", Dir: "/mnt/pmem2", FSType: "ext4", Opts: "rw,dax=always"}, // not in fstab
		{Source: "/dev/pmem3", Dir: "/mnt/pmem3", FSType: "ext4", Opts: "rw"},            // no dax
		{Source: "/dev/vdb", Dir: "/var/lib/libvirt/images", FSType: "ext4", Opts: "rw"},
	}
	fstab := []mounts.FstabEntry{{Spec: "/dev/pmem1", Dir: "/mnt/pmem1/", FSType: "ext4", Opts: "dax=always"},
		{Spec: "/dev/pmem3", Dir: "/mnt/pmem3", FSType: "ext4"}, {Spec: "LABEL=img", Dir: "/var/lib/libvirt/images", FSType: "ext4"}}
	got := pmemFilesystems(table, fstab, "/mnt/pmem", func(s string) string { return s })
	if strings.Join(got, " ") != "/mnt/pmem /mnt/pmem1" {
		t.Errorf("pmemFilesystems = %v", got)
	}
}
