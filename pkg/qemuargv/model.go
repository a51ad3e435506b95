package qemuargv

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Name returns the VM's -name (its "guest=" or first element), or "".
func (c *Cmdline) Name() string {
	for _, i := range c.Find("name") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		if v, ok := p.Get("guest"); ok {
			return v
		}
	}
	return ""
}

// MachineType returns the -machine/-M type as given ("pc", "q35",
// "pc-q35-8.2"), or "" when QEMU's default machine is used.
func (c *Cmdline) MachineType() string {
	t := ""
	for _, i := range c.Find("machine", "M") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		if v, ok := p.Get("type"); ok {
			t = v // the last one wins, as in QEMU
		}
	}
	return t
}

// UsesKVM tells whether the command line asks for KVM: -enable-kvm,
// -accel kvm, or -machine accel= naming kvm (also as the first of a
// fallback list, kvm:tcg).
func (c *Cmdline) UsesKVM() bool {
	if len(c.Find("enable-kvm")) > 0 {
		return true
	}
	var accels []string
	for _, i := range c.Find("accel") {
		if p, err := c.Opts[i].Props(); err == nil {
			if v, ok := p.Get("accel"); ok {
				accels = append(accels, v)
			}
		}
	}
	if v, ok := c.machineProp("accel"); ok {
		accels = append(accels, strings.Split(v, ":")...)
	}
	return slices.Contains(accels, "kvm")
}

// machineProp returns a -machine property (memory-backend=, …).
func (c *Cmdline) machineProp(key string) (string, bool) {
	val, found := "", false
	for _, i := range c.Find("machine", "M") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		if v, ok := p.Get(key); ok {
			val, found = v, true
		}
	}
	return val, found
}

// MemoryBackend is one -object memory-backend-*.
type MemoryBackend struct {
	ID      string `json:"id"`
	Type    string `json:"type"`
	MemPath string `json:"mem_path,omitempty"`
	Size    uint64 `json:"size"`
	Share   bool   `json:"share"`
	// DiscardData (memory-backend-file): QEMU punches the RAM file out
	// when it quits.
	DiscardData bool `json:"discard_data,omitempty"`
	// HostNodes and Policy: the host NUMA nodes the backend's RAM is
	// bound to (host-nodes=0-1, repeated, or a JSON list) and how
	// (default, preferred, bind, interleave).
	HostNodes []int  `json:"host_nodes,omitempty"`
	Policy    string `json:"policy,omitempty"`
}

// File is the backend's RAM file by name, "" when it has none: no
// mem-path, or a mem-path naming QEMU's own fd (InheritedFd: a memfd,
// kept by its fd and not by a name).
func (b MemoryBackend) File() string {
	if InheritedFd(b.MemPath) >= 0 {
		return ""
	}
	return b.MemPath
}

// RAM tells where a guest's RAM lives.
type RAM struct {
	// Backends are all memory-backend objects on the command line.
	Backends []MemoryBackend
	// Used maps the IDs of backends that hold guest RAM to what uses them
	// ("machine", "numa node 1", "pc-dimm dimm0").
	Used map[string]string
	// Implicit, when not empty, describes guest RAM that QEMU allocates
	// itself (anonymous, private): such RAM does not survive a restart.
	Implicit string
	// Size is the guest's boot RAM size from -m, in bytes (0 if unknown).
	Size uint64
}

// hostNodes reads host-nodes values: "N", "A-B" (QemuOpts' ranges), each
// possibly repeated, or one JSON list.
func hostNodes(vals []string) ([]int, error) {
	var out []int
	for _, v := range vals {
		if strings.HasPrefix(v, "[") {
			var ns []int
			if err := json.Unmarshal([]byte(v), &ns); err != nil {
				return nil, fmt.Errorf("host-nodes %s: %w", v, err)
			}
			out = append(out, ns...)
			continue
		}
		lo, hi, isRange := strings.Cut(v, "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		if err != nil || a < 0 || b < a || b-a > 4096 {
			return nil, fmt.Errorf("host-nodes=%s: not a node number or range", v)
		}
		for n := a; n <= b; n++ {
			out = append(out, n)
		}
	}
	return out, nil
}

// RAM analyses the memory options.
func (c *Cmdline) RAM() (RAM, error) {
	r := RAM{Used: map[string]string{}}
	for _, i := range c.Find("object") {
		p, err := c.Opts[i].Props()
		if err != nil {
			return r, err
		}
		typ, _ := p.Get("qom-type")
		if !strings.HasPrefix(typ, "memory-backend-") {
			continue
		}
		b := MemoryBackend{Type: typ}
		b.ID, _ = p.Get("id")
		b.MemPath, _ = p.Get("mem-path")
		// memory-backend-file defaults to share=off, like every backend
		// but memfd (share=on by default since it exists to be shared).
		b.Share = p.Bool("share", typ == "memory-backend-memfd")
		b.DiscardData = typ == "memory-backend-file" && p.Bool("discard-data", false)
		b.Policy, _ = p.Get("policy")
		if b.HostNodes, err = hostNodes(p.All("host-nodes")); err != nil {
			return r, fmt.Errorf("memory backend %q: %w", b.ID, err)
		}
		if s, ok := p.Get("size"); ok {
			n, err := ParseSize(s)
			if err != nil {
				return r, fmt.Errorf("memory backend %q: %w", b.ID, err)
			}
			b.Size = n
		}
		r.Backends = append(r.Backends, b)
	}
	for _, i := range c.Find("m") {
		p, _ := c.Opts[i].Props()
		if s, ok := p.Get("size"); ok {
			n, err := ParseSize(s)
			if err == nil && !strings.ContainsAny(s, "kKmMgGtTbB") {
				n <<= 20 // a bare -m number is MiB
			}
			if err == nil {
				r.Size = n
			}
		}
	}

	numaNodes, numaImplicit := 0, 0
	for _, i := range c.Find("numa") {
		p, _ := c.Opts[i].Props()
		if t, _ := p.Get("type"); t != "node" {
			continue
		}
		id, _ := p.Get("nodeid")
		if id == "" {
			id = strconv.Itoa(numaNodes)
		}
		numaNodes++
		if m, ok := p.Get("memdev"); ok {
			r.Used[m] = "numa node " + id
		} else {
			numaImplicit++
		}
	}
	for _, i := range c.Find("device") {
		p, _ := c.Opts[i].Props()
		drv, _ := p.Get("driver")
		if m, ok := p.Get("memdev"); ok {
			id, _ := p.Get("id")
			r.Used[m] = strings.TrimSpace(drv + " " + id)
		}
	}
	mb, hasMB := c.machineProp("memory-backend")
	if hasMB {
		r.Used[mb] = "machine"
	}
	legacyPath := ""
	if idx := c.Find("mem-path"); len(idx) > 0 {
		legacyPath = c.Opts[idx[len(idx)-1]].Value
	}
	switch {
	case hasMB:
	case numaNodes > 0 && numaImplicit == 0:
	case numaImplicit > 0:
		r.Implicit = fmt.Sprintf("%d NUMA node(s) without memdev=", numaImplicit)
	case legacyPath != "":
		r.Implicit = fmt.Sprintf("-mem-path %s (a private file mapping)", legacyPath)
	default:
		r.Implicit = "-m without -machine memory-backend= (anonymous private RAM)"
	}
	return r, nil
}

// Netdev is one -netdev.
type Netdev struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Ifname   string `json:"ifname,omitempty"`
	Vhost    bool   `json:"vhost,omitempty"`
	Queues   int    `json:"queues,omitempty"`
	FDs      []int  `json:"fds,omitempty"`
	VhostFDs []int  `json:"vhostfds,omitempty"`
}

// Netdevs lists the -netdev options.
func (c *Cmdline) Netdevs() []Netdev {
	var out []Netdev
	for _, i := range c.Find("netdev") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		n := Netdev{}
		n.ID, _ = p.Get("id")
		n.Type, _ = p.Get("type")
		n.Ifname, _ = p.Get("ifname")
		n.Vhost = p.Bool("vhost", false)
		if q, ok := p.Get("queues"); ok {
			n.Queues, _ = strconv.Atoi(q)
		}
		for _, r := range c.fdRefsOf(i, p) {
			if r.Kind == FdVhost {
				n.VhostFDs = append(n.VhostFDs, r.Num)
			} else {
				n.FDs = append(n.FDs, r.Num)
			}
		}
		if len(n.VhostFDs) > 0 {
			n.Vhost = true
		}
		out = append(out, n)
	}
	return out
}

// FdKind says what a passed file descriptor is for.
type FdKind string

// The kinds of fds a QEMU command line can name.
const (
	FdTap     FdKind = "tap"       // -netdev tap,fd=/fds=
	FdVhost   FdKind = "vhost-net" // -netdev tap,vhostfd=/vhostfds=
	FdChardev FdKind = "chardev"   // -chardev socket,fd=
	FdFile    FdKind = "file"      // -add-fd fd=N,set=S: a file QEMU opens as /dev/fdset/S (libvirt's logs)
	FdMemfd   FdKind = "memfd"     // memory-backend-file,mem-path=/proc/self/fd/N: guest RAM in an inherited fd (a memfd)
	FdOther   FdKind = "other"     // anything else (-netdev socket,fd=, …)
)

// FdRef is one place in the command line that names an inherited fd.
type FdRef struct {
	Opt   int    `json:"opt"`   // index into Opts
	Key   string `json:"key"`   // fd, fds, vhostfd, vhostfds, mem-path
	Pos   int    `json:"pos"`   // position in a colon-separated list
	Num   int    `json:"num"`   // the fd number
	Kind  FdKind `json:"kind"`  // what it is for
	Owner string `json:"owner"` // id of the netdev/chardev, or the option name
}

var fdKeys = []string{"fd", "fds", "vhostfd", "vhostfds"}

// FdRefs lists every inherited fd the command line names, in order.
func (c *Cmdline) FdRefs() []FdRef {
	var out []FdRef
	for i, o := range c.Opts {
		if !o.HasValue || o.Name == "" {
			continue
		}
		p, err := o.Props()
		if err != nil {
			continue
		}
		out = append(out, c.fdRefsOf(i, p)...)
	}
	return out
}

func (c *Cmdline) fdRefsOf(i int, p *Props) []FdRef {
	o := c.Opts[i]
	var out []FdRef
	if o.Name == "object" {
		// Guest RAM QEMU opens through its own fd table: the fd is the
		// RAM (a memfd, most often), and a new QEMU needs it at the
		// number its mem-path names.
		if t, _ := p.Get("qom-type"); t == "memory-backend-file" {
			mp, _ := p.Get("mem-path")
			if n := InheritedFd(mp); n >= 0 {
				id, _ := p.Get("id")
				out = append(out, FdRef{Opt: i, Key: "mem-path", Num: n, Kind: FdMemfd, Owner: id})
			}
		}
	}
	for _, key := range fdKeys {
		v, ok := p.Get(key)
		if !ok || v == "" {
			continue
		}
		for pos, f := range strings.Split(v, ":") {
			n, err := strconv.Atoi(f)
			if err != nil {
				// A name (fds passed with QMP getfd) or /dev/fdset: not
				// something we can re-create.
				n = -1
			}
			r := FdRef{Opt: i, Key: key, Pos: pos, Num: n, Kind: FdOther, Owner: o.Name}
			id, _ := p.Get("id")
			switch o.Name {
			case "netdev":
				r.Owner = id
				if t, _ := p.Get("type"); t == "tap" {
					r.Kind = FdTap
					if strings.HasPrefix(key, "vhost") {
						r.Kind = FdVhost
					}
				}
			case "chardev":
				r.Owner = id
				if b, _ := p.Get("backend"); b == "socket" {
					r.Kind = FdChardev
				}
			case "add-fd":
				if set, ok := p.Get("set"); ok && key == "fd" {
					r.Kind, r.Owner = FdFile, "fdset "+set
				}
			}
			out = append(out, r)
		}
	}
	return out
}

// fdPathPrefixes are the paths by which a process opens its own fd N.
var fdPathPrefixes = []string{"/proc/self/fd/", "/dev/fd/", "/proc/thread-self/fd/"}

// InheritedFd is N when path names the opening process's own fd N
// (/proc/self/fd/N, /dev/fd/N), else -1.
func InheritedFd(path string) int {
	for _, pre := range fdPathPrefixes {
		if rest, ok := strings.CutPrefix(filepath.Clean(path), pre); ok {
			if n, err := strconv.Atoi(rest); err == nil && n >= 0 {
				return n
			}
		}
	}
	return -1
}

// FdsetOf tells, for an -add-fd reference, its set, its opaque and its
// place among the -add-fd options of that set.
func (c *Cmdline) FdsetOf(r FdRef) (set int, opaque string, nth int) {
	p, err := c.Opts[r.Opt].Props()
	if err != nil {
		return -1, "", 0
	}
	sv, _ := p.Get("set")
	set, _ = strconv.Atoi(sv)
	opaque, _ = p.Get("opaque")
	for _, i := range c.Find("add-fd") {
		if i >= r.Opt {
			break
		}
		if q, err := c.Opts[i].Props(); err == nil {
			if v, _ := q.Get("set"); v == sv {
				nth++
			}
		}
	}
	return set, opaque, nth
}

// Chardev is one -chardev.
type Chardev struct {
	ID      string
	Backend string
	Path    string
	FD      int // -1 when not passed by fd
	Server  bool
}

// Chardevs lists the -chardev options.
func (c *Cmdline) Chardevs() []Chardev {
	var out []Chardev
	for _, i := range c.Find("chardev") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		ch := Chardev{FD: -1}
		ch.ID, _ = p.Get("id")
		ch.Backend, _ = p.Get("backend")
		ch.Path, _ = p.Get("path")
		ch.Server = p.Bool("server", false)
		if f, ok := p.Get("fd"); ok {
			if n, err := strconv.Atoi(f); err == nil {
				ch.FD = n
			}
		}
		out = append(out, ch)
	}
	return out
}

// QMPEndpoint is a place where QEMU serves QMP.
type QMPEndpoint struct {
	Path    string `json:"path,omitempty"`    // unix socket path, when known from argv
	FD      int    `json:"fd"`                // listening socket passed by fd, else -1
	Chardev string `json:"chardev,omitempty"` // the -chardev id, if any
}

// QMPEndpoints lists the QMP monitors QEMU listens on as a unix-socket
// server: "-qmp unix:PATH,server=on" and "-chardev socket,…,server=on"
// with "-mon chardev=ID,mode=control". TCP monitors are not returned.
func (c *Cmdline) QMPEndpoints() []QMPEndpoint {
	var out []QMPEndpoint
	for _, i := range c.Find("qmp", "qmp-pretty") {
		p, _ := c.Opts[i].Props()
		dev, _ := p.Get("dev")
		if path, ok := strings.CutPrefix(dev, "unix:"); ok && p.Bool("server", false) {
			path = strings.TrimPrefix(path, "path=")
			out = append(out, QMPEndpoint{Path: path, FD: -1})
		}
	}
	chardevs := map[string]Chardev{}
	for _, ch := range c.Chardevs() {
		chardevs[ch.ID] = ch
	}
	for _, i := range c.Find("mon") {
		p, _ := c.Opts[i].Props()
		if m, _ := p.Get("mode"); m != "control" {
			continue
		}
		id, _ := p.Get("chardev")
		ch, ok := chardevs[id]
		if !ok || ch.Backend != "socket" || !ch.Server && ch.FD < 0 {
			continue
		}
		if ch.Path == "" && ch.FD < 0 {
			continue // a TCP socket
		}
		out = append(out, QMPEndpoint{Path: ch.Path, FD: ch.FD, Chardev: id})
	}
	return out
}

// Devices lists the -device drivers (e.g. for spotting vfio-pci).
func (c *Cmdline) Devices() []string {
	var out []string
	for _, i := range c.Find("device") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		d, _ := p.Get("driver")
		out = append(out, d)
	}
	return out
}

// FileRef is a file the command line names that must exist when QEMU starts.
type FileRef struct {
	Option string // e.g. "-kernel", "-object ram0 mem-path"
	Path   string
}

// InputFiles lists the files QEMU opens at start-up and needs to exist:
// kernel, initrd, dtb, firmware, RAM backing files, plain-file disks.
func (c *Cmdline) InputFiles() []FileRef {
	var out []FileRef
	for _, o := range c.Opts {
		switch o.Name {
		case "kernel", "initrd", "dtb", "bios":
			out = append(out, FileRef{Option: "-" + o.Name, Path: o.Value})
			continue
		case "object", "drive", "blockdev":
		default:
			continue
		}
		p, err := o.Props()
		if err != nil {
			continue
		}
		id, _ := p.Get("id")
		if id == "" {
			id, _ = p.Get("node-name")
		}
		switch o.Name {
		case "object":
			if t, _ := p.Get("qom-type"); t == "memory-backend-file" {
				if mp, ok := p.Get("mem-path"); ok {
					out = append(out, FileRef{Option: "-object " + id + " mem-path", Path: mp})
				}
			}
		case "drive":
			f, ok := p.Get("file")
			drv, _ := p.Get("driver")
			if ok && f != "" && !strings.Contains(f, ":") && (drv == "" || drv == "file" || drv == "raw" || drv == "qcow2") {
				out = append(out, FileRef{Option: "-drive " + id + " file", Path: f})
			}
		case "blockdev":
			if d, _ := p.Get("driver"); d == "file" {
				if f, ok := p.Get("filename"); ok {
					out = append(out, FileRef{Option: "-blockdev " + id + " filename", Path: f})
				}
			}
		}
	}
	return out
}

// DeviceArg is one -device: its driver, id and the drive= it attaches.
type DeviceArg struct {
	Driver, ID, Drive string
}

// DeviceArgs lists the -device options.
func (c *Cmdline) DeviceArgs() []DeviceArg {
	var out []DeviceArg
	for _, i := range c.Find("device") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		var d DeviceArg
		d.Driver, _ = p.Get("driver")
		d.ID, _ = p.Get("id")
		d.Drive, _ = p.Get("drive")
		out = append(out, d)
	}
	return out
}

// BlockArg is one block option: -drive, a shorthand that makes one (-hda,
// -cdrom, a positional image, …) or -blockdev.
type BlockArg struct {
	Option    string // "drive", "blockdev", "hda", "cdrom", …
	ID        string // -drive id= or -blockdev node-name= ("" if none)
	Driver    string // driver= (or -drive format=)
	File      string // the image: -drive file=, -blockdev filename=, the shorthand's value
	Child     string // -blockdev: the node-name its file= child refers to
	Interface string // -drive if= ("" if not given)
	Media     string // -drive media=
	Snapshot  bool   // -drive snapshot=on
}

var driveShorthands = map[string]bool{"hda": true, "hdb": true, "hdc": true, "hdd": true, "cdrom": true,
	"fda": true, "fdb": true, "mtdblock": true, "sd": true, "pflash": true}

// BlockArgs lists the block options in order.
func (c *Cmdline) BlockArgs() []BlockArg {
	var out []BlockArg
	for _, o := range c.Opts {
		switch {
		case o.Name == "" || driveShorthands[o.Name]:
			opt := o.Name
			if opt == "" {
				opt = "hda" // a positional argument is the first disk
			}
			out = append(out, BlockArg{Option: opt, File: o.Value})
		case o.Name == "drive" || o.Name == "blockdev":
			p, err := o.Props()
			if err != nil {
				continue
			}
			b := BlockArg{Option: o.Name}
			if o.Name == "drive" {
				b.ID, _ = p.Get("id")
				b.Driver, _ = p.Get("format")
				b.File, _ = p.Get("file")
				if f, ok := p.Get("file.filename"); ok {
					b.File = f
				}
				b.Interface, _ = p.Get("if")
				b.Media, _ = p.Get("media")
				b.Snapshot = p.Bool("snapshot", false)
			} else {
				b.ID, _ = p.Get("node-name")
				b.Driver, _ = p.Get("driver")
				b.File, _ = p.Get("filename")
				child, _ := p.Get("file")
				if f, ok := p.Get("file.filename"); ok {
					b.File = f
				} else if strings.HasPrefix(child, "{") {
					b.File = NestedFilename(child)
				} else {
					b.Child = child
				}
			}
			out = append(out, b)
		}
	}
	return out
}

// NestedFilename finds the filename of a block node given inline as JSON
// ({"driver":"qcow2","file":{"driver":"file","filename":…}}, as -blockdev
// takes it and QEMU reports it after "json:"), following
// the file children down.
func NestedFilename(js string) string {
	var m map[string]any
	if json.Unmarshal([]byte(js), &m) != nil {
		return ""
	}
	for m != nil {
		if f, ok := m["filename"].(string); ok {
			return f
		}
		m, _ = m["file"].(map[string]any)
	}
	return ""
}
