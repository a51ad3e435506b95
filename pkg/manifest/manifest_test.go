package manifest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

func sample() *Manifest {
	return &Manifest{
		Schema:   SchemaVersion,
		ID:       "run-1",
		Created:  time.Unix(1700000000, 0).UTC(),
		StateDir: "/mnt/pmem/liveupdate",
		VMs: []VM{{
			Name:        "vm1",
			RestartArgv: []string{"qemu-system-x86_64", "-m", "256", "-incoming", "defer"},
			QMP:         "/run/vm1.qmp",
			StateFile:   "/mnt/pmem/liveupdate/vm1.state",
			RAM:         []qemuargv.MemoryBackend{{ID: "ram0", MemPath: "/mnt/pmem/vm1.ram", Share: true}},
			Status:      StatusSaved,
		}},
	}
}

func TestWriteRead(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(string, *Manifest) error
	}{{"Write", Write}, {"WriteUnsynced", WriteUnsynced}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, FileName)
			m := sample()
			m.VMs[0].Migration = &Migration{Mode: "normal", Capabilities: map[string]bool{"events": true, "x-ignore-shared": false}}
			if err := tc.write(p, m); err != nil {
				t.Fatal(err)
			}
			// Written twice: the second replaces the first whole.
			m.VMs[0].Status = StatusRunning
			if err := tc.write(p, m); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o600 {
				t.Errorf("mode = %v, want 0600", st.Mode().Perm())
			}
			got, err := Read(p, "/mnt/pmem")
			if err != nil {
				t.Fatal(err)
			}
			vm := got.VMs[0]
			if vm.Name != "vm1" || vm.RAM[0].MemPath != "/mnt/pmem/vm1.ram" || vm.Status != StatusRunning ||
				vm.Migration == nil || vm.Migration.Mode != "normal" || !vm.Migration.Capabilities["events"] {
				t.Fatalf("read back %+v (migration %+v)", vm, vm.Migration)
			}
			entries, _ := os.ReadDir(dir)
			if len(entries) != 1 {
				t.Fatalf("temp files left behind: %v", entries)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*Manifest)
		roots   []string
		wantErr string
	}{
		{"ok", func(*Manifest) {}, []string{"/mnt/pmem"}, ""},
		{"schema", func(m *Manifest) { m.Schema = 99 }, nil, "schema 99"},
		{"state file escapes", func(m *Manifest) { m.VMs[0].StateFile = "/mnt/pmem/liveupdate/../../etc/passwd" }, nil, "outside the state directory"},
		{"state file prefix trick", func(m *Manifest) { m.VMs[0].StateFile = "/mnt/pmem/liveupdate-evil/x" }, nil, "outside the state directory"},
		{"RAM outside PMEM", func(m *Manifest) { m.VMs[0].RAM[0].MemPath = "/dev/shm/x" }, []string{"/mnt/pmem"}, "outside"},
		{"bad name", func(m *Manifest) { m.VMs[0].Name = "../x" }, nil, "holds '/'"},
		{"name ..", func(m *Manifest) { m.VMs[0].Name = ".." }, nil, "path element"},
		{"name with NUL", func(m *Manifest) { m.VMs[0].Name = "a\x00b" }, nil, "NUL"},
		{"name with newline", func(m *Manifest) { m.VMs[0].Name = "a\nb" }, nil, "control character"},
		{"name too long", func(m *Manifest) { m.VMs[0].Name = strings.Repeat("v", MaxVMNameLen+1) }, nil, "more than 64"},
		{"duplicate", func(m *Manifest) { m.VMs = append(m.VMs, m.VMs[0]) }, nil, "duplicate"},
		{"empty argv", func(m *Manifest) { m.VMs[0].RestartArgv = nil }, nil, "empty restart_argv"},
		{"status", func(m *Manifest) { m.VMs[0].Status = "weird" }, nil, "unknown status"},
		{"relative state dir", func(m *Manifest) { m.StateDir = "x" }, nil, "not an absolute path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := sample()
			tt.mutate(m)
			err := m.Validate(tt.roots...)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestDecodeStrict(t *testing.T) {
	b, _ := json.Marshal(sample())
	bad := strings.Replace(string(b), `"schema":1`, `"schema":1,"surprise":true`, 1)
	if _, err := Decode([]byte(bad)); err == nil || !strings.Contains(err.Error(), "surprise") {
		t.Fatalf("unknown field accepted: %v", err)
	}
	if _, err := Decode([]byte("{")); err == nil {
		t.Fatal("truncated manifest accepted")
	}
	if _, err := Decode(append(b, []byte("{}")...)); err == nil {
		t.Fatal("trailing data accepted")
	}
}

func FuzzDecode(f *testing.F) {
	b, _ := json.Marshal(sample())
	f.Add(b)
	f.Add([]byte(`{"schema":1,"state_dir":"/x","vms":[{"name":"a","restart_argv":["q"],"state_file":"/x/a","qmp":"/q","status":"saved"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b, "/mnt/pmem")
		if err != nil {
			return
		}
		// Whatever decodes must validate, and survive a write/read.
		if err := m.Validate("/mnt/pmem"); err != nil {
			t.Fatalf("decoded manifest does not validate: %v", err)
		}
		for _, v := range m.VMs {
			if !Within(string(v.StateFile), string(m.StateDir)) {
				t.Fatalf("state file %q escapes %q", v.StateFile, m.StateDir)
			}
		}
	})
}

func TestCheckPrivate(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o700)
	p := filepath.Join(dir, FileName)
	if err := CheckPrivate(p); err != nil {
		t.Errorf("missing file: %v", err)
	}
	os.WriteFile(p, []byte("{}"), 0o600)
	if err := CheckPrivate(p); err != nil {
		t.Errorf("private file: %v", err)
	}
	for _, tc := range []struct {
		name  string
		setup func()
		want  string
	}{
		{"world-writable file", func() { os.Chmod(p, 0o606) }, "chmod 0600"},
		{"group-writable dir", func() { os.Chmod(p, 0o600); os.Chmod(dir, 0o770) }, "chmod 0700"},
		{"symlink", func() {
			os.Chmod(dir, 0o700)
			os.Rename(p, p+".real")
			os.Symlink(p+".real", p)
		}, "not a regular file"},
		{"other owner", func() {
			os.Remove(p)
			os.WriteFile(p, []byte("{}"), 0o600)
			os.Chown(p, 4242, 4242)
		}, "owned by uid 4242"},
	} {
		tc.setup()
		if err := CheckPrivate(p); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// A state file that is a symlink out of the PMEM mount is refused; one
// that stays inside is fine.
func TestCheckBeneath(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "secret"), nil, 0o600)
	os.WriteFile(filepath.Join(root, "ram"), nil, 0o600)
	os.Symlink(filepath.Join(outside, "secret"), filepath.Join(root, "vm1.state"))
	os.Symlink("ram", filepath.Join(root, "vm2.state"))
	m := &Manifest{VMs: []VM{{Name: "vm2", StateFile: hostpath.QEMU(filepath.Join(root, "vm2.state"))}}}
	if err := m.CheckBeneath(root, root); err != nil {
		t.Errorf("symlink inside the mount: %v", err)
	}
	m.VMs = append(m.VMs, VM{Name: "vm1", StateFile: hostpath.QEMU(filepath.Join(root, "vm1.state"))})
	if err := m.CheckBeneath(root, root); err == nil || !strings.Contains(err.Error(), "vm1") {
		t.Errorf("symlink out of the mount: err = %v", err)
	}
	// Seen from elsewhere (PID 1 sees the host's /mnt/pmem1 under its
	// root): the files are named as the host names them, resolved where
	// the caller sees them.
	view := "/mnt/pmem1"
	m.VMs = []VM{{Name: "vm1", StateFile: hostpath.QEMU(view + "/vm1.state")}}
	if err := m.CheckBeneath(view, root); err == nil || !strings.Contains(err.Error(), "vm1") {
		t.Errorf("symlink out of the mount seen elsewhere: err = %v", err)
	}
	m.VMs = []VM{{Name: "vm2", StateFile: hostpath.QEMU(view + "/vm2.state")}}
	if err := m.CheckBeneath(view, root); err != nil {
		t.Errorf("symlink inside the mount seen elsewhere: %v", err)
	}
}
