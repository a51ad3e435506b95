package qemuargv

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// VNCAddr is a VNC server's TCP listening address.
type VNCAddr struct {
	Host string `json:"host"`
	Port int    `json:"port"`
}

func (a VNCAddr) String() string { return net.JoinHostPort(a.Host, strconv.Itoa(a.Port)) }

// vncTCP reads a -vnc value that listens on one TCP port: "HOST:N[,opts]"
// (display N is port 5900+N). ok is false for what a QEMU cannot take over
// later through display-update: none, unix sockets, a port range (to=),
// websockets, reverse connections.
func vncTCP(v string) (addr VNCAddr, opts string, ok bool) {
	display, opts, _ := strings.Cut(v, ",")
	if display == "none" || strings.HasPrefix(display, "unix:") || display == "" {
		return VNCAddr{}, "", false
	}
	for _, o := range strings.Split(opts, ",") {
		k, _, _ := strings.Cut(o, "=")
		switch k {
		case "to", "websocket", "reverse", "connections":
			return VNCAddr{}, "", false
		}
	}
	i := strings.LastIndexByte(display, ':')
	if i < 0 {
		return VNCAddr{}, "", false
	}
	n, err := strconv.Atoi(display[i+1:])
	if err != nil || n < 0 || n > 65535-5900 {
		return VNCAddr{}, "", false
	}
	host := strings.TrimSuffix(strings.TrimPrefix(display[:i], "["), "]")
	return VNCAddr{Host: host, Port: 5900 + n}, opts, true
}

// TwinVNC is the command line a QEMU started beside the running one (an
// early twin) runs with when the guest has a VNC server on a TCP port: the
// same, but "-vnc none,…" — the port is the old QEMU's until it is gone,
// then the twin takes it with QMP display-update (addr). ok is false when
// the command line has no such -vnc.
func (c *Cmdline) TwinVNC() (twin *Cmdline, addr VNCAddr, ok bool) {
	idx := c.Find("vnc")
	if len(idx) != 1 {
		return nil, VNCAddr{}, false
	}
	addr, opts, ok := vncTCP(c.Opts[idx[0]].Value)
	if !ok {
		return nil, VNCAddr{}, false
	}
	twin = &Cmdline{Binary: c.Binary, Opts: append([]Option(nil), c.Opts...)}
	v := "none"
	if opts != "" {
		v += "," + opts
	}
	twin.Opts[idx[0]].Value = v
	return twin, addr, true
}

// WithVNCAt is the command line with "-vnc none[,opts]" turned into the
// address its QEMU listens on now (QMP query-vnc): a QEMU given its VNC
// port after its start (display-update, as early twins are) is started
// again listening there. Unchanged when -vnc is not "none" or the port is
// not a VNC display's (below 5900).
func (c *Cmdline) WithVNCAt(addr VNCAddr) *Cmdline {
	idx := c.Find("vnc")
	if len(idx) != 1 || addr.Port < 5900 {
		return c
	}
	display, opts, _ := strings.Cut(c.Opts[idx[0]].Value, ",")
	if display != "none" {
		return c
	}
	host := addr.Host
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	v := fmt.Sprintf("%s:%d", host, addr.Port-5900)
	if opts != "" {
		v += "," + opts
	}
	out := &Cmdline{Binary: c.Binary, Opts: append([]Option(nil), c.Opts...)}
	out.Opts[idx[0]].Value = v
	return out
}
