package cpr

import (
	"fmt"
	"os"
	"path/filepath"

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
// from it: renamed to .done, which every later run (recover) sees at once.
// The rename is made durable by syncDone, after cont: a directory fsync
// here would sit in every guest's blackout, and only a crash of the whole
// host could undo the rename — which no guest on this kernel survives.
func (r *run) consume(vm *manifest.VM) error {
	sf := r.local(vm.StateFile)
	return os.Rename(sf, sf+doneSuffix)
}

// unconsume takes consume's mark back, for a cont that never reached the
// new QEMU (qmp.ErrNotDelivered): that QEMU, stopped before this is called,
// never ran the guest, so the state file is as good as before its load —
// the guest can go on on its old QEMU or be restored from it again.
func (r *run) unconsume(vm *manifest.VM) error {
	sf := r.local(vm.StateFile)
	if err := os.Rename(sf+doneSuffix, sf); err != nil {
		return fmt.Errorf("taking back the consumed mark of %s: %w", sf, err)
	}
	return nil
}

// syncDone makes consume's rename durable.
func (r *run) syncDone(vm *manifest.VM) {
	d, err := os.Open(filepath.Dir(r.local(vm.StateFile)))
	if err == nil {
		err = d.Sync()
		d.Close()
	}
	if err != nil {
		r.Log.Warn("syncing the state directory after marking the state consumed", "vm", vm.Name, "err", err)
	}
}

// consumed tells whether a new QEMU loaded vm's state (and may have run the
// guest from it).
func (r *run) consumed(vm *manifest.VM) bool {
	sf := r.local(vm.StateFile)
	return !fileExists(sf) && fileExists(sf+doneSuffix)
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
	if err := os.Rename(sf, sf+suffix); err != nil {
		r.Log.Warn("renaming the state file", "vm", vm.Name, "to", sf+suffix, "err", err)
	}
}
