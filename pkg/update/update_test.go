package update

import (
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
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
			for _, w := range tt.want {
				if !strings.Contains(" "+got+" ", " "+w+" ") {
					t.Errorf("%q lacks %q", got, w)
				}
			}
			for _, w := range tt.wantNot {
				if strings.Contains(got, w) {
					t.Errorf("%q has %q", got, w)
				}
			}
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
