package libvirt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// AutostartDir is where libvirt's system daemon keeps a link for each
// domain it starts at its own start.
const AutostartDir = "/etc/libvirt/qemu/autostart"

// HeldSuffix names an autostart link moved aside: libvirt looks only at
// NAME.xml.
const HeldSuffix = ".liveupdate-held"

// HoldAutostart moves the domain's autostart link (under root, the host
// root as we see it) aside, and tells whether there was one. For a guest
// whose restore failed after a kexec: libvirt's daemon, started by the
// host's init, finds no record of it running and would start it afresh —
// booting it over the RAM the restore kept, which libvirt deletes when that
// QEMU stops. ReleaseAutostart puts the link back.
func HoldAutostart(root, name string) (bool, error) {
	link := filepath.Join(root, AutostartDir, name+".xml")
	if _, err := os.Lstat(link); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err := os.Rename(link, link+HeldSuffix); err != nil {
		return false, fmt.Errorf("holding libvirt's autostart of %s: %w", name, err)
	}
	return true, nil
}

// ReleaseAutostart puts back an autostart link HoldAutostart moved aside,
// and tells whether there was one.
func ReleaseAutostart(root, name string) (bool, error) {
	link := filepath.Join(root, AutostartDir, name+".xml")
	if _, err := os.Lstat(link + HeldSuffix); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err := os.Rename(link+HeldSuffix, link); err != nil {
		return false, fmt.Errorf("giving libvirt back the autostart of %s: %w", name, err)
	}
	return true, nil
}
