package qemuargv

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// libvirtArgv is shaped like what libvirt 9 writes for a guest with RAM in a
// shared file, a tap + vhost passed by fd and a monitor passed by fd.
var libvirtArgv = []string{
	"/usr/bin/qemu-system-x86_64",
	"-name", "guest=web01,debug-threads=on",
	"-S",
	"-object", `{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-web01/master-key.aes"}`,
	"-machine", "pc-q35-8.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,hpet=off,acpi=on",
	"-accel", "tcg",
	"-m", "size=4194304k",
	"-object", `{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/mnt/pmem/web01.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":4294967296}`,
	"-smp", "2,sockets=2,cores=1,threads=1",
	"-uuid", "4f5e9b5c-6c45-4b7a-9b7e-0a1c7c7d8e9f",
	"-no-user-config", "-nodefaults",
	"-chardev", "socket,id=charmonitor,fd=23,server=on,wait=off",
	"-mon", "chardev=charmonitor,id=monitor,mode=control",
	"-rtc", "base=utc,driftfix=slew",
	"-netdev", `{"type":"tap","fd":"25","vhost":true,"vhostfd":"27","id":"hostnet0"}`,
	"-device", `{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56","bus":"pci.1","addr":"0x0"}`,
	"-sandbox", "on,obtain=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
	"-msg", "timestamp=on",
}

func TestParseRoundTrip(t *testing.T) {
	c, err := Parse(libvirtArgv)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Argv(); !reflect.DeepEqual(got, libvirtArgv) {
		t.Fatalf("round trip changed argv:\n%q\n%q", got, libvirtArgv)
	}
}

func TestModel(t *testing.T) {
	tests := []struct {
		name         string
		argv         []string
		wantName     string
		wantMachine  string
		wantUsed     map[string]string
		wantImplicit bool
		wantShared   map[string]bool
		wantQMP      []QMPEndpoint
		wantFds      []FdKind
	}{
		{
			name:        "libvirt JSON objects and fds",
			argv:        libvirtArgv,
			wantName:    "web01",
			wantMachine: "pc-q35-8.2",
			wantUsed:    map[string]string{"pc.ram": "machine"},
			wantShared:  map[string]bool{"pc.ram": true},
			wantQMP:     []QMPEndpoint{{FD: 23, Chardev: "charmonitor"}},
			wantFds:     []FdKind{FdChardev, FdTap, FdVhost},
		},
		{
			name: "two NUMA nodes on their own backends",
			argv: []string{"qemu", "-name", "numa", "-M", "q35", "-m", "512",
				"-object", "memory-backend-file,id=m0,size=256M,mem-path=/dev/shm/n0,share=on",
				"-object", "memory-backend-file,id=m1,size=256M,mem-path=/dev/shm/n1,share=on",
				"-numa", "node,nodeid=0,memdev=m0", "-numa", "node,nodeid=1,memdev=m1",
				"-qmp", "unix:/run/numa.qmp,server=on,wait=off"},
			wantName:    "numa",
			wantMachine: "q35",
			wantUsed:    map[string]string{"m0": "numa node 0", "m1": "numa node 1"},
			wantShared:  map[string]bool{"m0": true, "m1": true},
			wantQMP:     []QMPEndpoint{{Path: "/run/numa.qmp", FD: -1}},
		},
		{
			name: "private RAM: backend without share",
			argv: []string{"qemu", "-m", "256", "-machine", "pc,memory-backend=r",
				"-object", "memory-backend-file,id=r,size=256M,mem-path=/dev/shm/r",
				"-qmp", "unix:/tmp/q.sock,server,nowait"},
			wantMachine: "pc",
			wantUsed:    map[string]string{"r": "machine"},
			wantShared:  map[string]bool{"r": false},
			wantQMP:     []QMPEndpoint{{Path: "/tmp/q.sock", FD: -1}},
		},
		{
			name:         "plain -m is implicit RAM",
			argv:         []string{"qemu", "-m", "1G", "-nographic"},
			wantUsed:     map[string]string{},
			wantImplicit: true,
			wantShared:   map[string]bool{},
		},
		{
			name: "NUMA node without memdev is implicit",
			argv: []string{"qemu", "-m", "1G", "-numa", "node,nodeid=0,mem=1G",
				"-chardev", "socket,id=mon0,path=/tmp/m,server=on,wait=off", "-mon", "chardev=mon0,mode=control"},
			wantUsed:     map[string]string{},
			wantImplicit: true,
			wantShared:   map[string]bool{},
			wantQMP:      []QMPEndpoint{{Path: "/tmp/m", FD: -1, Chardev: "mon0"}},
		},
		{
			name: "multiqueue tap with fds and vhostfds; pc-dimm",
			argv: []string{"qemu", "-machine", "type=pc,memory-backend=ram",
				"-object", "memory-backend-file,id=ram,size=1G,mem-path=/p/ram,share=yes",
				"-object", "memory-backend-file,id=hp,size=1G,mem-path=/p/hp,share=on",
				"-device", "pc-dimm,id=dimm0,memdev=hp",
				"-netdev", "tap,id=n0,fds=30:31,vhost=on,vhostfds=32:33,queues=2"},
			wantMachine: "pc",
			wantUsed:    map[string]string{"ram": "machine", "hp": "pc-dimm dimm0"},
			wantShared:  map[string]bool{"ram": true, "hp": true},
			wantFds:     []FdKind{FdTap, FdTap, FdVhost, FdVhost},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(tt.argv)
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Name(); got != tt.wantName {
				t.Errorf("Name = %q, want %q", got, tt.wantName)
			}
			if got := c.MachineType(); got != tt.wantMachine {
				t.Errorf("MachineType = %q, want %q", got, tt.wantMachine)
			}
			r, err := c.RAM()
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(r.Used, tt.wantUsed) {
				t.Errorf("Used = %v, want %v", r.Used, tt.wantUsed)
			}
			if (r.Implicit != "") != tt.wantImplicit {
				t.Errorf("Implicit = %q, want implicit=%v", r.Implicit, tt.wantImplicit)
			}
			shared := map[string]bool{}
			for _, b := range r.Backends {
				shared[b.ID] = b.Share
			}
			if !reflect.DeepEqual(shared, tt.wantShared) {
				t.Errorf("shared = %v, want %v", shared, tt.wantShared)
			}
			if got := c.QMPEndpoints(); !reflect.DeepEqual(got, tt.wantQMP) {
				t.Errorf("QMP = %+v, want %+v", got, tt.wantQMP)
			}
			var kinds []FdKind
			for _, f := range c.FdRefs() {
				kinds = append(kinds, f.Kind)
			}
			if !reflect.DeepEqual(kinds, tt.wantFds) {
				t.Errorf("fd kinds = %v, want %v", kinds, tt.wantFds)
			}
		})
	}
}

func TestForRestart(t *testing.T) {
	tests := []struct {
		name    string
		argv    []string
		opts    RestartOptions
		want    []string
		wantErr string
	}{
		{
			name: "alias pinned, incoming replaced, daemonize dropped",
			argv: []string{"qemu", "-machine", "pc,memory-backend=r", "-daemonize", "-incoming", "tcp:0:4444"},
			opts: RestartOptions{MachineType: "pc-i440fx-10.0-machine", Binary: "/opt/qemu-new"},
			want: []string{"/opt/qemu-new", "-machine", "pc-i440fx-10.0,memory-backend=r", "-S", "-incoming", "defer"},
		},
		{
			name: "no machine option: added",
			argv: []string{"qemu", "-m", "256"},
			opts: RestartOptions{MachineType: "pc-i440fx-10.0"},
			want: []string{"qemu", "-m", "256", "-machine", "pc-i440fx-10.0", "-S", "-incoming", "defer"},
		},
		{
			name: "machine without type: type added first",
			argv: []string{"qemu", "-machine", "accel=tcg"},
			opts: RestartOptions{MachineType: "pc-q35-10.0"},
			want: []string{"qemu", "-machine", "pc-q35-10.0,accel=tcg", "-S", "-incoming", "defer"},
		},
		{
			name: "versioned type kept",
			argv: []string{"qemu", "-M", "pc-q35-8.2"},
			opts: RestartOptions{MachineType: "pc-q35-8.2"},
			want: []string{"qemu", "-M", "pc-q35-8.2", "-S", "-incoming", "defer"},
		},
		{
			name: "fds renumbered in key=val and JSON",
			argv: []string{"qemu", "-netdev", "tap,id=n0,fds=30:31,vhostfds=32:33",
				"-netdev", `{"type":"tap","id":"n1","fd":"40"}`},
			opts: RestartOptions{FdMap: map[int]int{30: 3, 31: 4, 32: 5, 33: 6, 40: 7}},
			want: []string{"qemu", "-netdev", "tap,id=n0,fds=3:4,vhostfds=5:6",
				"-netdev", `{"fd":"7","id":"n1","type":"tap"}`, "-S", "-incoming", "defer"},
		},
		{
			name: "RAM in an inherited fd: mem-path renumbered, /dev/fd/N too",
			argv: []string{"qemu", "-object", "memory-backend-file,id=ram0,size=160M,mem-path=/proc/self/fd/20,share=on",
				"-object", `{"qom-type":"memory-backend-file","id":"ram1","mem-path":"/dev/fd/21","share":true}`,
				"-netdev", "tap,id=n0,fd=22"},
			opts: RestartOptions{FdMap: map[int]int{20: 3, 21: 4, 22: 5}},
			want: []string{"qemu", "-object", "memory-backend-file,id=ram0,size=160M,mem-path=/proc/self/fd/3,share=on",
				"-object", `{"id":"ram1","mem-path":"/proc/self/fd/4","qom-type":"memory-backend-file","share":true}`,
				"-netdev", "tap,id=n0,fd=5", "-S", "-incoming", "defer"},
		},
		{
			name:    "RAM fd unmapped is an error",
			argv:    []string{"qemu", "-object", "memory-backend-file,id=ram0,mem-path=/proc/self/fd/20,share=on"},
			opts:    RestartOptions{FdMap: map[int]int{}},
			wantErr: "mem-path: no new fd for inherited fd 20",
		},
		{
			name:    "unmapped fd is an error",
			argv:    []string{"qemu", "-netdev", "tap,id=n0,fd=9"},
			opts:    RestartOptions{FdMap: map[int]int{}},
			wantErr: "no new fd for inherited fd 9",
		},
		{
			name: "-S given: not doubled",
			argv: []string{"qemu", "-S", "-m", "256"},
			want: []string{"qemu", "-S", "-m", "256", "-incoming", "defer"},
		},
		{
			name: "escaped comma survives",
			argv: []string{"qemu", "-object", "memory-backend-file,id=r,mem-path=/a,,b,share=on,size=1M"},
			want: []string{"qemu", "-object", "memory-backend-file,id=r,mem-path=/a,,b,share=on,size=1M", "-S", "-incoming", "defer"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(tt.argv)
			if err != nil {
				t.Fatal(err)
			}
			n, err := c.ForRestart(tt.opts)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := n.Argv(); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("argv:\n got %q\nwant %q", got, tt.want)
			}
			if !reflect.DeepEqual(c.Argv(), tt.argv) {
				t.Fatalf("ForRestart modified its receiver")
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	for _, argv := range [][]string{
		{},
		{"qemu", "-m"},
		{"qemu", "-object", `{"qom-type":`},
		{"qemu", "-object", `{"a":1} x`},
	} {
		if _, err := Parse(argv); err == nil {
			t.Errorf("Parse(%q) succeeded, want error", argv)
		}
	}
}

func TestEscapedPath(t *testing.T) {
	c, _ := Parse([]string{"qemu", "-object", "memory-backend-file,id=r,mem-path=/a,,b,share=on,size=1M", "-machine", "memory-backend=r"})
	r, err := c.RAM()
	if err != nil {
		t.Fatal(err)
	}
	if r.Backends[0].MemPath != "/a,b" || r.Backends[0].Size != 1<<20 {
		t.Fatalf("backend = %+v", r.Backends[0])
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"256M": 256 << 20, "4G": 4 << 30, "1024": 1024, "4194304k": 4 << 30, "0x100": 256, "1.5G": 3 << 29} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "abc", "99999999999999999999T"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) succeeded", in)
		}
	}
}

// FuzzParse checks the parser never panics, that whatever parses renders back
// to the same argv, and that the analyses and the restart rewrite never panic.
func FuzzParse(f *testing.F) {
	f.Add(strings.Join(libvirtArgv, "\x00"))
	f.Add("qemu\x00-netdev\x00tap,id=n,fds=1:2,vhostfds=3:4\x00-M\x00pc")
	f.Add("qemu\x00-perfmap\x00-frob\x00x\x00-name\x00vm")
	f.Add("qemu\x00-object\x00{\"qom-type\":\"memory-backend-file\",\"share\":true}\x00-numa\x00node,memdev=x")
	f.Fuzz(func(t *testing.T, s string) {
		argv := strings.Split(s, "\x00")
		c, err := Parse(argv)
		if err != nil {
			return
		}
		if got := c.Argv(); !reflect.DeepEqual(got, argv) {
			t.Fatalf("round trip: %q != %q", got, argv)
		}
		for _, o := range c.Opts {
			if _, known := Known(o.Name); o.Name != "" && !known && o.HasValue {
				t.Fatalf("unknown option -%s took a value", o.Name)
			}
		}
		if len(c.UnknownOptions()) > 0 {
			if _, err := c.ForRestart(RestartOptions{}); err == nil {
				t.Fatalf("ForRestart accepted unknown options %q", c.UnknownOptions())
			}
		}
		c.Name()
		c.MachineType()
		c.RAM()
		c.Netdevs()
		c.QMPEndpoints()
		c.ListenPaths()
		c.Pidfile()
		c.TwinConflicts()
		m := map[int]int{}
		for i, r := range c.FdRefs() {
			m[r.Num] = 3 + i
		}
		if n, err := c.ForRestart(RestartOptions{MachineType: "pc-q35-10.0", FdMap: m}); err == nil {
			if _, err := Parse(n.Argv()); err != nil {
				t.Fatalf("rewritten argv does not parse: %v", err)
			}
		}
	})
}

func TestHostNodes(t *testing.T) {
	for _, c := range []struct {
		obj     string
		nodes   []int
		policy  string
		wantErr bool
	}{
		{"memory-backend-file,id=r,mem-path=/p,share=on,size=1M,host-nodes=1,policy=bind", []int{1}, "bind", false},
		{"memory-backend-file,id=r,mem-path=/p,share=on,size=1M,host-nodes=0-2,policy=interleave", []int{0, 1, 2}, "interleave", false},
		{"memory-backend-file,id=r,mem-path=/p,share=on,size=1M,host-nodes=0,host-nodes=3,policy=preferred", []int{0, 3}, "preferred", false},
		{`{"qom-type":"memory-backend-file","id":"r","mem-path":"/p","share":true,"size":1048576,"host-nodes":[1],"policy":"bind"}`, []int{1}, "bind", false},
		{"memory-backend-file,id=r,mem-path=/p,share=on,size=1M", nil, "", false},
		{"memory-backend-file,id=r,mem-path=/p,share=on,size=1M,host-nodes=2-1", nil, "", true},
		{"memory-backend-file,id=r,mem-path=/p,share=on,size=1M,host-nodes=x", nil, "", true},
	} {
		p, err := Parse([]string{"qemu", "-object", c.obj, "-machine", "memory-backend=r"})
		if err != nil {
			t.Fatal(err)
		}
		r, err := p.RAM()
		if (err != nil) != c.wantErr {
			t.Errorf("%s: err %v", c.obj, err)
			continue
		}
		if err == nil && (fmt.Sprint(r.Backends[0].HostNodes) != fmt.Sprint(c.nodes) || r.Backends[0].Policy != c.policy) {
			t.Errorf("%s: host-nodes %v policy %q, want %v %q", c.obj, r.Backends[0].HostNodes, r.Backends[0].Policy, c.nodes, c.policy)
		}
	}
}

func TestUsesKVM(t *testing.T) {
	for _, tc := range []struct {
		argv string
		want bool
	}{
		{"-enable-kvm -m 1G", true},
		{"-accel kvm", true},
		{"-accel kvm,kernel-irqchip=split", true},
		{"-accel accel=kvm", true},
		{"-machine pc-q35-9.2,accel=kvm,usb=off", true}, // libvirt's older form
		{"-machine q35,accel=kvm:tcg", true},
		{"-machine q35,accel=tcg:kvm", true},
		{"-accel tcg", false},
		{"-accel tcg,thread=multi -machine pc", false},
		{"-machine pc,memory-backend=ram0", false}, // QEMU's default: TCG
		{"-name kvm -m 1G", false},
	} {
		c, err := Parse(append([]string{"/usr/bin/qemu-system-x86_64"}, strings.Fields(tc.argv)...))
		if err != nil {
			t.Fatalf("%q: %v", tc.argv, err)
		}
		if got := c.UsesKVM(); got != tc.want {
			t.Errorf("%q: UsesKVM %v, want %v", tc.argv, got, tc.want)
		}
	}
}
