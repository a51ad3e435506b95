package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/runlock"
)

func TestUsageAndHelp(t *testing.T) {
	if code := runCLI(nil); code != exitUsage {
		t.Errorf("no command: exit %d, want %d", code, exitUsage)
	}
	if code := runCLI([]string{"frobnicate"}); code != exitUsage {
		t.Errorf("unknown command: exit %d, want %d", code, exitUsage)
	}
	for _, c := range commands {
		if code := runCLI([]string{c.name, "-h"}); code != exitOK {
			t.Errorf("%s -h: exit %d, want 0", c.name, code)
		}
		if code := runCLI([]string{c.name, "--no-such-flag"}); code != exitUsage {
			t.Errorf("%s with a bad flag: exit %d, want %d", c.name, code, exitUsage)
		}
	}
	for _, args := range [][]string{{"restart-qemu", "--each", "--parallel", "0"}, {"restart-qemu", "--parallel", "-2"},
		{"exec-memfd", "--mib", "0", "--", "true"}, {"exec-memfd", "--mib", "1G", "--", "true"},
		{"exec-memfd", "--", "true"}, {"exec-memfd", "--mib", "16"}} {
		if code := runCLI(args); code != exitUsage {
			t.Errorf("%v: exit %d, want %d", args, code, exitUsage)
		}
	}
}

func TestCheckKernel(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "config")
	os.WriteFile(bad, []byte("CONFIG_KEXEC_FILE=y\n# CONFIG_FS_DAX is not set\n"), 0o644)
	var out bytes.Buffer
	if code := cmdCheckKernel(context.Background(), []string{bad}, &out); code != exitFailed {
		t.Errorf("exit %d, want %d", code, exitFailed)
	}
	if !strings.Contains(out.String(), "CONFIG_FS_DAX: is not set, needs to be built in (=y)") {
		t.Errorf("output does not name FS_DAX:\n%s", out.String())
	}
	if code := cmdCheckKernel(context.Background(), []string{filepath.Join(dir, "missing")}, &out); code != exitFailed {
		t.Errorf("missing file: exit %d", code)
	}
}

func TestRestoreBadManifest(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "manifest.json"), []byte(`{"schema":1,`), 0o600)
	var out bytes.Buffer
	if code := cmdRestore(context.Background(), []string{"--state-dir", dir}, &out); code != exitFailed {
		t.Errorf("exit %d, want %d", code, exitFailed)
	}
}

// A second updater is refused before it touches anything, and told who
// holds the lock.
func TestLockBusy(t *testing.T) {
	dir := t.TempDir()
	lock := filepath.Join(dir, "lock")
	l, err := runlock.Acquire(lock, "update --kernel k")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	for _, cmd := range []func(context.Context, []string, io.Writer) int{cmdSave, cmdRestore, cmdRestartQEMU, cmdUpdate} {
		var out bytes.Buffer
		if code := cmd(context.Background(), []string{"--lock", lock, "--state-dir", dir}, &out); code != exitRefused {
			t.Errorf("exit %d with the lock held, want %d", code, exitRefused)
		}
	}
}

// TestManifestPath: --state-dir is QEMU's path; from PID 1's shell
// (--root) the manifest is read inside the host root.
func TestManifestPath(t *testing.T) {
	for _, tt := range []struct{ root, stateDir, want string }{
		{"", "/var/lib/liveupdate", "/var/lib/liveupdate/manifest.json"},
		{"/newroot", "/var/lib/liveupdate", "/newroot/var/lib/liveupdate/manifest.json"},
		{"/newroot", "/mnt/pmem/liveupdate", "/newroot/mnt/pmem/liveupdate/manifest.json"},
	} {
		c := commonFlags{root: tt.root, stateDir: tt.stateDir}
		if got := c.manifestPath(); got != tt.want {
			t.Errorf("root %q state dir %q: manifest %s, want %s", tt.root, tt.stateDir, got, tt.want)
		}
	}
}
