package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A manifest with host state written by the binary that still had the
// network and cgroup types in packages netsetup and cgroupv2 decodes, and
// encodes again to the same bytes.
func TestHostStateCompatible(t *testing.T) {
	old, err := os.ReadFile("testdata/v1-host.json")
	if err != nil {
		t.Fatal(err)
	}
	m, err := Decode(old)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Cgroups) != 2 || m.Cgroups[1].Limits["memory.max"] != "1073741824" ||
		len(m.Network.Taps) != 1 || m.Network.Taps[0].Queues != 2 || m.Network.Bridges[0].Ports[0] != "eth0" {
		t.Fatalf("decoded %+v %+v", m.Cgroups, m.Network)
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if b = append(b, '\n'); !bytes.Equal(b, old) {
		t.Errorf("re-encoded manifest differs from the old one:\n%s", b)
	}
}

func TestHostStateValidate(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		mutate     func(*Manifest)
	}{
		{"ok", "", func(*Manifest) {}},
		{"unknown limit", "not a limit", func(m *Manifest) { m.Cgroups = []Cgroup{{Path: "/a", Limits: map[string]string{"cgroup.procs": "1"}}} }},
		{"relative cgroup", "clean absolute", func(m *Manifest) { m.Cgroups = []Cgroup{{Path: "a"}} }},
		{"unclean cgroup", "clean absolute", func(m *Manifest) { m.Cgroups = []Cgroup{{Path: "/a/../b"}} }},
		{"long tap", "not an interface name", func(m *Manifest) { m.Network.Taps = []Tap{{Name: "a-very-long-tap-name"}} }},
		{"bridge with slash", "not an interface name", func(m *Manifest) { m.Network.Bridges = []Bridge{{Name: "br/0"}} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := sample()
			tc.mutate(m)
			err := m.Validate()
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestStrings(t *testing.T) {
	tap := Tap{Name: "vnet0", MAC: "fe:54:00:aa:00:02", MTU: 1500, Flags: unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE, Master: "br0", Up: true}
	if got, want := tap.String(), "tap vnet0 mac=fe:54:00:aa:00:02 mtu=1500 flags=tap,no_pi,vnet_hdr,multi_queue master=br0 up=true"; got != want {
		t.Errorf("Tap.String() = %q, want %q", got, want)
	}
	if got := TapFlagsString(0); got != "" {
		t.Errorf("TapFlagsString(0) = %q", got)
	}
	cg := Cgroup{Path: "/machine.slice", Controllers: []string{"cpu", "memory"}, Limits: map[string]string{"memory.max": "1G", "cpu.max": "50000 100000"}}
	if got, want := cg.String(), `cgroup /machine.slice subtree_control="cpu memory" cpu.max="50000 100000" memory.max="1G"`; got != want {
		t.Errorf("Cgroup.String() = %q, want %q", got, want)
	}
}

// WriteWith's hook runs before the rename: its error leaves the old
// manifest in place, and no temp file behind.
func TestWriteWithBeforeRename(t *testing.T) {
	for _, durable := range []bool{true, false} {
		dir := t.TempDir()
		p := filepath.Join(dir, FileName)
		m := sample()
		if err := Write(p, m); err != nil {
			t.Fatal(err)
		}
		calls := 0
		m.VMs[0].Status = StatusRunning
		stop := errors.New("injected")
		err := WriteWith(p, m, WriteOptions{Durable: durable, BeforeRename: func() error {
			calls++
			entries, _ := os.ReadDir(dir)
			if len(entries) != 2 {
				t.Errorf("durable=%v: the hook ran with %d files in the directory, want the manifest and its temp file", durable, len(entries))
			}
			return stop
		}})
		if !errors.Is(err, stop) || calls != 1 {
			t.Fatalf("durable=%v: err = %v after %d calls, want the hook's error after 1", durable, err, calls)
		}
		got, err := Read(p)
		if err != nil || got.VMs[0].Status != StatusSaved {
			t.Fatalf("durable=%v: old manifest not kept whole: %+v, %v", durable, got, err)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 1 {
			t.Fatalf("durable=%v: temp files left behind: %v", durable, entries)
		}
		if err := WriteWith(p, m, WriteOptions{Durable: durable, BeforeRename: func() error { return nil }}); err != nil {
			t.Fatal(err)
		}
		if got, err := Read(p); err != nil || got.VMs[0].Status != StatusRunning {
			t.Fatalf("durable=%v: write with a passing hook: %+v, %v", durable, got, err)
		}
	}
}

// The manifest is data: it must not pull in the packages that act on the
// host (netlink, DHCP, cgroup files) or fault injection.
func TestNoBehaviourDeps(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go is not on PATH")
	}
	out, err := exec.Command(goBin, "list", "-deps", "github.com/liveupdate/liveupdate/pkg/manifest").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{
			"github.com/liveupdate/liveupdate/pkg/netsetup",
			"github.com/liveupdate/liveupdate/pkg/cgroupv2",
			"github.com/liveupdate/liveupdate/pkg/fault",
			"github.com/liveupdate/liveupdate/pkg/hoststate",
			"github.com/vishvananda/netlink",
			"github.com/insomniacslk/dhcp",
		} {
			if dep == banned || strings.HasPrefix(dep, banned+"/") {
				t.Errorf("pkg/manifest depends on %s", dep)
			}
		}
	}
}
