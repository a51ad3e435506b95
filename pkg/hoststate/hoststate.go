// Package hoststate captures and rebuilds the host state guests need across
// a kexec: the cgroup v2 tree and the host network (bridges, taps).
//
// The saving side captures it into the manifest's Cgroups and Network; PID 1
// (and `liveupdate restore --host`, from a rescue shell) rebuilds it in the
// new kernel before any QEMU starts, and a first boot builds the host
// configuration's the same way. The records are manifest types; packages
// netsetup and cgroupv2 do the work on the kernel.
package hoststate

import (
	"log/slog"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/cgroupv2"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/netsetup"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// CgroupRoot is where the cgroup v2 hierarchy is mounted.
var CgroupRoot = "/sys/fs/cgroup"

// Guest is what Capture needs to know of one saved guest.
type Guest struct {
	Name    string
	Cgroup  string            // its cgroup v2 path ("" if none recorded)
	NetNS   string            // its own network namespace ("" = the host's)
	Fds     []manifest.Fd     // the fds its restarted QEMU inherits
	Netdevs []qemuargv.Netdev // its -netdev options
}

// Capture records the cgroup tree (under the cgroup2 mount at cgroupRoot)
// and the host network of the guests, for PID 1 to rebuild after kexec. A
// restart on the same kernel does not need them, so failures are logged as
// warnings and what could be recorded is returned.
func Capture(cgroupRoot string, guests []Guest, log *slog.Logger) (cgroups []manifest.Cgroup, network manifest.Network) {
	if cgroupv2.Mounted(cgroupRoot) {
		cgroups = captureCgroups(cgroupRoot, guests, log)
	}
	if taps := tapInfos(guests); len(taps) > 0 {
		n, err := netsetup.Capture(taps)
		if err != nil {
			log.Warn("recording host network", "err", err)
		}
		network = n
	}
	return cgroups, network
}

// captureCgroups records each guest's cgroup and its ancestors, merged,
// parents first; nil when no guest has a cgroup.
func captureCgroups(root string, guests []Guest, log *slog.Logger) []manifest.Cgroup {
	var chains [][]manifest.Cgroup
	for _, g := range guests {
		if g.Cgroup == "" {
			continue
		}
		ch, err := cgroupv2.Capture(root, g.Cgroup)
		if err != nil {
			log.Warn("recording cgroup", "vm", g.Name, "err", err)
			continue
		}
		chains = append(chains, ch)
	}
	if len(chains) == 0 {
		return nil
	}
	return cgroupv2.Merge(chains...)
}

// tapInfos derives the host taps of the guests, with their TUN flags and
// queue counts (which netlink does not report reliably): from the tap fds
// the restarted QEMUs inherit (one fd per queue; the persistence we set for
// the restart left out), and from tap netdevs QEMU opens itself by name
// (the flags QEMU uses, multi-queue when it asks for queues). Taps in a
// guest's own network namespace are not the host's network.
func tapInfos(guests []Guest) map[string]netsetup.TapInfo {
	taps := map[string]netsetup.TapInfo{}
	for _, g := range guests {
		if g.NetNS != "" {
			continue
		}
		for _, fd := range g.Fds {
			if fd.Kind == qemuargv.FdTap {
				ti := taps[fd.TapName]
				ti.Flags = fd.TapFlags &^ unix.IFF_PERSIST
				ti.Queues++
				taps[fd.TapName] = ti
			}
		}
		for _, nd := range g.Netdevs {
			if nd.Type == "tap" && nd.Ifname != "" && len(nd.FDs) == 0 {
				if _, ok := taps[nd.Ifname]; !ok {
					flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
					if nd.Queues > 1 {
						flags |= unix.IFF_MULTI_QUEUE
					}
					taps[nd.Ifname] = netsetup.TapInfo{Flags: flags, Queues: max(nd.Queues, 1)}
				}
			}
		}
	}
	return taps
}

// Build builds a host network and cgroup tree: the bridges (with their ports
// and addresses) and taps first, then the cgroups under CgroupRoot, parents
// first, with their controllers and limits. Existing devices and cgroups are
// reused. A first boot builds the host configuration's with it; Rebuild*
// build a manifest's.
// Bridge ports that cannot be found are left out and returned in missing
// (netsetup.Apply).
func Build(n manifest.Network, cgroups []manifest.Cgroup) (missing []string, err error) {
	if missing, err = BuildNetwork(n); err != nil {
		return missing, err
	}
	return missing, BuildCgroups(cgroups)
}

// BuildNetwork builds the network half of Build.
func BuildNetwork(n manifest.Network) (missing []string, err error) {
	return netsetup.Apply(n)
}

// BuildCgroups builds the cgroup half of Build.
func BuildCgroups(cgroups []manifest.Cgroup) error {
	return cgroupv2.Apply(CgroupRoot, cgroups)
}

// RebuildNetwork is the inverse of the network half of Capture: it builds
// the manifest's bridges and taps, then reads the taps back from the kernel
// so that what runs is what was recorded. `restore --host` runs it from a
// rescue shell; PID 1 runs its two halves apart (RebuildGuestNetwork, then
// netsetup.Uplinks while the guests' QEMUs start). Bridge ports it could
// not find are left out and named in missing, apart from err.
func RebuildNetwork(m *manifest.Manifest) (taps []manifest.Tap, missing []string, err error) {
	if len(m.Network.Bridges) == 0 && len(m.Network.Taps) == 0 {
		return nil, nil, nil
	}
	if missing, err = BuildNetwork(m.Network); err != nil {
		return nil, missing, err
	}
	taps, err = netsetup.Verify(m.Network)
	return taps, missing, err
}

// RebuildGuestNetwork is RebuildNetwork without the bridges' uplink ports:
// what the guests' QEMUs need to start (netsetup.GuestSide), read back.
func RebuildGuestNetwork(m *manifest.Manifest) (taps []manifest.Tap, err error) {
	if len(m.Network.Bridges) == 0 && len(m.Network.Taps) == 0 {
		return nil, nil
	}
	if err = netsetup.GuestSide(m.Network); err != nil {
		return nil, err
	}
	return netsetup.Verify(m.Network)
}

// RebuildCgroups is the inverse of the cgroup half of Capture: it builds
// the manifest's cgroup v2 tree with its controllers and limits, then reads
// it back from the cgroup files.
func RebuildCgroups(m *manifest.Manifest) ([]manifest.Cgroup, error) {
	if len(m.Cgroups) == 0 {
		return nil, nil
	}
	if err := BuildCgroups(m.Cgroups); err != nil {
		return nil, err
	}
	return cgroupv2.Verify(CgroupRoot, m.Cgroups)
}
