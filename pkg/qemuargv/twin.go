package qemuargv

import (
	"fmt"
	"strings"
)

// What a second QEMU of the same guest, started while the first still
// runs (restart-qemu starts the new QEMU early), would clash with.

// ListenPaths lists the unix socket paths QEMU binds as a server:
// -chardev socket,path=P,server=on and -qmp, -qmp-pretty, -monitor,
// -serial, -parallel unix:P,server. QEMU unlinks such a path before it
// binds it, and again when it quits. Sockets passed by fd are not listed.
func (c *Cmdline) ListenPaths() []string {
	var out []string
	for _, ch := range c.Chardevs() {
		if ch.Backend == "socket" && ch.Server && ch.Path != "" && ch.FD < 0 {
			out = append(out, ch.Path)
		}
	}
	for _, i := range c.Find("qmp", "qmp-pretty", "monitor", "serial", "parallel") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		dev, _ := p.Get("dev")
		if path, ok := strings.CutPrefix(dev, "unix:"); ok && p.Bool("server", false) {
			out = append(out, strings.TrimPrefix(path, "path="))
		}
	}
	return out
}

// Pidfile is the -pidfile path, "" if none.
func (c *Cmdline) Pidfile() string {
	idx := c.Find("pidfile")
	if len(idx) == 0 {
		return ""
	}
	return c.Opts[idx[len(idx)-1]].Value
}

// TwinConflicts says what on the command line two QEMUs of one guest
// cannot hold at once: TCP ports it listens on, client sockets whose
// server may take one client only (vhost-user, …), taps opened by name
// (a single-queue tap opens once; a multiqueue one would get the new
// QEMU's queues beside the running guest's), multiqueue taps passed as
// several fds (the new QEMU would detach queues under the running guest;
// one fd is shared harmlessly: a QEMU waiting for its state reads none),
// preallocated RAM (a second QEMU would
// touch every page of RAM the guest is writing). Empty means a new QEMU
// can start beside the running one.
func (c *Cmdline) TwinConflicts() []string {
	var out []string
	if len(c.Find("mem-prealloc")) > 0 {
		out = append(out, "-mem-prealloc: a second QEMU would touch every page of the running guest's RAM")
	}
	for _, i := range c.Find("object") {
		if p, err := c.Opts[i].Props(); err == nil && p.Bool("prealloc", false) {
			id, _ := p.Get("id")
			out = append(out, fmt.Sprintf("memory backend %q has prealloc=on: a second QEMU would touch every page of the running guest's RAM", id))
		}
	}
	for _, ch := range c.Chardevs() {
		if ch.Backend != "socket" || ch.FD >= 0 {
			continue
		}
		switch {
		case ch.Path == "" && ch.Server:
			out = append(out, fmt.Sprintf("chardev %q listens on a TCP port", ch.ID))
		case ch.Path != "" && !ch.Server:
			out = append(out, fmt.Sprintf("chardev %q is a client of %s, whose server may take one client only", ch.ID, ch.Path))
		}
	}
	for _, i := range c.Find("qmp", "qmp-pretty", "monitor", "serial", "parallel") {
		if v := c.Opts[i].Value; strings.HasPrefix(v, "tcp:") || strings.HasPrefix(v, "telnet:") {
			out = append(out, fmt.Sprintf("-%s %s listens on a TCP port", c.Opts[i].Name, v))
		}
	}
	_, _, vncLater := c.TwinVNC() // the twin takes the port after the old QEMU (TwinVNC)
	for _, i := range c.Find("vnc", "gdb") {
		if c.Opts[i].Name == "vnc" && vncLater {
			continue
		}
		if v := c.Opts[i].Value; v != "none" && !strings.HasPrefix(v, "unix:") {
			out = append(out, fmt.Sprintf("-%s %s listens on a TCP port", c.Opts[i].Name, v))
		}
	}
	for _, i := range c.Find("spice") {
		if p, err := c.Opts[i].Props(); err == nil {
			_, port := p.Get("port")
			_, tls := p.Get("tls-port")
			if port || tls {
				// QEMU 10's display-update takes only vnc ("Parameter 'type'
				// does not accept value 'spice'"), and -spice no listening fd.
				out = append(out, "-spice listens on a TCP port, which QEMU cannot give a second QEMU later (display-update is VNC's only)")
			}
		}
	}
	for _, n := range c.Netdevs() {
		if n.Type != "tap" {
			continue
		}
		switch {
		case n.Ifname != "" && len(n.FDs) == 0 && n.Queues <= 1:
			out = append(out, fmt.Sprintf("netdev %q opens tap %s by name, which a single-queue tap allows once", n.ID, n.Ifname))
		case n.Ifname != "" && len(n.FDs) == 0:
			// TUNSETIFF with IFF_MULTI_QUEUE attaches the new QEMU's
			// queues beside the old ones: the kernel then steers part
			// of the running guest's packets to queues nobody reads.
			out = append(out, fmt.Sprintf("netdev %q opens multiqueue tap %s by name: a second QEMU's %d queues would be attached beside the running guest's and take part of its packets", n.ID, n.Ifname, n.Queues))
		case len(n.FDs) > 1:
			// The new QEMU holds the same queues and detaches
			// (TUNSETQUEUE) those its guest has not enabled yet, under
			// the running guest.
			out = append(out, fmt.Sprintf("netdev %q passes a multiqueue tap as %d fds: a second QEMU would attach and detach those queues (TUNSETQUEUE) under the running guest", n.ID, len(n.FDs)))
		}
	}
	return out
}
