package qemuargv

import (
	"reflect"
	"strings"
	"testing"
)

func TestTwin(t *testing.T) {
	tests := []struct {
		name      string
		argv      []string
		listen    []string
		pidfile   string
		conflicts []string // substrings, one per conflict
	}{
		{
			name: "as the tests start guests: QMP socket, pidfile, file chardev",
			argv: []string{"qemu", "-chardev", "file,id=ser0,path=/l/serial.log,append=on", "-serial", "chardev:ser0",
				"-monitor", "none", "-qmp", "unix:/run/q.sock,server=on,wait=off", "-daemonize", "-pidfile", "/run/q.pid"},
			listen:  []string{"/run/q.sock"},
			pidfile: "/run/q.pid",
		},
		{
			name: "as libvirt writes it: monitor by fd, agent socket by path, taps by fd",
			argv: []string{"qemu", "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control",
				"-chardev", `{"backend":"socket","id":"charchannel0","path":"/var/lib/libvirt/qemu/channel/target/domain-1-g/org.qemu.guest_agent.0","server":true,"wait":false}`,
				"-netdev", `{"type":"tap","fd":"33","vhost":true,"vhostfd":"35","id":"hostnet0"}`,
				"-pidfile", "/run/libvirt/qemu/g.pid"},
			listen:  []string{"/var/lib/libvirt/qemu/channel/target/domain-1-g/org.qemu.guest_agent.0"},
			pidfile: "/run/libvirt/qemu/g.pid",
		},
		{
			name:   "old boolean syntax",
			argv:   []string{"qemu", "-serial", "unix:/run/s.sock,server,nowait", "-qmp", "unix:/run/q.sock,server"},
			listen: []string{"/run/s.sock", "/run/q.sock"},
		},
		{
			name: "what two QEMUs cannot share",
			argv: []string{"qemu", "-object", `{"qom-type":"memory-backend-file","id":"ram0","mem-path":"/dev/hugepages/g","share":true,"prealloc":true}`,
				"-mem-prealloc", "-chardev", "socket,id=c0,host=0.0.0.0,port=4555,server=on,wait=off",
				"-chardev", "socket,id=vu0,path=/run/vhost-user.sock", "-monitor", "telnet:127.0.0.1:4444,server,nowait",
				"-vnc", ":1,websocket=5701", "-gdb", "tcp::1234", "-spice", "port=5930,disable-ticketing=on",
				"-netdev", "tap,id=n0,ifname=vnet0,script=no,downscript=no"},
			conflicts: []string{"-mem-prealloc", `backend "ram0" has prealloc=on`, `"c0" listens on a TCP port`, `"vu0" is a client of /run/vhost-user.sock`, "-monitor telnet:",
				"-vnc :1", "-gdb tcp::1234", "-spice", `tap vnet0 by name`},
		},
		{
			name: "VNC on a TCP port: the twin takes it later (TwinVNC)",
			argv: []string{"qemu", "-vnc", "127.0.0.1:0,audiodev=audio1"},
		},
		{
			name: "shareable: unix VNC, one tap fd, no gdb",
			argv: []string{"qemu", "-vnc", "unix:/run/vnc.sock", "-vnc", "none", "-netdev", "tap,id=n0,fd=5,vhost=on,vhostfd=6",
				"-netdev", "tap,id=n1,fds=7"},
		},
		{
			name:      "multiqueue tap by name",
			argv:      []string{"qemu", "-netdev", "tap,id=n0,ifname=vnet0,queues=4,vhost=on"},
			conflicts: []string{`netdev "n0" opens multiqueue tap vnet0 by name: a second QEMU's 4 queues`},
		},
		{
			name: "multiqueue tap as fds",
			argv: []string{"qemu", "-netdev", "tap,id=n0,fds=5:6:7:8,vhost=on,vhostfds=9:10:11:12",
				"-netdev", `{"type":"tap","id":"n1","fds":"13:14"}`},
			conflicts: []string{`netdev "n0" passes a multiqueue tap as 4 fds`, `netdev "n1" passes a multiqueue tap as 2 fds`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(tt.argv)
			if err != nil {
				t.Fatal(err)
			}
			if got := c.ListenPaths(); !reflect.DeepEqual(got, tt.listen) {
				t.Errorf("ListenPaths = %q, want %q", got, tt.listen)
			}
			if got := c.Pidfile(); got != tt.pidfile {
				t.Errorf("Pidfile = %q, want %q", got, tt.pidfile)
			}
			got := c.TwinConflicts()
			if len(got) != len(tt.conflicts) {
				t.Fatalf("TwinConflicts = %q, want %d matching %q", got, len(tt.conflicts), tt.conflicts)
			}
			for i, want := range tt.conflicts {
				if !strings.Contains(got[i], want) {
					t.Errorf("conflict %d = %q, want it to say %q", i, got[i], want)
				}
			}
		})
	}
}

func TestTwinVNC(t *testing.T) {
	for _, c := range []struct {
		vnc  string
		twin string // "" = no take-over
		addr VNCAddr
	}{
		{"127.0.0.1:0,audiodev=audio1", "none,audiodev=audio1", VNCAddr{"127.0.0.1", 5900}},
		{":3", "none", VNCAddr{"", 5903}},
		{"[::1]:7,password=on", "none,password=on", VNCAddr{"::1", 5907}},
		{"0.0.0.0:1,share=force-shared,tls-creds=tls0", "none,share=force-shared,tls-creds=tls0", VNCAddr{"0.0.0.0", 5901}},
		{"none", "", VNCAddr{}},
		{"unix:/run/vnc.sock", "", VNCAddr{}},
		{":1,websocket=5701", "", VNCAddr{}},
		{":1,to=9", "", VNCAddr{}},
		{"localhost:5500,reverse=on", "", VNCAddr{}},
		{"127.0.0.1:x", "", VNCAddr{}},
		{"127.0.0.1:70000", "", VNCAddr{}},
	} {
		t.Run(c.vnc, func(t *testing.T) {
			cl, err := Parse([]string{"qemu", "-name", "g", "-vnc", c.vnc, "-m", "64"})
			if err != nil {
				t.Fatal(err)
			}
			twin, addr, ok := cl.TwinVNC()
			if ok != (c.twin != "") {
				t.Fatalf("TwinVNC ok = %v", ok)
			}
			if !ok {
				return
			}
			want := []string{"qemu", "-name", "g", "-vnc", c.twin, "-m", "64"}
			if got := twin.Argv(); !reflect.DeepEqual(got, want) || addr != c.addr {
				t.Errorf("TwinVNC = %q %+v, want %q %+v", got, addr, want, c.addr)
			}
			if cl.Opts[cl.Find("vnc")[0]].Value != c.vnc {
				t.Errorf("TwinVNC changed the original command line")
			}
		})
	}
}

// TestWithVNCAt: a twin's "-vnc none,…" given its port later is started
// again at that port — TwinVNC's inverse.
func TestWithVNCAt(t *testing.T) {
	for _, c := range []struct {
		vnc  string
		addr VNCAddr
		want string
	}{
		{"none,audiodev=audio1", VNCAddr{"127.0.0.1", 5900}, "127.0.0.1:0,audiodev=audio1"},
		{"none", VNCAddr{"::1", 5907}, "[::1]:7"},
		{"none", VNCAddr{"127.0.0.1", 80}, "none"},
		{"127.0.0.1:2", VNCAddr{"127.0.0.1", 5905}, "127.0.0.1:2"},
	} {
		cl, _ := Parse([]string{"qemu", "-vnc", c.vnc})
		got := cl.WithVNCAt(c.addr).Opts[cl.Find("vnc")[0]].Value
		if got != c.want {
			t.Errorf("-vnc %s at %v: %q, want %q", c.vnc, c.addr, got, c.want)
		}
		if twin, addr, ok := cl.WithVNCAt(c.addr).TwinVNC(); ok && got != c.vnc && (addr != c.addr || twin.Opts[cl.Find("vnc")[0]].Value != c.vnc) {
			t.Errorf("TwinVNC of WithVNCAt does not give back -vnc %s at %v", c.vnc, c.addr)
		}
	}
}
