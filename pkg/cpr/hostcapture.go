package cpr

import "github.com/liveupdate/liveupdate/pkg/hoststate"

// hostGuests is what hoststate.Capture needs of the targets being saved.
func hostGuests(ts []*Target) []hoststate.Guest {
	gs := make([]hoststate.Guest, 0, len(ts))
	for _, t := range ts {
		g := hoststate.Guest{Name: t.Name(), Cgroup: t.rec.Cgroup, NetNS: t.rec.NetNS, Fds: t.rec.Fds}
		if t.rec.NetNS == "" {
			g.Netdevs = t.Proc.Cmdline.Netdevs()
		}
		gs = append(gs, g)
	}
	return gs
}
