package pid1

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/phase"
)

// TestReadManifest: PID 1 reads the manifest the kernel command line names,
// a first boot has none, and one whose state directory is outside the PMEM
// mount stops the boot.
func TestReadManifest(t *testing.T) {
	pmem := t.TempDir()
	write := func(t *testing.T, stateDir string) string {
		dir := filepath.Join(pmem, "liveupdate")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		m := &manifest.Manifest{Schema: manifest.SchemaVersion, ID: "t", StateDir: hostpath.QEMU(stateDir), VMs: []manifest.VM{}}
		path := filepath.Join(dir, manifest.FileName)
		if err := manifest.Write(path, m); err != nil {
			t.Fatal(err)
		}
		return path
	}
	cases := []struct {
		name     string
		stateDir string // "" = no manifest
		wantErr  string
		wantRead bool
	}{
		{name: "first boot: no manifest"},
		{name: "manifest on PMEM", stateDir: filepath.Join(pmem, "liveupdate"), wantRead: true},
		{name: "state dir outside PMEM", stateDir: "/var/lib/liveupdate", wantErr: "outside the PMEM mount"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(pmem, "liveupdate", manifest.FileName)
			if c.stateDir != "" {
				path = write(t, c.stateDir)
			}
			b := &Boot{Log: slog.New(slog.DiscardHandler), Params: bootparams.Params{PMEM: "/dev/pmem0", PMEMMount: pmem, Manifest: path}}
			err := b.readManifest(context.Background())
			switch {
			case c.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Errorf("error %v, want %q", err, c.wantErr)
				}
			case err != nil:
				t.Errorf("error %v", err)
			case (b.Manifest != nil) != c.wantRead:
				t.Errorf("manifest read: %v, want %v", b.Manifest != nil, c.wantRead)
			}
		})
	}
}

// TestBootSteps: a failure before the restore is fatal (the boot goes to
// the rescue shell: phase.Run returns a *phase.Error), a failed restore is
// not (the other guests run), and every step is recorded.
func TestBootSteps(t *testing.T) {
	ok := func(context.Context) error { return nil }
	bad := func(context.Context) error { return errors.New("bad") }
	for _, c := range []struct {
		name      string
		mounts    func(context.Context) error
		restore   func(context.Context) error
		wantFatal bool
		wantErr   bool
		wantSteps int
	}{
		{"all well", ok, ok, false, false, 3},
		{"mounts fail: rescue", bad, ok, true, true, 1},
		{"restore fails: go on", ok, bad, false, true, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := &Boot{Log: slog.New(slog.DiscardHandler), Start: time.Now()}
			err := phase.Run(context.Background(), b.record,
				phase.Step{Name: "mounts", Do: c.mounts},
				phase.Step{Name: "restore", Do: c.restore, Optional: true},
				phase.Step{Name: "services", Do: ok, Optional: true})
			var pe *phase.Error
			if errors.As(err, &pe) != c.wantFatal || (err != nil) != c.wantErr {
				t.Errorf("error %v: fatal %v, want %v", err, errors.As(err, &pe), c.wantFatal)
			}
			if len(b.Phases) != c.wantSteps {
				t.Errorf("%d phases recorded, want %d", len(b.Phases), c.wantSteps)
			}
		})
	}
}
