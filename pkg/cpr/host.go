package cpr

import (
	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/cgroupv2"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/netsetup"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// captureHost records the cgroup tree and host network of the VMs, for
// PID 1 to rebuild after kexec. A restart on the same kernel does not need
// them, so failures are logged, not fatal.
func (e *Engine) captureHost(ts []*Target) {
	var chains [][]manifest.Cgroup
	v2 := cgroupv2.Mounted(CgroupRoot)
	taps := map[string]netsetup.TapInfo{}
	for _, t := range ts {
		if v2 && t.rec.Cgroup != "" {
			ch, err := cgroupv2.Capture(CgroupRoot, t.rec.Cgroup)
			if err != nil {
				e.Log.Warn("recording cgroup", "vm", t.Name(), "err", err)
			} else {
				chains = append(chains, ch)
			}
		}
		if t.rec.NetNS != "" {
			continue // taps in a VM's own namespace are not the host's network
		}
		for _, fd := range t.rec.Fds {
			if fd.Kind == qemuargv.FdTap {
				ti := taps[fd.TapName]
				ti.Flags = fd.TapFlags &^ unix.IFF_PERSIST
				ti.Queues++
				taps[fd.TapName] = ti
			}
		}
		for _, nd := range t.Proc.Cmdline.Netdevs() {
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
	if len(chains) > 0 {
		e.man.Cgroups = cgroupv2.Merge(chains...)
	}
	if len(taps) > 0 {
		n, err := netsetup.Capture(taps)
		if err != nil {
			e.Log.Warn("recording host network", "err", err)
		}
		e.man.Network = n
	}
}

// RebuildNetwork is the inverse of the network half of captureHost: it
// re-creates the recorded bridges (with their ports and addresses) and
// taps, then reads the taps back from the kernel so that what runs is
// what was recorded. PID 1 runs it after kexec, and `restore --host` from
// a rescue shell.
func RebuildNetwork(m *manifest.Manifest) ([]manifest.Tap, error) {
	if len(m.Network.Bridges) == 0 && len(m.Network.Taps) == 0 {
		return nil, nil
	}
	if err := netsetup.Apply(m.Network); err != nil {
		return nil, err
	}
	return netsetup.Verify(m.Network)
}

// RebuildCgroups is the inverse of the cgroup half of captureHost: it
// re-creates the recorded cgroup v2 tree with its controllers and limits,
// then reads it back from the cgroup files.
func RebuildCgroups(m *manifest.Manifest) ([]manifest.Cgroup, error) {
	if len(m.Cgroups) == 0 {
		return nil, nil
	}
	if err := cgroupv2.Apply(CgroupRoot, m.Cgroups); err != nil {
		return nil, err
	}
	return cgroupv2.Verify(CgroupRoot, m.Cgroups)
}
