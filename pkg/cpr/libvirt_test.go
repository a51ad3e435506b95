package cpr

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// TestRewriteLibvirt: the record of a libvirt guest is rewritten for its
// new QEMU on this boot (the file on /run), and put back from the copy in
// the manifest after a kexec (/run new and empty), with its pid file; a
// second rewrite for the same QEMU changes nothing; with a daemon running
// nothing is written.
func TestRewriteLibvirt(t *testing.T) {
	rec, err := os.ReadFile("../../qemu-tests/testdata/libvirt/status.xml")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		onRun  bool // the status file is still on /run (a restart)
		daemon bool
	}{
		{"restart", true, false},
		{"after a kexec", false, false},
		{"daemon runs", true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			proc := t.TempDir()
			if c.daemon {
				os.MkdirAll(filepath.Join(proc, "77"), 0o755)
				os.WriteFile(filepath.Join(proc, "77/comm"), []byte("libvirtd\n"), 0o644)
				os.WriteFile(filepath.Join(proc, "77/stat"), []byte("77 (libvirtd) S 1"), 0o644)
			}
			status := filepath.Join(root, "run/libvirt/qemu/lu-lv-facts.xml")
			if c.onRun {
				os.MkdirAll(filepath.Dir(status), 0o700)
				os.WriteFile(status, rec, 0o600)
			}
			e := New(hostpath.QEMU("/state"), slog.New(slog.DiscardHandler))
			e.Root, e.ProcRoot = hostpath.Root(root), proc
			r := e.runOn(&manifest.Manifest{})
			vm := &manifest.VM{Name: "lu-lv-facts", Libvirt: &manifest.Libvirt{Status: "/run/libvirt/qemu/lu-lv-facts.xml", Record: string(rec)}}
			err := r.rewriteLibvirt(vm, 4321, map[int]int{0: 4330})
			if c.daemon {
				if err == nil || !strings.Contains(err.Error(), "libvirtd (pid 77)") {
					t.Fatalf("with libvirtd running: %v", err)
				}
				if b, _ := os.ReadFile(status); string(b) != string(rec) {
					t.Errorf("the record changed while libvirtd runs")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(status)
			s, err := libvirt.ParseStatus(b)
			if err != nil || s.PID != 4321 || s.Vcpus[0] != 4330 || s.MountNS {
				t.Errorf("record after the rewrite: %+v %v", s, err)
			}
			if p, _ := os.ReadFile(libvirt.PidFile(status)); string(p) != "4321" {
				t.Errorf("pid file %q", p)
			}
			if err := r.rewriteLibvirt(vm, 4321, map[int]int{0: 4330}); err != nil {
				t.Errorf("a second rewrite: %v", err)
			}
			if b2, _ := os.ReadFile(status); string(b2) != string(b) {
				t.Errorf("a second rewrite changed the record")
			}
		})
	}
}

// A libvirt guest whose restore failed is kept from libvirt's autostart
// (which would boot it over its kept RAM) and the error says so; a guest
// libvirt does not manage is left alone.
func TestHoldLibvirtAutostart(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, libvirt.AutostartDir)
	os.MkdirAll(dir, 0o755)
	os.Symlink("/etc/libvirt/qemu/g.xml", filepath.Join(dir, "g.xml"))
	r := (&Engine{Root: hostpath.Root(root), Log: slog.New(slog.DiscardHandler)}).newRun()
	cause := errors.New("starting QEMU: boom")
	err := r.holdLibvirtAutostart(&manifest.VM{Name: "g", Libvirt: &manifest.Libvirt{Status: "/run/libvirt/qemu/g.xml"}}, cause)
	if !errors.Is(err, cause) || !strings.Contains(err.Error(), "autostart of the guest is held") {
		t.Fatalf("error %v", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "g.xml")); err == nil {
		t.Fatalf("the autostart link was not held")
	}
	if err := r.holdLibvirtAutostart(&manifest.VM{Name: "plain"}, cause); err != cause {
		t.Fatalf("a guest without libvirt: %v", err)
	}
}
