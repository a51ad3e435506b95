package cpr

import (
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

// consume marks a loaded state file as used, durably, before any QEMU runs
// the guest from it: renamed to .done, the directory synced.
func (r *run) consume(vm *manifest.VM) error {
	sf := r.local(vm.StateFile)
	if err := os.Rename(sf, sf+doneSuffix); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(sf))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
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
