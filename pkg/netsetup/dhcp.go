package netsetup

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/vishvananda/netlink"
)

// Lease is what DHCP configured.
type Lease struct {
	Iface  string
	Addr   string // CIDR
	Router string
	Server string
}

// DHCP brings iface up, asks for a DHCPv4 lease (DISCOVER … ACK) and applies
// it: the address and, if offered, a default route.
func DHCP(ctx context.Context, iface string) (*Lease, error) {
	l, err := netlink.LinkByName(iface)
	if err != nil {
		return nil, fmt.Errorf("DHCP on %s: %w", iface, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("DHCP on %s: bringing it up: %w", iface, err)
	}
	timeout := 5 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	c, err := nclient4.New(iface, nclient4.WithTimeout(timeout), nclient4.WithRetry(3))
	if err != nil {
		return nil, fmt.Errorf("DHCP on %s: %w", iface, err)
	}
	// The client can block outside its own timeouts (e.g. waiting for
	// the kernel's random pool early in boot): the deadline is ours.
	type result struct {
		l   *nclient4.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := c.Request(ctx)
		done <- result{l, err}
	}()
	var lease *nclient4.Lease
	select {
	case r := <-done:
		c.Close()
		if r.err != nil {
			return nil, fmt.Errorf("DHCP on %s: no lease: %w", iface, r.err)
		}
		lease = r.l
	case <-ctx.Done():
		c.Close()
		return nil, fmt.Errorf("DHCP on %s: no lease before the deadline (is the kernel's random pool ready? a CPU with RDRAND or virtio-rng helps): %w", iface, ctx.Err())
	}
	ack := lease.ACK
	mask := ack.SubnetMask()
	if mask == nil {
		mask = ack.YourIPAddr.DefaultMask()
	}
	ipn := &net.IPNet{IP: ack.YourIPAddr, Mask: mask}
	if err := netlink.AddrReplace(l, &netlink.Addr{IPNet: ipn}); err != nil {
		return nil, fmt.Errorf("DHCP on %s: adding %s: %w", iface, ipn, err)
	}
	out := &Lease{Iface: iface, Addr: ipn.String(), Server: ack.ServerIdentifier().String()}
	if rs := ack.Router(); len(rs) > 0 {
		out.Router = rs[0].String()
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: rs[0]}
		if err := netlink.RouteReplace(r); err != nil {
			return out, fmt.Errorf("DHCP on %s: default route via %s: %w", iface, rs[0], err)
		}
	}
	return out, nil
}
