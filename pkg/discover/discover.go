// Package discover finds running QEMU processes through /proc, without
// libvirt: their argv, working directory, environment, credentials, cgroup,
// network namespace and the files behind the fds their command line names
// (tap devices by name, from fdinfo; listening sockets by path).
package discover

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// Process is one running QEMU.
type Process struct {
	PID       int
	StartTime uint64 // clock ticks after boot; with PID, identifies the process
	Exe       string // resolved /proc/PID/exe
	Argv      []string
	Cmdline   *qemuargv.Cmdline
	Cwd       string
	Env       []string
	UID, GID  uint32
	Groups    []uint32
	Cgroup    string // cgroup v2 path ("0::" entry)
	NetNS     string // "net:[inode]"
	Fds       map[int]FdInfo
}

// Name is the VM's -name, else "pid-N".
func (p *Process) Name() string {
	if n := p.Cmdline.Name(); n != "" {
		return n
	}
	return "pid-" + strconv.Itoa(p.PID)
}

// FdInfo describes an open fd of the process.
type FdInfo struct {
	Target     string // readlink of /proc/PID/fd/N
	TapName    string // for /dev/net/tun: the interface (fdinfo "iff:")
	SocketPath string // for a unix socket: its bound path, if any
	Hugetlb    bool   // for a memfd: one on hugetlbfs (MFD_HUGETLB)
	// Unnamed: a file of shared memory (tmpfs or hugetlbfs) with no link
	// left — a memfd whatever its link reads, such as one the kernel's LUO
	// handed back after a kexec (it has no name: "/ (deleted)"), or a shm
	// file deleted while open.
	Unnamed bool
}

// Memfd tells whether the fd is a memfd: memfd_create's (its link reads
// "/memfd:NAME (deleted)") or any other file of shared memory no name leads
// to (Unnamed) — what a restart hands on by fd and LUO keeps across a
// kexec (it takes any unlinked shmem file); shmem or hugetlb (Hugetlb).
func (fi FdInfo) Memfd() bool { return strings.HasPrefix(fi.Target, "/memfd:") || fi.Unnamed }

// unnamedShm tells, of the file open at path (/proc/PID/fd/N), whether it
// is shared memory without a link (FdInfo.Unnamed), and whether hugetlb.
func unnamedShm(path string) (unnamed, hugetlb bool) {
	var fs unix.Statfs_t
	var st unix.Stat_t
	if unix.Statfs(path, &fs) != nil || unix.Stat(path, &st) != nil {
		return false, false
	}
	shm := fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.HUGETLBFS_MAGIC
	return shm && st.Nlink == 0 && st.Mode&unix.S_IFMT == unix.S_IFREG, fs.Type == unix.HUGETLBFS_MAGIC
}

// IsQEMU tells whether a process whose /proc/PID/exe resolves to exe is a
// QEMU system emulator: the executable's base name (" (deleted)" stripped:
// an upgraded binary) is qemu-system-* or qemu-kvm. argv[0] is not looked
// at: any user can name any process qemu-system-x86_64. The executable is
// what the kernel ran; only whoever can write a directory of binaries can
// name one, and a false QEMU is caught later anyway (its monitor must be
// served by that very process: qmp.DialPeer).
func IsQEMU(exe string) bool {
	b := filepath.Base(strings.TrimSuffix(exe, " (deleted)"))
	return exe != "" && (strings.HasPrefix(b, "qemu-system-") || b == "qemu-kvm")
}

// All returns every QEMU process under procRoot ("/proc"), by PID.
func All(procRoot string) ([]*Process, error) {
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	var out []*Process
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join(procRoot, e.Name(), "exe"))
		if err != nil || !IsQEMU(exe) {
			continue // a kernel thread, not ours to read, or not QEMU
		}
		p, err := Inspect(procRoot, pid)
		if err != nil {
			continue // exited meanwhile
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out, nil
}

// Inspect reads everything about one process.
func Inspect(procRoot string, pid int) (*Process, error) {
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	p := &Process{PID: pid, Fds: map[int]FdInfo{}}
	var err error
	if p.Argv, err = readArgv(procRoot, pid); err != nil {
		return nil, err
	}
	if p.Cmdline, err = qemuargv.Parse(p.Argv); err != nil {
		return nil, fmt.Errorf("pid %d: %w", pid, err)
	}
	p.Exe, _ = os.Readlink(filepath.Join(dir, "exe"))
	p.Exe = strings.TrimSuffix(p.Exe, " (deleted)") // an upgraded binary
	if p.Cwd, err = os.Readlink(filepath.Join(dir, "cwd")); err != nil {
		return nil, fmt.Errorf("pid %d: reading cwd: %w", pid, err)
	}
	if env, err := os.ReadFile(filepath.Join(dir, "environ")); err == nil {
		p.Env = splitNul(env)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "stat")); err == nil {
		p.StartTime = parseStartTime(string(b))
	}
	if err := p.readStatus(filepath.Join(dir, "status")); err != nil {
		return nil, err
	}
	if b, err := os.ReadFile(filepath.Join(dir, "cgroup")); err == nil {
		p.Cgroup = ParseCgroup(string(b))
	}
	p.NetNS, _ = os.Readlink(filepath.Join(dir, "ns", "net"))

	var unixPaths map[string]string
	for _, r := range p.Cmdline.FdRefs() {
		if r.Num < 0 {
			continue
		}
		fi := FdInfo{}
		fi.Target, err = os.Readlink(filepath.Join(dir, "fd", strconv.Itoa(r.Num)))
		if err != nil {
			continue // the argv names an fd the process no longer has
		}
		switch {
		case fi.Target == "/dev/net/tun":
			if b, err := os.ReadFile(filepath.Join(dir, "fdinfo", strconv.Itoa(r.Num))); err == nil {
				fi.TapName = ParseTunFdinfo(string(b))
			}
		case strings.HasSuffix(fi.Target, " (deleted)"): // memfds are, and LUO's have no other sign
			fi.Unnamed, fi.Hugetlb = unnamedShm(filepath.Join(dir, "fd", strconv.Itoa(r.Num)))
		case strings.HasPrefix(fi.Target, "socket:["):
			if unixPaths == nil {
				unixPaths = readUnixSockets(filepath.Join(dir, "net", "unix"))
			}
			fi.SocketPath = unixPaths[strings.TrimSuffix(strings.TrimPrefix(fi.Target, "socket:["), "]")]
		}
		p.Fds[r.Num] = fi
	}
	return p, nil
}

func readArgv(procRoot string, pid int) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return nil, err
	}
	return splitNul(b), nil
}

func splitNul(b []byte) []string {
	s := strings.TrimSuffix(string(b), "\x00")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\x00")
}

// parseStartTime reads field 22 of /proc/PID/stat; the comm field may hold
// spaces and parentheses, so fields are counted after the last ')'.
func parseStartTime(stat string) uint64 {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 20 {
		return 0
	}
	n, _ := strconv.ParseUint(f[19], 10, 64)
	return n
}

func (p *Process) readStatus(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("pid %d: %w", p.PID, err)
	}
	return p.parseStatus(string(b))
}

// parseStatus takes the credentials from /proc/PID/status.
func (p *Process) parseStatus(s string) error {
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fs := strings.Fields(v)
		switch k {
		case "Uid":
			if len(fs) > 0 {
				n, _ := strconv.ParseUint(fs[0], 10, 32)
				p.UID = uint32(n)
			}
		case "Gid":
			if len(fs) > 0 {
				n, _ := strconv.ParseUint(fs[0], 10, 32)
				p.GID = uint32(n)
			}
		case "Groups":
			for _, g := range fs {
				n, err := strconv.ParseUint(g, 10, 32)
				if err == nil {
					p.Groups = append(p.Groups, uint32(n))
				}
			}
		}
	}
	return sc.Err()
}

// ParseCgroup returns the cgroup v2 path from /proc/PID/cgroup ("0::/x").
func ParseCgroup(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return p
		}
	}
	return ""
}

// ParseFdinfoFlags returns the open flags of an fdinfo ("flags:\t0102001",
// octal); -1 when there is none.
func ParseFdinfoFlags(fdinfo string) int {
	for _, l := range strings.Split(fdinfo, "\n") {
		if v, ok := strings.CutPrefix(l, "flags:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			if err != nil {
				return -1
			}
			return int(n)
		}
	}
	return -1
}

// ParseTunFdinfo returns the interface name from a tun fd's fdinfo ("iff:").
func ParseTunFdinfo(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if v, ok := strings.CutPrefix(l, "iff:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// readUnixSockets maps socket inode → bound path from a /proc/net/unix file.
func readUnixSockets(path string) map[string]string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return ParseNetUnix(string(b))
}

// ParseNetUnix parses /proc/net/unix into inode → path (bound sockets only).
func ParseNetUnix(s string) map[string]string {
	m := map[string]string{}
	for i, l := range strings.Split(s, "\n") {
		f := strings.Fields(l)
		if i == 0 || len(f) < 8 {
			continue
		}
		m[f[6]] = f[7]
	}
	return m
}
