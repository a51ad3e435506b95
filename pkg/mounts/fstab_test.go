package mounts

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A Debian installer's fstab with what operators add after.
const debianFstab = `# /etc/fstab: static file system information.
#
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
UUID=0c2a6a3e-2f0b-4a7e-9d55-0f1d2c3b4a59 /               ext4    errors=remount-ro 0       1
UUID=8f1e6c7a-1111-2222-3333-444455556666 /var/lib/libvirt/images ext4 defaults,noatime 0 2
/dev/disk/by-label/scratch /srv/scratch\040space ext4 nofail,x-systemd.device-timeout=5s 0 2
LABEL=lu-pmem   /mnt/pmem       ext4    dax=always,noauto 0 0
UUID=aaaa-bbbb  none            swap    sw              0       0
/dev/mapper/vg-images /srv/lvm ext4 defaults 0 2
nas:/export     /nfs            nfs4    _netdev         0       0
tmpfs           /tmp            tmpfs   mode=1777
/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto 0 0
PARTUUID=5e1b-02 /boot/efi vfat umask=0077 0 1
LABEL=xfsdata /xfs xfs defaults 0 2
/dev/disk/by-id/virtio-data /byid ext4 defaults 0 2
`

func TestParseFstab(t *testing.T) {
	es, err := ParseFstab(strings.NewReader(debianFstab))
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		dir, why string // why: a substring of NotMounted, "" = mounted
	}{
		{"/", "host root"},
		{"/var/lib/libvirt/images", ""},
		{"/srv/scratch space", ""},
		{"/mnt/pmem", "noauto"},
		{"none", "swap"},
		{"/srv/lvm", "device-mapper"},
		{"/nfs", "network filesystem (nfs4)"},
		{"/tmp", "in memory"},
		{"/media/cdrom0", "noauto"},
		{"/boot/efi", ""},
		{"/xfs", "UUID="},
		{"/byid", "udev link"},
	}
	if len(es) != len(want) {
		t.Fatalf("%d entries, want %d: %+v", len(es), len(want), es)
	}
	for i, w := range want {
		e := es[i]
		if e.Dir != w.dir {
			t.Errorf("entry %d: dir %q, want %q", i, e.Dir, w.dir)
		}
		why := e.NotMounted()
		if (w.why == "") != (why == "") || !strings.Contains(why, w.why) {
			t.Errorf("%s: NotMounted() = %q, want %q", e.Dir, why, w.why)
		}
	}
	if es[1].Line != 5 || es[1].Opts != "defaults,noatime" || es[7].Opts != "mode=1777" {
		t.Errorf("fields: %+v %+v", es[1], es[7])
	}
	if !es[2].Nofail() || es[1].Nofail() {
		t.Errorf("nofail read wrong")
	}
}

func TestParseFstabBad(t *testing.T) {
	_, err := ParseFstab(strings.NewReader("UUID=x /data ext4\n/dev/vdb /only-two\n"))
	if err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("err = %v, want one naming line 2", err)
	}
	es, err := ParseFstab(strings.NewReader("/dev/vdb /data ext4\n"))
	if err != nil || es[0].Opts != "defaults" {
		t.Fatalf("three fields: %+v %v", es, err)
	}
}

func TestMountFlags(t *testing.T) {
	tests := []struct {
		opts  string
		flags uintptr
		data  string
	}{
		{"defaults", 0, ""},
		{"errors=remount-ro", 0, "errors=remount-ro"},
		{"ro,noatime,nofail,x-systemd.device-timeout=5s", unix.MS_RDONLY | unix.MS_NOATIME, ""},
		{"rw,nosuid,nodev,noexec,discard,commit=30", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "discard,commit=30"},
		{"umask=0077,comment=systemd.automount", 0, "umask=0077"},
	}
	for _, tt := range tests {
		f, d := mountFlags(tt.opts)
		if f != tt.flags || d != tt.data {
			t.Errorf("mountFlags(%q) = %#x %q, want %#x %q", tt.opts, f, d, tt.flags, tt.data)
		}
	}
}

func TestDiskByLink(t *testing.T) {
	for in, want := range map[string]string{
		"/dev/disk/by-uuid/1234-ab":      "UUID=1234-ab",
		"/dev/disk/by-label/my\\x20disk": "LABEL=my disk",
		"/dev/disk/by-partuuid/5e1b-02":  "PARTUUID=5e1b-02",
		"/dev/disk/by-partlabel/images":  "PARTLABEL=images",
		"/dev/vdb1":                      "/dev/vdb1",
		"/dev/disk/by-id/virtio-x":       "/dev/disk/by-id/virtio-x",
	} {
		if got := diskByLink(in); got != want {
			t.Errorf("diskByLink(%q) = %q, want %q", in, got, want)
		}
	}
}

// FuzzParseFstab: an fstab is the host's, read by PID 1 and by update's
// plan; whatever it holds must not panic, and what parses keeps its fields.
func FuzzParseFstab(f *testing.F) {
	f.Add(debianFstab)
	f.Add("/dev/vdb /data ext4\n# c\n\n")
	f.Add("a b\n")
	f.Fuzz(func(t *testing.T, s string) {
		es, err := ParseFstab(strings.NewReader(s))
		if err != nil {
			return
		}
		for _, e := range es {
			if e.Spec == "" || e.Dir == "" || e.FSType == "" || e.Opts == "" {
				t.Fatalf("empty field in %+v", e)
			}
			e.NotMounted()
			mountFlags(e.Opts)
		}
	})
}

func TestFstabEntryPMEM(t *testing.T) {
	for _, tt := range []struct {
		spec, fstype string
		want         bool
	}{
		{"/dev/pmem1", "ext4", true},
		{"/dev/pmem0s", "ext4", true}, // a sector-mode namespace is still named so
		{"/dev/pmem1", "xfs", false},  // guest RAM is on ext4 with DAX only
		{"LABEL=pmem", "ext4", false}, // an empty device has no label to find
		{"/dev/vdb", "ext4", false},
	} {
		if got := (FstabEntry{Spec: tt.spec, FSType: tt.fstype}).PMEM(); got != tt.want {
			t.Errorf("%s %s: PMEM() = %v, want %v", tt.spec, tt.fstype, got, tt.want)
		}
	}
}
