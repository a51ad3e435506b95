package cpr

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// A state file's life: QEMU writes it (vm.state), a new QEMU loads it, and
// then it is renamed, never deleted, so an operator can look at it and no
// run can load it again:
//
//	.done     loaded: a new QEMU ran the guest from it
//	.aborted  not loaded: the guest continued on the QEMU that wrote it

const (
	doneSuffix    = ".done"
	abortedSuffix = ".aborted"
)

// consume marks a loaded state file as used before any QEMU runs the guest
// from it, so that no later run (recover) loads it again or continues the
// old QEMU. Inside the blackout the mark is a marker file in MarkDir, on
// tmpfs (/run), named after the state file's inode: every later run on
// this boot sees it at once, and making it waits for no filesystem journal.
// After cont, settleConsumed renames the state file to .done, makes that
// durable and removes the marker. Only a crash of the whole host loses the
// marker before that — and no guest on this kernel survives one. Why not
// the rename at once: on ext4 (the default /var/lib/liveupdate) a rename
// waits for the journal, and with other guests' saves, fsyncs and disk
// writes in flight it took up to 95 ms of a blackout (docs/benchmarks.md,
// P2e and P8). Without MarkDir, or when the marker cannot be made, the
// rename is the mark, as before.
func (r *run) consume(vm *manifest.VM) error {
	sf := r.local(vm.StateFile)
	if m := r.marker(sf); m != "" {
		err := os.MkdirAll(filepath.Dir(m), 0o700)
		if err == nil {
			err = os.WriteFile(m, []byte(sf+"\n"), 0o600)
		}
		if err == nil {
			return nil
		}
		r.Log.Warn("marking the state consumed on tmpfs; renaming it instead", "vm", vm.Name, "err", err)
	}
	return os.Rename(sf, sf+doneSuffix)
}

// marker is the path of the consumed marker of state file sf ("" if there
// is no MarkDir or sf is not there): its device, inode and change time, so
// that a marker never matches another file that reuses the inode.
func (r *run) marker(sf string) string {
	if r.MarkDir == "" {
		return ""
	}
	var st unix.Stat_t
	if err := unix.Stat(sf, &st); err != nil {
		return ""
	}
	return filepath.Join(r.MarkDir, fmt.Sprintf("%d-%d-%d.%d.consumed", st.Dev, st.Ino, st.Ctim.Sec, st.Ctim.Nsec))
}

// unconsume takes consume's mark back, for a cont that never reached the
// new QEMU (qmp.ErrNotDelivered): that QEMU, stopped before this is called,
// never ran the guest, so the state file is as good as before its load —
// the guest can go on on its old QEMU or be restored from it again.
func (r *run) unconsume(vm *manifest.VM) error {
	sf := r.local(vm.StateFile)
	if m := r.marker(sf); m != "" && fileExists(m) {
		if err := os.Remove(m); err != nil {
			return fmt.Errorf("taking back the consumed mark of %s: %w", sf, err)
		}
		return nil
	}
	if err := os.Rename(sf+doneSuffix, sf); err != nil {
		return fmt.Errorf("taking back the consumed mark of %s: %w", sf, err)
	}
	return nil
}

// settleConsumed makes consume's mark durable, after cont: the state file
// renamed to .done (if the mark was a marker), the directory synced, the
// marker removed.
func (r *run) settleConsumed(vm *manifest.VM) {
	sf := r.local(vm.StateFile)
	m := r.marker(sf)
	if m != "" && fileExists(m) {
		if err := os.Rename(sf, sf+doneSuffix); err != nil {
			r.Log.Warn("renaming the consumed state file; its tmpfs marker stays", "vm", vm.Name, "err", err)
			return
		}
	}
	d, err := os.Open(filepath.Dir(sf))
	if err == nil {
		err = d.Sync()
		d.Close()
	}
	if err != nil {
		r.Log.Warn("syncing the state directory after marking the state consumed", "vm", vm.Name, "err", err)
		return
	}
	if m != "" {
		os.Remove(m)
	}
}

// consumed tells whether a new QEMU loaded vm's state (and may have run the
// guest from it). For a cpr-transfer, whose new QEMU runs the guest the
// moment its load ends (no -S, no mark of ours before), its run trace says
// whether it did.
func (r *run) consumed(vm *manifest.VM) bool {
	if r.twinStarted(vm) {
		return true
	}
	sf := r.local(vm.StateFile)
	if !fileExists(sf) && fileExists(sf+doneSuffix) {
		return true
	}
	m := r.marker(sf)
	return m != "" && fileExists(m)
}

// markDone renames a loaded state file to .done.
func (r *run) markDone(vm *manifest.VM) { r.renameState(vm, doneSuffix) }

// setAside renames a state file that will not be loaded (its guest runs on
// the QEMU that wrote it) to .aborted.
func (r *run) setAside(vm *manifest.VM) { r.renameState(vm, abortedSuffix) }

func (r *run) renameState(vm *manifest.VM, suffix string) {
	sf := r.local(vm.StateFile)
	if !fileExists(sf) {
		return
	}
	m := r.marker(sf)
	if err := os.Rename(sf, sf+suffix); err != nil {
		r.Log.Warn("renaming the state file", "vm", vm.Name, "to", sf+suffix, "err", err)
		return
	}
	if m != "" {
		os.Remove(m) // the rename is the mark now
	}
}
