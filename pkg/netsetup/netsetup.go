// Package netsetup reads the guests' host-side network from the kernel and
// builds it in a new one, through netlink: their tap devices and the bridges
// those are ports of, with addresses, as manifest.Network records them. It
// also brings up loopback and configures the management interface with
// DHCPv4.
package netsetup

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Capture records the named taps (with their TUN flags and queue counts,
// which netlink does not report reliably) and the bridges they belong to.
func Capture(taps map[string]TapInfo) (manifest.Network, error) {
	var n manifest.Network
	bridges := map[string]bool{}
	names := make([]string, 0, len(taps))
	for name := range taps {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return n, fmt.Errorf("recording tap %s: %w", name, err)
		}
		a := l.Attrs()
		t := manifest.Tap{Name: name, MAC: a.HardwareAddr.String(), MTU: a.MTU, Flags: taps[name].Flags,
			Queues: taps[name].Queues, Up: a.Flags&net.FlagUp != 0}
		if a.MasterIndex > 0 {
			m, err := netlink.LinkByIndex(a.MasterIndex)
			if err != nil {
				return n, fmt.Errorf("recording master of tap %s: %w", name, err)
			}
			t.Master = m.Attrs().Name
			if m.Type() == "bridge" {
				bridges[t.Master] = true
			}
		}
		n.Taps = append(n.Taps, t)
	}
	var bnames []string
	for b := range bridges {
		bnames = append(bnames, b)
	}
	sort.Strings(bnames)
	for _, name := range bnames {
		b, err := captureBridge(name, taps)
		if err != nil {
			return n, err
		}
		n.Bridges = append(n.Bridges, b)
	}
	return n, nil
}

// TapInfo is what the caller knows of a tap from its fds.
type TapInfo struct {
	Flags  uint16
	Queues int
}

func captureBridge(name string, taps map[string]TapInfo) (manifest.Bridge, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return manifest.Bridge{}, fmt.Errorf("recording bridge %s: %w", name, err)
	}
	a := l.Attrs()
	b := manifest.Bridge{Name: name, MAC: a.HardwareAddr.String(), MTU: a.MTU, Up: a.Flags&net.FlagUp != 0}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return b, fmt.Errorf("recording addresses of %s: %w", name, err)
	}
	for _, ad := range addrs {
		if ad.IP.IsLinkLocalUnicast() {
			continue // the kernel makes these itself
		}
		b.Addrs = append(b.Addrs, ad.IPNet.String())
	}
	links, err := netlink.LinkList()
	if err != nil {
		return b, err
	}
	for _, p := range links {
		// A tap no guest of this run holds is not a port to make again:
		// only its owner can (a stopped guest's QEMU, left persistent).
		if p.Attrs().MasterIndex == a.Index && p.Type() != "tuntap" {
			if _, isTap := taps[p.Attrs().Name]; !isTap {
				b.Ports = append(b.Ports, p.Attrs().Name)
				if mac := portMAC(p.Attrs()); mac != "" {
					if b.PortMACs == nil {
						b.PortMACs = map[string]string{}
					}
					b.PortMACs[p.Attrs().Name] = mac
				}
			}
		}
	}
	sort.Strings(b.Ports)
	return b, nil
}

// Apply builds the recorded network: the guests' side (GuestSide), then
// the bridges' uplink ports (Uplinks). Existing devices are reused and
// adjusted. It goes on past errors and returns them all; ports no link
// answers to are in missing, not in err (Uplinks says why).
func Apply(n manifest.Network) (missing []string, err error) {
	gerr := GuestSide(n)
	missing, uerr := Uplinks(n)
	return missing, errors.Join(gerr, uerr)
}

// GuestSide builds what a guest's QEMU needs to start: the bridges, with
// their MAC, MTU and addresses, up as recorded, and the taps, persistent,
// with their MAC, MTU and bridge. Not the bridges' other ports: PID 1
// attaches those while the guests' QEMUs start (Uplinks), because bringing
// a NIC up is the slow part of a host's network (388 ms of a 659 ms network
// phase for one virtio NIC in the nested benchmark, docs/benchmarks.md),
// and no QEMU waits for it. It goes on past errors and returns them all.
func GuestSide(n manifest.Network) error {
	var errs []error
	for _, b := range n.Bridges {
		if err := applyBridge(b); err != nil {
			errs = append(errs, fmt.Errorf("bridge %s: %w", b.Name, err))
		}
	}
	for _, t := range n.Taps {
		if err := applyTap(t); err != nil {
			errs = append(errs, fmt.Errorf("tap %s: %w", t.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Uplinks attaches each recorded bridge's ports that are not guests' taps
// (the host's NICs, bonds, VLANs) and brings them up. It goes on past
// errors and returns them all.
//
// A port no link answers to (by name or recorded address) is left out and
// said in missing, not in err: the bridge and the guests' taps on it are
// built all the same. Such a port is the host's to make once its network
// configuration runs (a bond, a VLAN, a NIC whose driver the new kernel
// loads later), and the guests are better running without it than not
// running at all.
func Uplinks(n manifest.Network) (missing []string, err error) {
	var errs []error
	for _, b := range n.Bridges {
		lost, err := attachPorts(b)
		for _, l := range lost {
			missing = append(missing, fmt.Sprintf("bridge %s: %v", b.Name, l))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bridge %s: %w", b.Name, err))
		}
	}
	return missing, errors.Join(errs...)
}

// applyBridge builds one bridge, without its ports.
func applyBridge(b manifest.Bridge) error {
	l, err := netlink.LinkByName(b.Name)
	if err != nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: b.Name, MTU: b.MTU}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("creating: %w", err)
		}
		if l, err = netlink.LinkByName(b.Name); err != nil {
			return err
		}
	}
	if err := setCommon(l, b.MAC, b.MTU); err != nil {
		return err
	}
	for _, cidr := range b.Addrs {
		a, err := netlink.ParseAddr(cidr)
		if err != nil {
			return fmt.Errorf("address %s: %w", cidr, err)
		}
		if err := netlink.AddrReplace(l, a); err != nil {
			return fmt.Errorf("adding address %s: %w", cidr, err)
		}
	}
	if b.Up {
		return netlink.LinkSetUp(l)
	}
	return nil
}

// attachPorts makes the bridge's recorded ports its ports again, up; lost
// are those that could not be found.
func attachPorts(b manifest.Bridge) (lost []error, err error) {
	if len(b.Ports) == 0 {
		return nil, nil
	}
	l, err := netlink.LinkByName(b.Name)
	if err != nil {
		return nil, err
	}
	for _, p := range b.Ports {
		pl, err := portLink(p, b.PortMACs[p])
		if err != nil {
			lost = append(lost, fmt.Errorf("port %s left out: %w", p, err))
			continue
		}
		if err := netlink.LinkSetMaster(pl, l); err != nil {
			return lost, fmt.Errorf("adding port %s: %w", p, err)
		}
		if err := netlink.LinkSetUp(pl); err != nil {
			return lost, fmt.Errorf("bringing port %s up: %w", p, err)
		}
	}
	return lost, nil
}

// portMAC is a port's own hardware address: the permanent one where the
// driver reports it.
func portMAC(a *netlink.LinkAttrs) string {
	if len(a.PermHWAddr) > 0 {
		return a.PermHWAddr.String()
	}
	return a.HardwareAddr.String()
}

// portLink finds a bridge port by name or, when no link has that name (a
// NIC udev renamed before, under the kernel's name now), by its hardware
// address, and gives it the recorded name — the name udev gives it again
// after the handover.
func portLink(name, mac string) (netlink.Link, error) {
	l, err := netlink.LinkByName(name)
	if err == nil || mac == "" {
		return l, err
	}
	links, lerr := netlink.LinkList()
	if lerr != nil {
		return nil, errors.Join(err, lerr)
	}
	for _, c := range links {
		a := c.Attrs()
		if portMAC(a) != mac || a.MasterIndex != 0 || c.Type() == "bridge" || c.Type() == "tuntap" {
			continue
		}
		netlink.LinkSetDown(c)
		if rerr := netlink.LinkSetName(c, name); rerr != nil {
			return nil, fmt.Errorf("%w; the link with its address %s is %s, and renaming it failed: %v", err, mac, a.Name, rerr)
		}
		return netlink.LinkByName(name)
	}
	return nil, fmt.Errorf("%w (and no link has its address %s)", err, mac)
}

func applyTap(t manifest.Tap) error {
	if _, err := netlink.LinkByName(t.Name); err != nil {
		// Create it persistent: QEMU's fds attach to it by name later,
		// and the engine gives it back its own persistence after.
		f, err := tapdev.Open(t.Name, t.Flags)
		if err != nil {
			return err
		}
		perr := tapdev.SetPersist(f, true)
		f.Close()
		if perr != nil {
			return perr
		}
	}
	l, err := netlink.LinkByName(t.Name)
	if err != nil {
		return err
	}
	if err := setCommon(l, t.MAC, t.MTU); err != nil {
		return err
	}
	if t.Master != "" {
		m, err := netlink.LinkByName(t.Master)
		if err != nil {
			return fmt.Errorf("master %s: %w", t.Master, err)
		}
		if err := netlink.LinkSetMaster(l, m); err != nil {
			return fmt.Errorf("joining %s: %w", t.Master, err)
		}
	}
	if t.Up {
		return netlink.LinkSetUp(l)
	}
	return nil
}

func setCommon(l netlink.Link, mac string, mtu int) error {
	if mac != "" && l.Attrs().HardwareAddr.String() != mac {
		hw, err := net.ParseMAC(mac)
		if err != nil {
			return fmt.Errorf("MAC %s: %w", mac, err)
		}
		if err := netlink.LinkSetHardwareAddr(l, hw); err != nil {
			return fmt.Errorf("setting MAC %s: %w", mac, err)
		}
	}
	if mtu > 0 && l.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(l, mtu); err != nil {
			return fmt.Errorf("setting MTU %d: %w", mtu, err)
		}
	}
	return nil
}

// LoopbackUp brings up lo.
func LoopbackUp() error {
	l, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(l)
}

// ReadBackTap reads a tap's state back from the kernel (netlink).
func ReadBackTap(name string) (manifest.Tap, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return manifest.Tap{}, fmt.Errorf("tap %s: %w", name, err)
	}
	a := l.Attrs()
	t := manifest.Tap{Name: name, MAC: a.HardwareAddr.String(), MTU: a.MTU, Up: a.Flags&net.FlagUp != 0}
	tt, ok := l.(*netlink.Tuntap)
	if !ok {
		return t, fmt.Errorf("%s is a %s, not a tap", name, l.Type())
	}
	// The kernel's own view of the TUN flags is sysfs' tun_flags (netlink
	// reports some of them only on newer kernels). sysfs shows the network
	// namespace it was mounted in: PID 1's is the host's.
	if b, err := os.ReadFile("/sys/class/net/" + name + "/tun_flags"); err == nil {
		f, perr := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(b)), "0x"), 16, 16)
		if perr == nil {
			t.Flags = uint16(f)
		}
	} else {
		t.Flags = uint16(tt.Mode) | uint16(tt.Flags)
		if !tt.NonPersist {
			t.Flags |= unix.IFF_PERSIST
		}
	}
	t.Queues = tt.Queues
	if a.MasterIndex > 0 {
		if m, err := netlink.LinkByIndex(a.MasterIndex); err == nil {
			t.Master = m.Attrs().Name
		}
	}
	return t, nil
}

// Verify reads every recorded tap back from the kernel and reports where it
// differs from the record (persistence aside: that is the engine's).
func Verify(n manifest.Network) ([]manifest.Tap, error) {
	var got []manifest.Tap
	var errs []error
	for _, want := range n.Taps {
		t, err := ReadBackTap(want.Name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		got = append(got, t)
		mask := ^uint16(unix.IFF_PERSIST)
		if t.MAC != want.MAC || t.MTU != want.MTU || t.Flags&mask != want.Flags&mask || t.Master != want.Master || t.Up != want.Up {
			errs = append(errs, fmt.Errorf("tap %s is %+v, recorded %+v", want.Name, t, want))
		}
	}
	return got, errors.Join(errs...)
}
