package libvirt

import (
	"errors"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// PidFiles are the pid files libvirt's QEMU daemons take when they start:
// each daemon write-locks the first byte of its own (virPidFileAcquire) and
// exits if it cannot.
var PidFiles = []string{"/run/libvirtd.pid", "/run/virtqemud.pid"}

// Guard keeps libvirt's daemons from starting while liveupdate changes
// guests: it holds the lock each daemon takes on its pid file at start-up,
// so a daemon started meanwhile (by hand, by socket activation, by a fleet
// agent) fails "Failed to acquire pid file" and exits — it cannot reconnect
// to a guest half-way through its restart and take it for stopped.
type Guard struct {
	files   []*os.File
	created []string
	// Busy are the pid files a running daemon holds: that daemon runs
	// now (plan refuses its guests; guests started by hand may go on).
	Busy []string
}

// Hold takes the guard under root ("" or "/": this system). A host
// without libvirt (no root/run/libvirt) has nothing to hold.
func Hold(root string) (*Guard, error) {
	g := &Guard{}
	if _, err := os.Stat(filepath.Join(root, "/run/libvirt")); err != nil {
		return g, nil
	}
	for _, p := range PidFiles {
		path := filepath.Join(root, p)
		_, statErr := os.Stat(path)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			g.Release()
			return nil, err
		}
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 1}
		if err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk); err != nil {
			f.Close()
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
				g.Busy = append(g.Busy, path)
				continue
			}
			g.Release()
			return nil, err
		}
		g.files = append(g.files, f)
		if os.IsNotExist(statErr) {
			g.created = append(g.created, path)
		}
	}
	return g, nil
}

// Release lets libvirt's daemons start again. Pid files the guard created
// are removed first, while still locked: a daemon starting then finds the
// path gone or makes its own.
func (g *Guard) Release() {
	if g == nil {
		return
	}
	for _, p := range g.created {
		if st, err := os.Stat(p); err == nil && st.Size() == 0 {
			os.Remove(p)
		}
	}
	for _, f := range g.files {
		f.Close()
	}
	g.files, g.created = nil, nil
}
