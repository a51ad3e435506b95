package mounts

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// FstabEntry is one line of the host's /etc/fstab (fstab(5)).
type FstabEntry struct {
	Spec, Dir, FSType, Opts string
	Line                    int
}

// ParseFstab reads an fstab: comments and blank lines skipped, the fields
// unescaped (\040 for a space), the options "defaults" when the line has
// none. A line with fewer than three fields is an error naming it.
func ParseFstab(r io.Reader) ([]FstabEntry, error) {
	var out []FstabEntry
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fs := strings.Fields(line)
		if len(fs) < 3 {
			return nil, fmt.Errorf("fstab line %d %q: want at least device, mount point and type", n, line)
		}
		e := FstabEntry{Spec: unescape(fs[0]), Dir: unescape(fs[1]), FSType: fs[2], Opts: "defaults", Line: n}
		if len(fs) > 3 {
			e.Opts = fs[3]
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// ReadFstab reads root's /etc/fstab; a host without one has no entries.
func ReadFstab(root string) ([]FstabEntry, error) {
	f, err := os.Open(filepath.Join(root, "etc/fstab"))
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	es, err := ParseFstab(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return es, nil
}

// The filesystems PID 1 mounts from the host's fstab: local disk ones whose
// kernel driver needs no helper.
var localFSTypes = []string{"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat"}

// networkFSTypes need a network (and usually a helper) before they mount.
var networkFSTypes = []string{"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "9p", "virtiofs", "sshfs", "davfs"}

// NotMounted says why PID 1 does not mount e before the guests are
// restored ("" when it does). The host root is mounted from lu.root, not
// from here.
func (e FstabEntry) NotMounted() string {
	opts := strings.Split(e.Opts, ",")
	spec := diskByLink(e.Spec)
	switch {
	case e.Dir == "/":
		return "the host root (mounted from lu.root=)"
	case e.FSType == "swap" || e.Dir == "none" || e.Dir == "swap":
		return "swap"
	case slices.Contains(opts, "noauto"):
		return "noauto: not mounted at boot"
	case slices.Contains(networkFSTypes, e.FSType) || strings.HasPrefix(e.FSType, "fuse") || slices.Contains(opts, "_netdev"):
		return fmt.Sprintf("a network filesystem (%s), which needs the network and its helpers", e.FSType)
	case e.FSType == "tmpfs" || e.FSType == "ramfs":
		return "a filesystem in memory, empty after any boot"
	case !slices.Contains(localFSTypes, e.FSType):
		return fmt.Sprintf("type %s (PID 1 mounts %s)", e.FSType, strings.Join(localFSTypes, ", "))
	case strings.HasPrefix(spec, "/dev/mapper/") || strings.HasPrefix(spec, "/dev/md") || strings.HasPrefix(spec, "/dev/dm-"):
		return "a device-mapper (LVM) or MD device, which PID 1 does not assemble"
	case strings.HasPrefix(spec, "/dev/disk/"):
		return fmt.Sprintf("%s is a udev link, which PID 1 (no udev) does not have: name the device by UUID=", e.Spec)
	case strings.HasPrefix(spec, "LABEL=") && !strings.HasPrefix(e.FSType, "ext"):
		return "LABEL= is resolved for ext2/3/4 only: name the device by UUID="
	case !strings.HasPrefix(spec, "/dev/") && !strings.HasPrefix(spec, "UUID=") && !strings.HasPrefix(spec, "LABEL=") &&
		!strings.HasPrefix(spec, "PARTUUID=") && !strings.HasPrefix(spec, "PARTLABEL="):
		return fmt.Sprintf("device %q is not a /dev path, UUID=, LABEL=, PARTUUID= or PARTLABEL=", e.Spec)
	}
	return ""
}

// diskByLink turns udev's /dev/disk/by-* links, which PID 1 (no udev) does
// not have, into the tag they stand for.
func diskByLink(spec string) string {
	for dir, tag := range map[string]string{"/dev/disk/by-uuid/": "UUID=", "/dev/disk/by-label/": "LABEL=",
		"/dev/disk/by-partuuid/": "PARTUUID=", "/dev/disk/by-partlabel/": "PARTLABEL="} {
		if rest, ok := strings.CutPrefix(spec, dir); ok {
			return tag + unescapeUdev(rest)
		}
	}
	return spec
}

// unescapeUdev undoes udev's \x2f-style escapes in a by-label link name.
func unescapeUdev(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && s[i+1] == 'x' {
			var c byte
			if _, err := fmt.Sscanf(s[i+2:i+4], "%02x", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountFlags splits fstab options into mount(2) flags and the data string
// the filesystem gets; options only mount(8) or systemd read are dropped.
func mountFlags(opts string) (uintptr, string) {
	flags := map[string]uintptr{"ro": unix.MS_RDONLY, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
		"noexec": unix.MS_NOEXEC, "noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME,
		"relatime": unix.MS_RELATIME, "strictatime": unix.MS_STRICTATIME, "sync": unix.MS_SYNCHRONOUS,
		"dirsync": unix.MS_DIRSYNC, "lazytime": unix.MS_LAZYTIME}
	userspace := []string{"defaults", "rw", "auto", "nofail", "user", "nouser", "users", "owner", "group",
		"suid", "dev", "exec", "atime", "diratime", "async"}
	var f uintptr
	var data []string
	for _, o := range strings.Split(opts, ",") {
		switch {
		case o == "":
		case flags[o] != 0:
			f |= flags[o]
		case slices.Contains(userspace, o), strings.HasPrefix(o, "x-"), strings.HasPrefix(o, "comment="):
		default:
			data = append(data, o)
		}
	}
	return f, strings.Join(data, ",")
}

// MountFstab mounts the entry under root (the host root as PID 1 sees it)
// and returns the device it resolved.
func MountFstab(e FstabEntry, root string) (string, error) {
	dev, err := ResolveDevice(diskByLink(e.Spec))
	if err != nil {
		return "", fmt.Errorf("fstab line %d (%s on %s): %w", e.Line, e.Spec, e.Dir, err)
	}
	dir := filepath.Join(root, e.Dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return dev, err
	}
	flags, data := mountFlags(e.Opts)
	if err := unix.Mount(dev, dir, e.FSType, flags, data); err != nil {
		return dev, fmt.Errorf("mounting fstab line %d: %s (%s) on %s type %s options %q: %w", e.Line, e.Spec, dev, dir, e.FSType, data, err)
	}
	return dev, nil
}

// PMEM tells whether the entry is an ext4 filesystem on a PMEM block device
// named by its path (/dev/pmemN): PID 1 mounts it as it mounts lu.pmem.
func (e FstabEntry) PMEM() bool {
	return strings.HasPrefix(e.Spec, "/dev/pmem") && e.FSType == "ext4"
}

// Nofail tells whether the entry may fail to mount without stopping the
// boot (fstab's nofail).
func (e FstabEntry) Nofail() bool { return slices.Contains(strings.Split(e.Opts, ","), "nofail") }
