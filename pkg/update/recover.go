package update

import (
	"context"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/kexec"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/mounts"
)

// Recover brings every guest of an interrupted run back to running: an
// update that died before its kexec has its host changes undone first
// (UndoHost), then the CPR engine's Recover does the guests. A restart's
// manifest, or one from before the kexec's boot, has no host changes to
// undo. held are fds the caller still holds (see cpr.Engine.Restore).
func Recover(ctx context.Context, e *cpr.Engine, m *manifest.Manifest, held map[string]map[int]*os.File) ([]cpr.Recovery, error) {
	if m.Host.BootID == bootID() {
		UndoHost(e, m)
	}
	return e.Recover(ctx, m, held)
}

// UndoHost undoes what an update that died before its kexec did to this
// host: the filesystems it made read-only (and PMEM, where the state
// directory is) are made writable again, and the new kernel it loaded is
// unloaded. Each step is idempotent; a manifest of a QEMU restart (no
// kexec-load phase) changes nothing.
func UndoHost(e *cpr.Engine, m *manifest.Manifest) {
	loaded := false
	for _, p := range m.Phases {
		loaded = loaded || p.Name == "kexec-load"
	}
	if !loaded {
		return // not an update
	}
	dirs := slices.Clone(m.Remounted)
	if pm, err := mounts.Holding("/proc/self/mounts", string(e.Root.Local(hostpath.QEMU(m.StateDir)))); err == nil {
		dirs = append(dirs, pm.Dir)
	}
	for _, d := range dirs {
		var st unix.Statfs_t
		if unix.Statfs(d, &st) != nil || st.Flags&unix.ST_RDONLY == 0 {
			continue
		}
		if err := remountRW([]string{d}); err != nil {
			e.Log.Error("remounting read-write", "mount", d, "err", err)
			continue
		}
		e.Log.Info("remounted read-write (the update had made it read-only)", "mount", d)
	}
	if kexec.Loaded() {
		if err := kexec.Unload(); err != nil {
			e.Log.Warn("unloading the new kernel the update had loaded", "err", err)
		} else {
			e.Log.Info("unloaded the new kernel the update had loaded")
		}
	}
}

func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}
