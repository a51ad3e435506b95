package manifest

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// This file holds the host state a manifest records for PID 1 to rebuild
// after kexec: the guests' host-side network and their cgroup v2 tree.
// Only the data lives here: package hoststate captures and rebuilds it,
// through packages netsetup and cgroupv2.

// Network is the recorded host-side network of the guests.
type Network struct {
	Bridges []Bridge `json:"bridges,omitempty"`
	Taps    []Tap    `json:"taps,omitempty"`
}

// Bridge is a Linux bridge with its addresses and non-tap ports.
type Bridge struct {
	Name  string   `json:"name"`
	MAC   string   `json:"mac"`
	MTU   int      `json:"mtu"`
	Addrs []string `json:"addrs,omitempty"` // CIDR
	Ports []string `json:"ports,omitempty"` // ports other than the recorded taps (e.g. the uplink NIC)
	// PortMACs gives each port's hardware address: PID 1 has no udev, so a
	// NIC udev had renamed (ens3) comes up under the kernel's name (eth1)
	// and is found, and named again, by its address.
	PortMACs map[string]string `json:"port_macs,omitempty"`
	Up       bool              `json:"up"`
}

// Tap is a guest's tap device.
type Tap struct {
	Name   string `json:"name"`
	MAC    string `json:"mac"`
	MTU    int    `json:"mtu"`
	Flags  uint16 `json:"flags"` // TUN flags: IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE
	Queues int    `json:"queues"`
	Master string `json:"master,omitempty"`
	Up     bool   `json:"up"`
}

// String shows a tap the way operators read it in the boot log.
func (t Tap) String() string {
	return fmt.Sprintf("tap %s mac=%s mtu=%d flags=%s master=%s up=%v", t.Name, t.MAC, t.MTU, TapFlagsString(t.Flags), t.Master, t.Up)
}

// TapFlagsString renders TUN flags (IFF_*) for people: "tap,no_pi,vnet_hdr".
func TapFlagsString(f uint16) string {
	var names []string
	for _, x := range []struct {
		bit  uint16
		name string
	}{{unix.IFF_TAP, "tap"}, {unix.IFF_TUN, "tun"}, {unix.IFF_NO_PI, "no_pi"}, {unix.IFF_VNET_HDR, "vnet_hdr"},
		{unix.IFF_MULTI_QUEUE, "multi_queue"}, {unix.IFF_PERSIST, "persist"}} {
		if f&x.bit != 0 {
			names = append(names, x.name)
		}
	}
	return strings.Join(names, ",")
}

// LimitFiles are the cgroup v2 interface files recorded and re-applied; a
// manifest naming any other is refused.
var LimitFiles = []string{
	"cpu.max", "cpu.weight", "cpu.idle",
	"cpuset.cpus", "cpuset.mems",
	"memory.min", "memory.low", "memory.high", "memory.max", "memory.swap.max",
	"io.weight", "io.max",
	"pids.max",
}

// Cgroup is one recorded cgroup v2 cgroup.
type Cgroup struct {
	Path        string            `json:"path"`             // "/" for the root, else "/a/b"
	Controllers []string          `json:"subtree_control"`  // enabled for its children
	Limits      map[string]string `json:"limits,omitempty"` // file → content, only non-default ones
}

// String shows a cgroup the way operators read it in the boot log: its
// enabled controllers and its limits, in LimitFiles order.
func (c Cgroup) String() string {
	var kv []string
	for _, f := range LimitFiles {
		if v, ok := c.Limits[f]; ok {
			kv = append(kv, fmt.Sprintf("%s=%q", f, v))
		}
	}
	return strings.TrimSpace(fmt.Sprintf("cgroup %s subtree_control=%q %s", c.Path, strings.Join(c.Controllers, " "), strings.Join(kv, " ")))
}
