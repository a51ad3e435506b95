package update

import (
	"compress/gzip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/hostmods"
	"github.com/liveupdate/liveupdate/pkg/mounts"
)

func TestBuildCmdline(t *testing.T) {
	cur := `BOOT_IMAGE=/boot/vmlinuz-6.1 root=UUID=abcd ro console=ttyS0 memmap=512M!1G lu.pmem=/dev/pmem0 lu.format_pmem=1 lu.dhcp=eth0 lu.rootflags="a b"`
	tests := []struct {
		name     string
		base     string
		want     []string // words that must be there
		wantNot  []string
		wantProb string
		keep     bool // KeepControl
	}{
		{name: "from the running kernel", want: []string{"root=UUID=abcd", "memmap=512M!1G", "lu.pmem=/dev/pmem0", "lu.root=UUID=abcd", "lu.dhcp=eth0", `lu.rootflags="a b"`, "lu.manifest=/mnt/pmem/lu/manifest.json"},
			wantNot: []string{"BOOT_IMAGE", "lu.format_pmem"}},
		{name: "append keeps memmap", base: "root=/dev/vda console=ttyS0 memmap=512M!1G quiet", want: []string{"quiet", "lu.root=/dev/vda", "memmap=512M!1G"}, wantNot: []string{"lu.dhcp"}},
		{name: "append drops memmap", base: "root=/dev/vda console=ttyS0", wantProb: "drops memmap=512M!1G"},
		{name: "append changes memmap", base: "root=/dev/vda memmap=1G!1G", wantProb: `changes the PMEM reservation from "memmap=512M!1G" to "memmap=1G!1G"`},
		{name: "lu.control dropped", base: cur + " lu.control=/dev/ttyS1", want: []string{"lu.dhcp=eth0"}, wantNot: []string{"lu.control"}},
		{name: "lu.control in --append dropped too", base: "root=/dev/vda memmap=512M!1G lu.control=/dev/ttyS1", want: []string{"lu.root=/dev/vda"}, wantNot: []string{"lu.control"}},
		{name: "lu.control kept when asked", base: cur + " lu.control=/dev/ttyS1", keep: true, want: []string{"lu.control=/dev/ttyS1", "lu.dhcp=eth0"}},
		{name: "bad lu parameter", base: "memmap=512M!1G lu.bogus=1", wantProb: "would stop PID 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, probs := buildCmdline(cur, tt.base, "/dev/pmem0", "/mnt/pmem", "/mnt/pmem/lu", tt.keep)
			if tt.wantProb != "" {
				if !strings.Contains(strings.Join(probs, "\n"), tt.wantProb) {
					t.Fatalf("problems %q lack %q", probs, tt.wantProb)
				}
				return
			}
			if len(probs) > 0 {
				t.Fatalf("problems: %v", probs)
			}
			checkWords(t, got, tt.want, tt.wantNot)
			if _, err := bootparams.Parse(got); err != nil {
				t.Errorf("PID 1 would refuse %q: %v", got, err)
			}
		})
	}
}

func TestMountOf(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mounts")
	os.WriteFile(p, []byte("/dev/vda / ext4 rw 0 0\n/dev/pmem0 /mnt/pmem ext4 rw,dax=always 0 0\n/dev/pmem0 /newroot/mnt/pmem ext4 rw,dax=always 0 0\n"), 0o644)
	for path, want := range map[string]string{"/mnt/pmem/lu": "/mnt/pmem", "/var/lib": "/", "/mnt/pmemx": "/", "/newroot/mnt/pmem/a": "/newroot/mnt/pmem"} {
		m, err := mounts.Holding(p, path)
		if err != nil || m.Dir != want {
			t.Errorf("Holding(%s) = %+v, %v; want %s", path, m, err, want)
		}
	}
	e := cpr.New("/mnt/pmem/lu", nil)
	e.Root = "/newroot"
	if g := e.Root.QEMU("/newroot/mnt/pmem"); g != "/mnt/pmem" {
		t.Errorf("QEMU's view of /newroot/mnt/pmem = %s", g)
	}
}

// checkWords checks a command line has every word of want and no part of
// wantNot.
func checkWords(t *testing.T, got string, want, wantNot []string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(" "+got+" ", " "+w+" ") {
			t.Errorf("%q lacks %q", got, w)
		}
	}
	for _, w := range wantNot {
		if strings.Contains(got, w) {
			t.Errorf("%q has %q", got, w)
		}
	}
}

// TestBuildCmdlineStateOnRoot: a state directory off PMEM (an all-LUO
// host) puts the manifest's path on the command line and no lu.pmem.
func TestBuildCmdlineStateOnRoot(t *testing.T) {
	tests := []struct {
		name, cur string
		want      []string
		wantNot   []string
	}{
		{name: "no PMEM at all", cur: "root=LABEL=host console=ttyS0 kho=on liveupdate=on lu.root=LABEL=host",
			want: []string{"lu.manifest=/var/lib/liveupdate/manifest.json", "lu.root=LABEL=host", "kho=on"}, wantNot: []string{"lu.pmem"}},
		{name: "lu.pmem of the running kernel dropped", cur: "root=/dev/vda memmap=512M!1G lu.pmem=/dev/pmem0 lu.format_pmem=1",
			want: []string{"lu.manifest=/var/lib/liveupdate/manifest.json", "lu.root=/dev/vda", "memmap=512M!1G"}, wantNot: []string{"lu.pmem", "lu.format_pmem"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, probs := buildCmdline(tt.cur, "", "", "", "/var/lib/liveupdate", false)
			if len(probs) > 0 {
				t.Fatalf("problems: %v", probs)
			}
			checkWords(t, got, tt.want, tt.wantNot)
			p, err := bootparams.Parse(got)
			if err != nil {
				t.Fatalf("PID 1 would refuse %q: %v", got, err)
			}
			if p.Manifest != "/var/lib/liveupdate/manifest.json" || p.PMEM != "" {
				t.Errorf("PID 1 reads manifest %q, PMEM %q", p.Manifest, p.PMEM)
			}
		})
	}
}

// TestStateDirProblems: a state directory off PMEM is refused when a guest
// keeps RAM in a file, or when it is in memory; passes reach's problems on.
func TestStateDirProblems(t *testing.T) {
	root := mounts.Entry{Source: "/dev/vda1", Dir: "/", FSType: "ext4", Opts: "rw,relatime"}
	tests := []struct {
		name    string
		m       mounts.Entry
		fileRAM []string
		reach   []string
		want    []string // substrings, one per problem; none: no problem
	}{
		{name: "all memfd, on the root", m: root},
		{name: "a guest with RAM in a file", m: root, fileRAM: []string{"vm1", "vm3"},
			want: []string{"not on PMEM mounted with dax, and vm1, vm3 keep RAM in files"}},
		{name: "on tmpfs", m: mounts.Entry{Source: "tmpfs", Dir: "/run", FSType: "tmpfs", Opts: "rw"},
			reach: []string{"--state-dir /run/lu is on the filesystem mounted on /run (tmpfs, tmpfs), which the host's /etc/fstab does not list"},
			want:  []string{"state directory: --state-dir /run/lu", "memory, lost at the kexec"}},
		{name: "on a disk PID 1 does not mount", m: mounts.Entry{Source: "/dev/vdb", Dir: "/srv", FSType: "ext4", Opts: "rw"},
			reach: []string{"--state-dir /srv/lu is on the filesystem mounted on /srv (/dev/vdb, ext4), which the host's /etc/fstab does not list"},
			want:  []string{"state directory: --state-dir /srv/lu"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := stateDirProblems("/x/lu", tt.m, tt.fileRAM, tt.reach)
			if len(got) != len(tt.want) {
				t.Fatalf("problems %q, want %d", got, len(tt.want))
			}
			for i, w := range tt.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("problem %q lacks %q", got[i], w)
				}
			}
		})
	}
}

// TestRemountOrder: the state directory's filesystem is left for last
// wherever else it is mounted (bound into the host root); each filesystem
// once; only writable block devices.
func TestRemountOrder(t *testing.T) {
	ms := []mounts.Entry{
		{Source: "/dev/vda1", Dir: "/newroot", Opts: "rw"},
		{Source: "proc", Dir: "/newroot/proc", Opts: "rw"},
		{Source: "/dev/vdb", Dir: "/newroot/srv/images", Opts: "rw"},
		{Source: "/dev/vdc", Dir: "/newroot/mnt/ro", Opts: "ro"},
		{Source: "/dev/pmem0", Dir: "/mnt/pmem", Opts: "rw,dax=always"},
		{Source: "/dev/pmem0", Dir: "/newroot/mnt/pmem", Opts: "rw,dax=always"},
		{Source: "/dev/vda1", Dir: "/newroot/var/lib/bound", Opts: "rw"},
	}
	tests := []struct {
		name, state string
		only        bool
		want        []string
	}{
		{name: "PMEM state: others", state: "/newroot/mnt/pmem", want: []string{"/newroot/var/lib/bound", "/newroot/srv/images"}},
		{name: "PMEM state: last", state: "/newroot/mnt/pmem", only: true, want: []string{"/newroot/mnt/pmem"}},
		{name: "PMEM state by its other mount", state: "/mnt/pmem", only: true, want: []string{"/newroot/mnt/pmem"}},
		{name: "root state: others", state: "/newroot", want: []string{"/newroot/mnt/pmem", "/newroot/srv/images"}},
		{name: "root state: last, by its newest mount", state: "/newroot", only: true, want: []string{"/newroot/var/lib/bound"}},
		{name: "state on no block device", state: "/run", only: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := remountOrder(ms, tt.state, tt.only); !slices.Equal(got, tt.want) {
				t.Errorf("remountOrder = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestInitramfsProblems: the plan refuses an initramfs without a module the
// host needs (its PID 1 could not bring the guests back) and says which and
// how to build one that has it; an initramfs it cannot read is a note.
func TestInitramfsProblems(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "initramfs.img")
	f, _ := os.Create(img)
	zw := gzip.NewWriter(f)
	w := cpio.Newc.Writer(zw)
	w.WriteRecord(cpio.StaticFile("lib/modules/6.12.1/kernel/drivers/nvme/host/nvme.ko", "\x7fELF", 0o644))
	cpio.WriteTrailer(w)
	zw.Close()
	f.Close()
	needs := hostmods.Needs{Disks: []string{"nvme"}, KVM: []string{"kvm_amd"}, Why: map[string]string{"nvme": "/ on /dev/nvme0n1p2", "kvm_amd": "KVM"}}

	probs, notes := initramfsProblems(needs, img, "/boot/initramfs-6.12.1.img")
	if len(probs) != 1 || len(notes) != 0 {
		t.Fatalf("problems %q, notes %q; want one problem, for kvm_amd", probs, notes)
	}
	for _, w := range []string{"/boot/initramfs-6.12.1.img lacks module kvm_amd (KVM)", "initramfs/build.sh KERNEL_VERSION / /boot/initramfs-6.12.1.img"} {
		if !strings.Contains(probs[0], w) {
			t.Errorf("problem %q does not say %q", probs[0], w)
		}
	}
	needs.KVM = nil
	if probs, notes := initramfsProblems(needs, img, "x"); len(probs)+len(notes) != 0 {
		t.Errorf("an initramfs with all it needs: problems %q, notes %q", probs, notes)
	}

	other := filepath.Join(dir, "other.img")
	os.WriteFile(other, []byte("070701 an uncompressed archive"), 0o644)
	probs, notes = initramfsProblems(needs, other, "other.img")
	if len(probs) != 0 || len(notes) != 1 || !strings.Contains(notes[0], "not checked") {
		t.Errorf("unreadable initramfs: problems %q, notes %q; want a note only", probs, notes)
	}
}
