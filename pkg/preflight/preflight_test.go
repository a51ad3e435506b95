package preflight

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

func proc(t *testing.T, argv ...string) *discover.Process {
	t.Helper()
	c, err := qemuargv.Parse(append([]string{"qemu-system-x86_64"}, argv...))
	if err != nil {
		t.Fatal(err)
	}
	return &discover.Process{PID: 42, Cmdline: c, Cwd: "/", Fds: map[int]discover.FdInfo{}}
}

var good = []string{"-name", "vm1", "-machine", "pc,memory-backend=ram0",
	"-object", "memory-backend-file,id=ram0,size=256M,mem-path=/dev/null,share=on", // any file that exists
	"-qmp", "unix:/run/vm1.qmp,server=on,wait=off"}

func facts() Facts {
	return Facts{Version: [3]int{10, 0, 2}, MachineType: "pc-i440fx-10.0-machine", Status: "running",
		Memdevs: []Memdev{{ID: "ram0", Share: true}}}
}

func TestNoteTransfer(t *testing.T) {
	aux := append(append([]string{}, good...), "-machine", "aux-ram-share=on")
	for _, c := range []struct {
		name, want string
		argv       []string
		libvirt    string
	}{
		{"aux-ram-share", "restart-qemu hands it over by QEMU's cpr-transfer", aux, ""},
		{"without", "started with -machine aux-ram-share=on it would be handed over", good, ""},
		{"libvirt: no hint it cannot follow", "", good, "/run/libvirt/qemu/vm1.xml"},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := Check(Input{Proc: proc(t, c.argv...), Facts: facts(), StateDir: t.TempDir(), StateDirFree: 1 << 30, Libvirt: c.libvirt})
			all := strings.Join(v.Notes, "\n")
			if c.want == "" && strings.Contains(all, "cpr-transfer") || !strings.Contains(all, c.want) {
				t.Errorf("notes lack %q (or name cpr-transfer for libvirt):\n%s", c.want, all)
			}
		})
	}
}

// memfdArgv is a guest whose RAM is the inherited fd at path.
func memfdArgv(path string) []string {
	return []string{"-machine", "pc,memory-backend=ram0", "-object", "memory-backend-file,id=ram0,size=1G,mem-path=" + path + ",share=on", "-qmp", "unix:/q,server=on"}
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name  string
		argv  []string
		facts func(*Facts)
		fds   map[int]discover.FdInfo
		free  uint64
		want  string // substring of a problem; "" means OK
	}{
		{name: "ok", argv: good},
		{name: "private file backend names the backend",
			argv: []string{"-machine", "pc,memory-backend=ram0", "-object", "memory-backend-file,id=ram0,size=1G,mem-path=/x", "-qmp", "unix:/q,server=on"},
			want: `memory backend "ram0" (machine, mem-path /x) has share=off`},
		{name: "ram backend", argv: []string{"-machine", "memory-backend=r", "-object", "memory-backend-ram,id=r,size=1G", "-qmp", "unix:/q,server=on"},
			want: `"r" (memory-backend-ram, machine) is not a memory-backend-file`},
		{name: "implicit RAM", argv: []string{"-m", "1G", "-qmp", "unix:/q,server=on"}, facts: func(f *Facts) { f.Memdevs = nil },
			want: "anonymous private RAM"},
		{name: "hot-added backend", argv: good, facts: func(f *Facts) { f.Memdevs = append(f.Memdevs, Memdev{ID: "hp1", Share: true}) },
			want: `"hp1" was added at run time`},
		{name: "old QEMU", argv: good, facts: func(f *Facts) { f.Version = [3]int{8, 1, 0} }, want: "need 8.2"},
		{name: "QMP timeout", argv: good, facts: func(f *Facts) { f.QMPErr = errors.New("no greeting") }, want: "QMP: no greeting"},
		{name: "no QMP", argv: good[:6], want: "no QMP unix socket"},
		{name: "VFIO", argv: append(append([]string{}, good...), "-device", "vfio-pci,host=01:00.0"), want: "VFIO"},
		{name: "migrating", argv: good, facts: func(f *Facts) { f.Status = "inmigrate" }, want: `state "inmigrate"`},
		{name: "tap fd that is not a tap", argv: append(append([]string{}, good...), "-netdev", "tap,id=n0,fd=7"),
			fds: map[int]discover.FdInfo{7: {Target: "/dev/null"}}, want: "not a tap device"},
		{name: "tap fd ok", argv: append(append([]string{}, good...), "-netdev", "tap,id=n0,fd=7,vhost=on,vhostfd=8"),
			fds: map[int]discover.FdInfo{7: {Target: "/dev/net/tun", TapName: "vnet0"}, 8: {Target: "/dev/vhost-net"}}},
		// libvirt passes its logs as -add-fd sets of files: handed over.
		// QEMU dups the fd and closes fd=9 (which then is something else):
		// what it holds is in query-fdsets.
		{name: "fdset of a file", argv: append(append([]string{}, good...), "-add-fd", "set=0,fd=9,opaque=serial0-log", "-chardev", "file,id=s0,path=/dev/fdset/0,append=on"),
			facts: func(f *Facts) {
				f.Fdsets = []FdsetFd{{Set: 0, Fd: 31, Opaque: "serial0-log", Target: "/var/log/libvirt/qemu/vm1-serial0.log", Flags: 02102001}}
			}},
		// libvirt's serial: a pipe to virtlogd, handed over as it is.
		{name: "fdset of a pipe", argv: append(append([]string{}, good...), "-add-fd", "set=0,fd=21,opaque=serial0-source"),
			facts: func(f *Facts) {
				f.Fdsets = []FdsetFd{{Set: 0, Fd: 6, Opaque: "serial0-source", Target: "pipe:[239520]"}}
			}},
		{name: "fdset of a socket", argv: append(append([]string{}, good...), "-add-fd", "fd=9,set=1"),
			facts: func(f *Facts) { f.Fdsets = []FdsetFd{{Set: 1, Fd: 30, Target: "socket:[1234]"}} }, want: "not a file or a pipe"},
		{name: "fdset gone", argv: append(append([]string{}, good...), "-add-fd", "fd=9,set=1"), want: "does not hold it any more"},
		{name: "netdev socket fd", argv: append(append([]string{}, good...), "-netdev", "socket,id=s0,fd=9"),
			fds: map[int]discover.FdInfo{9: {Target: "socket:[1]"}}, want: "cannot re-create"},
		{name: "name with a slash", argv: append([]string{"-name", "a/b"}, good[2:]...), want: "holds '/'"},
		{name: "name ..", argv: append([]string{"-name", ".."}, good[2:]...), want: "is a path element of its own"},
		{name: "name with a control character", argv: append([]string{"-name", "vm\x1b[2J"}, good[2:]...), want: "control character"},
		{name: "name too long", argv: append([]string{"-name", strings.Repeat("v", 65)}, good[2:]...), want: "more than 64"},
		{name: "name not UTF-8", argv: append([]string{"-name", "vm\xff"}, good[2:]...), want: "not valid UTF-8"},
		{name: "name of 64 bytes ok", argv: append([]string{"-name", strings.Repeat("v", 64)}, good[2:]...)},
		{name: "unknown option", argv: append(append([]string{}, good...), "-frobnicate", "x"),
			want: "-frobnicate: an option liveupdate does not know"},
		{name: "QEMU 10 perf flag", argv: append(append([]string{}, good...), "-perfmap", "-jitdump")},
		{name: "missing fd", argv: append(append([]string{}, good...), "-netdev", "tap,id=n0,fd=7"), want: "no such fd open"},
		{name: "no room", argv: good, free: 1 << 20, want: "need at least 64 MiB"},
		{name: "relative kernel after -daemonize", argv: append(append([]string{}, good...), "-daemonize", "-kernel", "boot/vmlinuz"),
			want: "-kernel boot/vmlinuz cannot be found (relative to QEMU's working directory /; -daemonize changed it to /)"},
		{name: "snapshot", argv: append(append([]string{}, good...), "-snapshot"), want: "-snapshot"},
		// RAM that cannot be found again by its name (the hugetlbfs form:
		// QEMU makes an unlinked file inside the directory).
		{name: "mem-path a directory", argv: []string{"-machine", "pc,memory-backend=ram0", "-object", "memory-backend-file,id=ram0,size=1G,mem-path=/tmp,share=on", "-qmp", "unix:/q,server=on"},
			want: `mem-path /tmp is a directory`},
		{name: "RAM file gone", argv: []string{"-machine", "pc,memory-backend=ram0", "-object", "memory-backend-file,id=ram0,size=1G,mem-path=/nonexistent/ram,share=on", "-qmp", "unix:/q,server=on"},
			want: `RAM file /nonexistent/ram cannot be found`},
		{name: "memfd without aux-ram-share", argv: []string{"-machine", "pc,memory-backend=ram0", "-object", "memory-backend-memfd,id=ram0,size=1G", "-qmp", "unix:/q,server=on"},
			want: `memory backend "ram0" (memory-backend-memfd, machine): its RAM dies with its QEMU, and only QEMU's cpr-transfer hands a memfd to a new one — which this guest cannot use: it was started without -machine aux-ram-share=on. Start it with -machine aux-ram-share=on`},
		{name: "memfd, QEMU 9", argv: []string{"-machine", "pc,memory-backend=ram0,aux-ram-share=on", "-object", "memory-backend-memfd,id=ram0,size=1G", "-qmp", "unix:/q,server=on"},
			facts: func(f *Facts) { f.Version = [3]int{9, 2, 0} }, want: "QEMU 9.2 has no cpr-transfer"},
		{name: "memfd share=off", argv: []string{"-machine", "pc,memory-backend=ram0,aux-ram-share=on", "-object", "memory-backend-memfd,id=ram0,size=1G,share=off", "-qmp", "unix:/q,server=on"},
			want: `is not a memory-backend-file`},
		// An inherited fd as mem-path: judged by QEMU's fd of that number,
		// whatever fd the checker itself holds under it (0: stdin, open in
		// every test).
		{name: "mem-path an inherited fd QEMU closed", argv: memfdArgv("/proc/self/fd/0"),
			want: `names fd 0, which QEMU does not hold any more`},
		{name: "mem-path an inherited memfd", argv: memfdArgv("/proc/self/fd/5"),
			fds: map[int]discover.FdInfo{5: {Target: "/memfd:guest-ram (deleted)"}}},
		{name: "mem-path /dev/fd/N, a memfd", argv: memfdArgv("/dev/fd/7"),
			fds: map[int]discover.FdInfo{7: {Target: "/memfd:ram0 (deleted)"}}},
		// A number no fd of the checker's has: only QEMU's fd table counts.
		{name: "mem-path a memfd at a number the checker has not open", argv: memfdArgv("/proc/self/fd/999"),
			fds: map[int]discover.FdInfo{999: {Target: "/memfd:ram0 (deleted)"}}},
		{name: "mem-path an inherited regular file", argv: memfdArgv("/proc/self/fd/5"),
			fds:  map[int]discover.FdInfo{5: {Target: "/srv/vm1.ram"}},
			want: `is fd 5, /srv/vm1.ram, not a memfd: give mem-path the file's name`},
		{name: "mem-path an inherited hugetlb memfd", argv: memfdArgv("/proc/self/fd/5"),
			fds:  map[int]discover.FdInfo{5: {Target: "/memfd:ram (deleted)", Hugetlb: true}},
			want: `a hugetlb memfd`},
		{name: "mem-path an inherited memfd, share=off", argv: []string{"-machine", "pc,memory-backend=ram0", "-object", "memory-backend-file,id=ram0,size=1G,mem-path=/proc/self/fd/5,share=off", "-qmp", "unix:/q,server=on"},
			fds:  map[int]discover.FdInfo{5: {Target: "/memfd:guest-ram (deleted)"}},
			want: `has share=off`},
		// restart-qemu takes it by cpr-transfer; an update refuses it
		// (TestMemfdUpdateOnly).
		{name: "memfd with aux-ram-share", argv: []string{"-machine", "pc,memory-backend=ram0,aux-ram-share=on", "-object", "memory-backend-memfd,id=ram0,size=1G", "-qmp", "unix:/q,server=on"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := proc(t, tt.argv...)
			if tt.fds != nil {
				p.Fds = tt.fds
			}
			f := facts()
			if tt.facts != nil {
				tt.facts(&f)
			}
			free := tt.free
			if free == 0 {
				free = 1 << 30
			}
			v := Check(Input{Proc: p, Facts: f, StateDir: t.TempDir(), StateDirFree: free})
			if tt.want == "" {
				if !v.OK {
					t.Fatalf("want OK, got %v", v.Problems)
				}
				return
			}
			if v.OK {
				t.Fatalf("want a problem containing %q, got OK", tt.want)
			}
			if !strings.Contains(strings.Join(v.Problems, "\n"), tt.want) {
				t.Fatalf("problems %q do not mention %q", v.Problems, tt.want)
			}
		})
	}
}

// TestMemfdUpdateOnly: a memfd guest restart-qemu can take by cpr-transfer
// carries the reason an update cannot, apart from its problems.
func TestMemfdUpdateOnly(t *testing.T) {
	argv := []string{"-machine", "pc,memory-backend=ram0,aux-ram-share=on", "-object", "memory-backend-memfd,id=ram0,size=1G", "-qmp", "unix:/q,server=on"}
	v := Check(Input{Proc: proc(t, argv...), Facts: facts(), StateDir: t.TempDir(), StateDirFree: 1 << 30})
	if !v.OK || len(v.UpdateProblems) != 1 || !strings.Contains(v.UpdateProblems[0], "a kexec loses a memfd's RAM") {
		t.Fatalf("OK %v, problems %q, update problems %q", v.OK, v.Problems, v.UpdateProblems)
	}
	v = Check(Input{Proc: proc(t, good...), Facts: facts(), StateDir: t.TempDir(), StateDirFree: 1 << 30})
	if len(v.UpdateProblems) != 0 {
		t.Fatalf("a file-backed guest has update problems: %q", v.UpdateProblems)
	}
}

// TestLibvirtGuest: a guest libvirt manages is restarted only while no
// libvirt daemon runs (it holds the monitor and owns the record): with one
// running the guest is refused with the commands that take turns; an
// ineligible one is told the XML to add.
func TestLibvirtGuest(t *testing.T) {
	daemon := []libvirt.Daemon{{Name: "libvirtd", PID: 812}}
	noShare := []string{"-name", "vm1", "-machine", "pc,memory-backend=pc.ram", "-object", "memory-backend-ram,id=pc.ram,size=256M", "-qmp", "unix:/q,server=on"}
	for _, c := range []struct {
		name    string
		argv    []string
		daemons []libvirt.Daemon
		ok      bool
		want    []string // in the problems, or in the notes when ok
	}{
		{"eligible, daemon stopped", good, nil, true, []string{"libvirt manages this guest (/run/libvirt/qemu/vm1.xml): its record is rewritten for the new QEMU"}},
		{"eligible, daemon runs", good, daemon, false, []string{"its daemon runs: libvirtd (pid 812)",
			"`systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket`",
			"`systemctl start libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket libvirtd.service`"}},
		{"no shared RAM", noShare, nil, false, []string{"add " + LibvirtXML + " to its domain XML (virsh edit vm1", "memory_backing_dir"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := facts()
			if c.daemons != nil {
				f.QMPErr = fmt.Errorf("%s holds this guest's monitor: %w", c.daemons[0], libvirt.ErrDaemonRuns)
			}
			v := Check(Input{Proc: proc(t, c.argv...), Facts: f, StateDir: t.TempDir(), StateDirFree: 1 << 30,
				Libvirt: "/run/libvirt/qemu/vm1.xml", LibvirtDaemons: c.daemons})
			all := strings.Join(v.Problems, "\n")
			if c.ok {
				all = strings.Join(v.Notes, "\n")
			}
			for _, w := range c.want {
				if !strings.Contains(all, w) {
					t.Errorf("lacks %q:\n%s", w, all)
				}
			}
			if v.OK != c.ok {
				t.Errorf("OK = %v, want %v; problems: %v", v.OK, c.ok, v.Problems)
			}
			if c.daemons != nil && strings.Contains(strings.Join(v.Problems, "\n"), "QMP:") {
				t.Errorf("the monitor held by libvirt's daemon is said twice: %v", v.Problems)
			}
		})
	}
}

// TestNUMAPlacement: a backend bound to host nodes whose RAM file is on
// another node's PMEM is refused, naming both; the same file on a node it
// allows, a policy that does not bind, or memory sysfs gives no node for
// pass.
func TestNUMAPlacement(t *testing.T) {
	onNode := func(n int) func(string) (int, string, bool) {
		return func(string) (int, string, bool) { return n, fmt.Sprintf("/dev/pmem%d", n), true }
	}
	unknown := func(string) (int, string, bool) { return 0, "", false }
	backend := func(extra string) []string {
		return []string{"-name", "vm1", "-machine", "pc,memory-backend=ram0",
			"-object", "memory-backend-file,id=ram0,size=256M,mem-path=/dev/null,share=on" + extra, "-qmp", "unix:/q,server=on"}
	}
	for _, c := range []struct {
		name    string
		argv    []string
		memNode func(string) (int, string, bool)
		want    string
	}{
		{"bound to its own node", backend(",host-nodes=1,policy=bind"), onNode(1), ""},
		{"bound to another node", backend(",host-nodes=0,policy=bind"), onNode(1),
			`memory backend "ram0" (machine): its RAM is bound to host node(s) [0] (host-nodes, policy=bind), but its file /dev/null is on /dev/pmem1, memory of node 1`},
		{"preferred, other node", backend(",host-nodes=0,policy=preferred"), onNode(1), "memory of node 1"},
		{"one of its nodes", backend(",host-nodes=0-1,policy=bind"), onNode(1), ""},
		{"interleave is not a placement", backend(",host-nodes=0,policy=interleave"), onNode(1), ""},
		{"no host-nodes", backend(""), onNode(1), ""},
		{"node unknown", backend(",host-nodes=0,policy=bind"), unknown, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := Check(Input{Proc: proc(t, c.argv...), Facts: facts(), StateDir: t.TempDir(), StateDirFree: 1 << 30, MemNode: c.memNode})
			got := strings.Join(v.Problems, "\n")
			if c.want == "" && !v.OK || c.want != "" && !strings.Contains(got, c.want) {
				t.Errorf("problems %q, want %q", got, c.want)
			}
		})
	}
}

// TestMemNodeUnknown: memory sysfs gives no node for — a character device
// that is not device-DAX, a missing file — is not placed on any node.
func TestMemNodeUnknown(t *testing.T) {
	for _, p := range []string{"/dev/null", "/nonexistent"} {
		if n, dev, ok := MemNode(p); ok {
			t.Errorf("MemNode(%q) = node %d of %s", p, n, dev)
		}
	}
}

// TestMappingProblem: a RAM file is accepted only when QEMU's maps hold
// that very file (its device and inode), not another under its name.
func TestMappingProblem(t *testing.T) {
	f := filepath.Join(t.TempDir(), "ram")
	if err := os.WriteFile(f, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(f, &st); err != nil {
		t.Fatal(err)
	}
	line := func(major, minor uint32, ino uint64, path string) string {
		return fmt.Sprintf("7f0000000000-7f0010000000 rw-s 00000000 %02x:%02x %d                    %s\n", major, minor, ino, path)
	}
	mapped := line(unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino, f)
	b := qemuargv.MemoryBackend{ID: "ram0", MemPath: f}
	for _, c := range []struct {
		name, maps string
		ok         bool
	}{
		{"mapped", "55d0c0000000-55d0c0001000 r--p 00000000 fd:01 131 /usr/bin/qemu-system-x86_64\n" + mapped, true},
		{"not known", "", true},
		{"replaced: same name, another inode", line(unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino+1, f+" (deleted)"), false},
		{"same inode on another device", line(unix.Major(st.Dev)+1, unix.Minor(st.Dev), st.Ino, f), false},
		{"garbage", "not a maps line\n\n", false},
	} {
		pr := mappingProblem(b, f, c.maps)
		if (pr == "") != c.ok {
			t.Errorf("%s: %q, want ok=%v", c.name, pr, c.ok)
		}
		if !c.ok && !strings.Contains(pr, "a new QEMU would start on the wrong RAM") {
			t.Errorf("%s: %q does not say what is at stake", c.name, pr)
		}
	}
}

// FuzzMaps: /proc/PID/maps is read as it comes; no content may make the
// check panic, and a maps without the file's own dev:inode never passes it.
func FuzzMaps(f *testing.F) {
	f.Add("7f0000000000-7f0010000000 rw-s 00000000 fd:01 131 /dev/shm/ram\n")
	f.Add("55d0c0000000-55d0c0001000 r--p 00000000 00:00 0 \n\n   \nx y z w v\n")
	f.Add("a b c zz:yy 99999999999999999999999 /x\n")
	ram := filepath.Join(f.TempDir(), "ram")
	if err := os.WriteFile(ram, nil, 0o600); err != nil {
		f.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(ram, &st); err != nil {
		f.Fatal(err)
	}
	own := fmt.Sprintf("%x:%x %d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	f.Fuzz(func(t *testing.T, maps string) {
		pr := mappingProblem(qemuargv.MemoryBackend{ID: "ram0", MemPath: ram}, ram, maps)
		if maps != "" && pr == "" && !strings.Contains(maps, fmt.Sprintf("%d", st.Ino)) {
			t.Fatalf("passed without the file's inode (%s) in maps %q", own, maps)
		}
		qemuargv.InheritedFd(maps)
	})
}
