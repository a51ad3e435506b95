package libvirt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// ErrDaemonRuns: a libvirt daemon that manages QEMU guests runs. While it
// does it holds each guest's monitor and owns the status files; liveupdate
// and the daemon take turns (see README "libvirt").
var ErrDaemonRuns = errors.New("libvirt's daemon runs")

// Daemon is a running libvirt daemon that drives QEMU: the monolithic
// libvirtd or the modular virtqemud.
type Daemon struct {
	Name string
	PID  int
}

func (d Daemon) String() string { return fmt.Sprintf("%s (pid %d)", d.Name, d.PID) }

// Daemons lists the libvirt daemons that manage QEMU guests and run now
// (zombies excluded), by their process name under procRoot (/proc).
func Daemons(procRoot string) []Daemon {
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return nil
	}
	var out []Daemon
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "comm"))
		if err != nil {
			continue
		}
		name := strings.TrimSpace(string(comm))
		if name != "libvirtd" && name != "virtqemud" {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "stat")); err == nil && zombie(string(stat)) {
			continue
		}
		out = append(out, Daemon{Name: name, PID: pid})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out
}

// zombie reads the state field of /proc/PID/stat ("pid (comm) S …").
func zombie(stat string) bool {
	i := strings.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

// Units are the systemd units of a daemon: its service and the sockets
// that would start it again on the next client (virsh, a fleet agent).
func Units(daemon string) []string {
	return []string{daemon + ".service", daemon + ".socket", daemon + "-ro.socket", daemon + "-admin.socket"}
}

// StopHint is what an operator runs to give liveupdate its turn, and to
// give libvirt its turn back after.
func StopHint(ds []Daemon) (stop, start string) {
	var units []string
	for _, d := range ds {
		units = append(units, Units(d.Name)...)
	}
	// Sockets first on start: the service then finds its sockets ready.
	var startUnits []string
	for _, d := range ds {
		u := Units(d.Name)
		startUnits = append(startUnits, u[1:]...)
		startUnits = append(startUnits, u[0])
	}
	return "systemctl stop " + strings.Join(units, " "), "systemctl start " + strings.Join(startUnits, " ")
}
