// Package libvirt reads and rewrites what libvirt's QEMU driver records of
// a running guest, so that after liveupdate replaced the guest's QEMU the
// daemon, when it starts again, reconnects to the new process instead of
// taking the guest for stopped and cleaning up after it (removing its
// memory-backing directory: the RAM of the guest running on).
//
// The record is the status file RunDir/NAME.xml (`<domstatus … pid='P'>`,
// the vCPU threads, the monitor path, the live domain XML) and RunDir/NAME.pid.
// Both are libvirt's: they are edited only while no libvirt daemon runs
// (Daemons), with the smallest change that names the new process — every
// other byte is kept as libvirt wrote it.
package libvirt

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// RunDir is where libvirt's QEMU driver keeps its record of each running
// guest (NAME.xml, NAME.pid), on tmpfs: a kexec erases it.
const RunDir = "/run/libvirt/qemu"

// Status is what liveupdate needs of one status file.
type Status struct {
	Name    string      // <domain><name>
	UUID    string      // <domain><uuid>
	PID     int         // <domstatus pid=…>: the guest's QEMU
	Monitor string      // <monitor path=…>
	Vcpus   map[int]int // <vcpus><vcpu id=… pid=…>: vCPU id → thread id
	// MountNS: <namespaces><mount/>: libvirt gave the QEMU a private mount
	// namespace and enters it to add device nodes (hot-plug).
	MountNS bool
}

// ParseStatus reads a status file's contents.
func ParseStatus(b []byte) (*Status, error) {
	s := &Status{Vcpus: map[int]int{}}
	var path []string
	seenRoot := false
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("libvirt status XML: %w", err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			path = append(path, t.Name.Local)
			at := strings.Join(path, "/")
			switch at {
			case "domstatus":
				seenRoot = true
				p, err := intAttr(t, "pid")
				if err != nil {
					return nil, fmt.Errorf("libvirt status XML: <domstatus>: %w", err)
				}
				s.PID = p
			case "domstatus/monitor":
				s.Monitor = attr(t, "path")
			case "domstatus/namespaces/mount":
				s.MountNS = true
			case "domstatus/vcpus/vcpu":
				id, err := intAttr(t, "id")
				if err != nil {
					return nil, fmt.Errorf("libvirt status XML: <vcpu>: %w", err)
				}
				tid, err := intAttr(t, "pid")
				if err != nil {
					return nil, fmt.Errorf("libvirt status XML: <vcpu id='%d'>: %w", id, err)
				}
				s.Vcpus[id] = tid
			case "domstatus/domain/name":
				var n string
				if err := d.DecodeElement(&n, &t); err != nil {
					return nil, fmt.Errorf("libvirt status XML: <name>: %w", err)
				}
				s.Name = strings.TrimSpace(n)
				path = path[:len(path)-1]
			case "domstatus/domain/uuid":
				var u string
				if err := d.DecodeElement(&u, &t); err != nil {
					return nil, fmt.Errorf("libvirt status XML: <uuid>: %w", err)
				}
				s.UUID = strings.TrimSpace(u)
				path = path[:len(path)-1]
			}
		case xml.EndElement:
			if len(path) > 0 {
				path = path[:len(path)-1]
			}
		}
	}
	switch {
	case !seenRoot:
		return nil, errors.New("libvirt status XML: no <domstatus> element")
	case s.PID <= 0:
		return nil, errors.New("libvirt status XML: <domstatus> names no pid")
	case s.Name == "":
		return nil, errors.New("libvirt status XML: no <domain><name>")
	}
	return s, nil
}

func attr(t xml.StartElement, name string) string {
	for _, a := range t.Attr {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

func intAttr(t xml.StartElement, name string) (int, error) {
	v := attr(t, name)
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("attribute %s=%q is not a number", name, v)
	}
	return n, nil
}

// Change is what a rewrite puts into a status file.
type Change struct {
	PID   int         // the new QEMU
	Vcpus map[int]int // vCPU id → the new QEMU's thread id (query-cpus-fast)
	// DropMountNS removes <namespaces><mount/>: the new QEMU runs in the
	// host's mount namespace, so libvirt must not look for a private one.
	DropMountNS bool
}

// Rewrite returns the status file b naming the new process: the pid of
// <domstatus>, every vCPU thread, and (DropMountNS) no private mount
// namespace. Everything else is kept byte for byte. A vCPU of the record
// that the change does not name, or the other way round, is an error: the
// record and the new QEMU would disagree on the guest's shape.
func Rewrite(b []byte, c Change) ([]byte, error) {
	old, err := ParseStatus(b)
	if err != nil {
		return nil, err
	}
	if c.PID <= 0 {
		return nil, fmt.Errorf("rewriting libvirt's record of %s: no new pid", old.Name)
	}
	if len(c.Vcpus) != len(old.Vcpus) {
		return nil, fmt.Errorf("rewriting libvirt's record of %s: it lists %d vCPU threads, the new QEMU has %d", old.Name, len(old.Vcpus), len(c.Vcpus))
	}
	for id := range old.Vcpus {
		if tid, ok := c.Vcpus[id]; !ok {
			return nil, fmt.Errorf("rewriting libvirt's record of %s: the new QEMU has no vCPU %d", old.Name, id)
		} else if tid <= 0 {
			return nil, fmt.Errorf("rewriting libvirt's record of %s: vCPU %d has no thread id (%d)", old.Name, id, tid)
		}
	}
	type edit struct {
		start, end int
		repl       string
	}
	var edits []edit
	var path []string
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		before := int(d.InputOffset())
		tok, err := d.RawToken()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("libvirt status XML: %w", err)
		}
		after := int(d.InputOffset())
		switch t := tok.(type) {
		case xml.StartElement:
			path = append(path, t.Name.Local)
			tag := string(b[before:after])
			switch strings.Join(path, "/") {
			case "domstatus":
				n, err := setPID(tag, c.PID)
				if err != nil {
					return nil, err
				}
				edits = append(edits, edit{before, after, n})
			case "domstatus/vcpus/vcpu":
				id, _ := intAttr(t, "id")
				n, err := setPID(tag, c.Vcpus[id])
				if err != nil {
					return nil, err
				}
				edits = append(edits, edit{before, after, n})
			case "domstatus/namespaces":
				if c.DropMountNS {
					end, err := elementEnd(d)
					if err != nil {
						return nil, err
					}
					// The whole line: libvirt's own files indent by two.
					start := before
					for start > 0 && (b[start-1] == ' ' || b[start-1] == '\t') {
						start--
					}
					if end < len(b) && b[end] == '\n' {
						end++
					}
					edits = append(edits, edit{start, end, ""})
					path = path[:len(path)-1]
				}
			}
		case xml.EndElement:
			if len(path) > 0 {
				path = path[:len(path)-1]
			}
		}
	}
	sort.Slice(edits, func(i, j int) bool { return edits[i].start < edits[j].start })
	var out bytes.Buffer
	last := 0
	for _, e := range edits {
		out.Write(b[last:e.start])
		out.WriteString(e.repl)
		last = e.end
	}
	out.Write(b[last:])
	return out.Bytes(), nil
}

// elementEnd skips to the end of the element just opened and returns the
// offset after its end tag.
func elementEnd(d *xml.Decoder) (int, error) {
	depth := 1
	for depth > 0 {
		tok, err := d.RawToken()
		if err != nil {
			return 0, fmt.Errorf("libvirt status XML: %w", err)
		}
		switch tok.(type) {
		case xml.StartElement:
			depth++ // <x/> too: RawToken gives it an end of its own
		case xml.EndElement:
			depth--
		}
	}
	return int(d.InputOffset()), nil
}

var pidAttr = regexp.MustCompile(`(\spid=)(['"])\d+(['"])`)

// setPID sets the pid attribute of one start tag as libvirt wrote it.
func setPID(tag string, v int) (string, error) {
	if !pidAttr.MatchString(tag) {
		return "", fmt.Errorf("libvirt status XML: %s has no pid attribute", tag)
	}
	return pidAttr.ReplaceAllString(tag, "${1}${2}"+strconv.Itoa(v)+"${3}"), nil
}

// Find is the status file in dir that names pid as its guest's QEMU, ""
// when none does (libvirt does not manage that QEMU).
func Find(dir string, pid int) string {
	files, _ := filepath.Glob(filepath.Join(dir, "*.xml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if s, err := ParseStatus(b); err == nil && s.PID == pid {
			return f
		}
	}
	return ""
}

// PidFile is the pid file beside a status file (NAME.pid).
func PidFile(status string) string { return strings.TrimSuffix(status, ".xml") + ".pid" }

// WriteStatus replaces a status file (and its pid file) by the rewritten
// record: a temporary file beside it, synced, renamed over it — libvirt's
// daemon, starting at any instant, reads the old record or the new one,
// never half of one. It refuses while a libvirt daemon runs (procRoot:
// /proc as we see it).
func WriteStatus(procRoot, path string, b []byte, pid int) error {
	if ds := Daemons(procRoot); len(ds) > 0 {
		return fmt.Errorf("not rewriting %s while %s runs: %w", path, ds[0], ErrDaemonRuns)
	}
	// After a kexec /run is new: libvirt's directories are made as
	// libvirt makes them (only root reads its records).
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("rewriting %s: %w", path, err)
	}
	if err := replaceFile(path, b, 0o600); err != nil {
		return err
	}
	return replaceFile(PidFile(path), []byte(strconv.Itoa(pid)), 0o644)
}

// replaceFile writes b over path, keeping path's mode (mode if new).
func replaceFile(path string, b []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".lu-*")
	if err != nil {
		return fmt.Errorf("rewriting %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if st, err := os.Stat(path); err == nil {
		mode = st.Mode().Perm()
	}
	tmp.Chmod(mode)
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("rewriting %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("rewriting %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("rewriting %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rewriting %s: %w", path, err)
	}
	return nil
}

// FdsetFile is the file behind an -add-fd set libvirt passes as a pipe to
// virtlogd, named by the set's opaque: "ALIAS-source" is the source path of
// the chardev device ALIAS (a file serial console, say), "ALIAS-log" its
// <log file>; "" when the record names no such file. After a kexec the
// pipe is gone with virtlogd's old process, and the new QEMU writes the
// very file instead (appending, as virtlogd did).
func FdsetFile(b []byte, opaque string) string {
	alias, kind, ok := cutLast(opaque, "-")
	if !ok || (kind != "source" && kind != "log") {
		return ""
	}
	var st struct {
		Domain struct {
			Devices struct {
				Any []struct {
					Alias struct {
						Name string `xml:"name,attr"`
					} `xml:"alias"`
					Source struct {
						Path string `xml:"path,attr"`
					} `xml:"source"`
					Log struct {
						File string `xml:"file,attr"`
					} `xml:"log"`
				} `xml:",any"`
			} `xml:"devices"`
		} `xml:"domain"`
	}
	if err := xml.Unmarshal(b, &st); err != nil {
		return ""
	}
	for _, d := range st.Domain.Devices.Any {
		if d.Alias.Name != alias {
			continue
		}
		if kind == "source" {
			return d.Source.Path
		}
		return d.Log.File
	}
	return ""
}

func cutLast(s, sep string) (before, after string, ok bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}
