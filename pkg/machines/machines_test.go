package machines

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/machined"
)

func TestScopeOf(t *testing.T) {
	for _, c := range []struct{ cgroup, want string }{
		{`/machine.slice/machine-qemu\x2d1\x2dvm1.scope/libvirt/emulator`, `/machine.slice/machine-qemu\x2d1\x2dvm1.scope`},
		{`/machine.slice/machine-qemu\x2d1\x2dvm1.scope`, `/machine.slice/machine-qemu\x2d1\x2dvm1.scope`},
		{`/machine.slice/machine-tenants.slice/machine-qemu\x2d2\x2da.scope/libvirt`, `/machine.slice/machine-tenants.slice/machine-qemu\x2d2\x2da.scope`},
		{`/machine/qemu-1-vm1.libvirt-qemu/emulator`, ""}, // libvirt without systemd
		{`/system.slice/ssh.service`, ""},
		{`/machine-qemu\x2d1\x2dvm1.scope`, ""}, // no slice above: not systemd's
		{`/`, ""},
		{`/machine.slice/vm1.scope/emulator`, ""},
	} {
		if got := scopeOf(c.cgroup); got != c.want {
			t.Errorf("scopeOf(%q) = %q, want %q", c.cgroup, got, c.want)
		}
	}
}

func TestMachineName(t *testing.T) {
	for _, c := range []struct{ unit, want string }{
		{`machine-qemu\x2d1\x2dheartbeat.scope`, "qemu-1-heartbeat"},
		{`machine-qemu\x2d12\x2dweb.prod.scope`, "qemu-12-web.prod"},
		{`machine-qemu\x2d3\x2dbad\x2.scope`, `qemu-3-bad\x2`}, // a broken escape stays as it is
	} {
		if got := machineName(c.unit); got != c.want {
			t.Errorf("machineName(%q) = %q, want %q", c.unit, got, c.want)
		}
	}
}

func TestParseUUID(t *testing.T) {
	u, err := parseUUID("3f4c2a9e-5b1d-4e8a-9c7f-6d2e1a0b4c55")
	if err != nil || u[0] != 0x3f || u[15] != 0x55 {
		t.Errorf("parseUUID: %x %v", u, err)
	}
	for _, bad := range []string{"", "3f4c2a9e", "zz4c2a9e-5b1d-4e8a-9c7f-6d2e1a0b4c55"} {
		if _, err := parseUUID(bad); err == nil {
			t.Errorf("parseUUID(%q) accepted", bad)
		}
	}
}

// fakeMachined knows the machines of pids and fails creation on demand.
type fakeMachined struct {
	units   map[int]string
	created []machined.Machine
}

func (f *fakeMachined) Unit(_ context.Context, pid int) (string, error) { return f.units[pid], nil }
func (f *fakeMachined) Create(_ context.Context, m machined.Machine) error {
	f.created = append(f.created, m)
	return nil
}

// TestRegisterLeavesAlone: guests Register must not touch — a machine
// already, in no machine scope, a record whose QEMU is gone — with what it
// says of each, and a libvirt daemon running refuses the run.
func TestRegisterLeavesAlone(t *testing.T) {
	proc, run := t.TempDir(), t.TempDir()
	guest := func(name string, pid int, cgroup string, alive bool) {
		os.WriteFile(filepath.Join(run, name+".xml"), []byte("<domstatus state='running' pid='"+strconv.Itoa(pid)+"'><domain type='qemu' id='1'><name>"+name+
			"</name><uuid>3f4c2a9e-5b1d-4e8a-9c7f-6d2e1a0b4c55</uuid></domain></domstatus>"), 0o644)
		if alive {
			d := filepath.Join(proc, strconv.Itoa(pid))
			os.MkdirAll(d, 0o755)
			os.WriteFile(filepath.Join(d, "cmdline"), []byte("/usr/bin/qemu-system-x86_64\x00-name\x00guest="+name+",debug-threads=on\x00"), 0o644)
			os.WriteFile(filepath.Join(d, "cgroup"), []byte("0::"+cgroup+"\n"), 0o644)
		}
	}
	guest("known", 10, `/machine.slice/machine-qemu\x2d1\x2dknown.scope/libvirt/emulator`, true)
	guest("plain", 11, `/machine/qemu-2-plain.libvirt-qemu/emulator`, true)
	guest("gone", 12, `/machine.slice/machine-qemu\x2d3\x2dgone.scope/libvirt/emulator`, false)
	f := &fakeMachined{units: map[int]string{10: `machine-qemu\x2d1\x2dknown.scope`}}
	res, err := Register(context.Background(), Options{ProcRoot: proc, CgroupRoot: t.TempDir(), RunDir: run, Machined: f})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, r := range res {
		got[r.Guest] = r.Done
	}
	if got["known"] != "already a machine" || got["plain"] != "not in a machine scope" || len(got) != 2 || len(f.created) != 0 {
		t.Errorf("results %v, created %v", got, f.created)
	}

	os.MkdirAll(filepath.Join(proc, "99"), 0o755)
	os.WriteFile(filepath.Join(proc, "99", "comm"), []byte("libvirtd\n"), 0o644)
	os.WriteFile(filepath.Join(proc, "99", "stat"), []byte("99 (libvirtd) S 1"), 0o644)
	if _, err := Register(context.Background(), Options{ProcRoot: proc, CgroupRoot: t.TempDir(), RunDir: run, Machined: f}); err == nil ||
		!strings.Contains(err.Error(), "libvirt's daemon runs") {
		t.Errorf("with libvirtd running: %v", err)
	}
}

// FuzzScopeOf: a process's cgroup path (read from /proc) gives either no
// scope or a machine scope that is a leading part of the path under slices.
func FuzzScopeOf(f *testing.F) {
	f.Add(`/machine.slice/machine-qemu\x2d1\x2dvm1.scope/libvirt/emulator`)
	f.Add(`/machine/qemu-1-vm1.libvirt-qemu`)
	f.Add("")
	f.Fuzz(func(t *testing.T, p string) {
		s := scopeOf(p)
		if s == "" {
			return
		}
		if !strings.HasPrefix("/"+strings.Trim(p, "/")+"/", s+"/") || !strings.HasSuffix(s, ".scope") {
			t.Fatalf("scopeOf(%q) = %q", p, s)
		}
		machineName(filepath.Base(s))
	})
}
