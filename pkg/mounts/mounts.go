// Package mounts does PID 1's mounting: the API filesystems of early boot,
// the PMEM filesystem with DAX (verified, and formatted only when asked and
// only when the device is empty), the host root, and the bind mounts that
// make /dev, /proc, /sys, /run and PMEM visible to QEMU inside the host root.
// Each mount has its inverse (Unmount) for the orderly stop.
package mounts

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/u-root/u-root/pkg/mount"
	"github.com/u-root/u-root/pkg/mount/block"
	"golang.org/x/sys/unix"
)

// Early mounts what PID 1 needs before anything else. Already-mounted
// filesystems (EBUSY) are fine: the kernel may have mounted devtmpfs.
func Early() error {
	var errs []error
	for _, m := range []struct {
		src, dst, fstype, data string
		flags                  uintptr
	}{
		{"proc", "/proc", "proc", "", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"sysfs", "/sys", "sysfs", "", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"devtmpfs", "/dev", "devtmpfs", "mode=0755", unix.MS_NOSUID},
		{"devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666", unix.MS_NOSUID | unix.MS_NOEXEC},
		{"tmpfs", "/run", "tmpfs", "mode=0755", unix.MS_NOSUID | unix.MS_NODEV},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", "nsdelegate", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mounting %s on %s: %w", m.fstype, m.dst, err))
		}
	}
	return errors.Join(errs...)
}

// WaitFor waits until path exists, or ctx ends.
func WaitFor(ctx context.Context, path string) error {
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("device %s did not appear: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// ErrNoFilesystem means a PMEM device holds no filesystem.
var ErrNoFilesystem = errors.New("no filesystem")

// probeFS names the filesystem on dev ("" if none found), and tells whether
// the device's first MiB is all zero (never written: safe to format).
func probeFS(dev string) (fstype string, empty bool, err error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", false, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", false, fmt.Errorf("reading %s: %w", dev, err)
	}
	buf = buf[:n]
	empty = len(bytes.Trim(buf, "\x00")) == 0
	if fs, _, err := mount.FSFromBlock(dev); err == nil {
		return fs, empty, nil
	}
	return "", empty, nil
}

// MountPMEM mounts the ext4 filesystem on dev at dir with DAX and checks that
// DAX is really on (dax=always in /proc/mounts): guest RAM on a non-DAX
// filesystem would live in the page cache and be lost by a kexec. With
// format, an empty device (all zero) is formatted first; a device that holds
// anything is never formatted. run runs mkfs to its end and returns its
// output (nil: exec.Cmd.CombinedOutput); PID 1 passes one that goes through
// its reaper, which would otherwise take mkfs's exit status first.
func MountPMEM(dev, dir string, format bool, run func(*exec.Cmd) ([]byte, error)) error {
	fs, empty, err := probeFS(dev)
	if err != nil {
		return err
	}
	switch {
	case fs == "ext4":
	case fs != "":
		return fmt.Errorf("PMEM %s holds a %s filesystem, not ext4: guest RAM must be on ext4 with DAX", dev, fs)
	case format && empty:
		if run == nil {
			run = (*exec.Cmd).CombinedOutput
		}
		out, err := run(exec.Command("mkfs.ext4", "-q", "-F", "-L", "lu-pmem", "-b", "4096", dev))
		if err != nil {
			return fmt.Errorf("formatting empty PMEM %s: %v: %s", dev, err, out)
		}
	case format:
		return fmt.Errorf("PMEM %s is not empty but holds no filesystem liveupdate recognises: refusing to format it (guest data may be on it); inspect it from the rescue shell", dev)
	default:
		return fmt.Errorf("PMEM %s: %w (on first boot, add lu.format_pmem=1 to format an empty device)", dev, ErrNoFilesystem)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(dev, dir, "ext4", 0, "dax=always"); err != nil {
		return fmt.Errorf("mounting PMEM %s on %s with dax=always: %w", dev, dir, err)
	}
	opts, err := MountOptions("/proc/mounts", dir)
	if err != nil {
		return err
	}
	if !HasDAX(opts) {
		unix.Unmount(dir, 0)
		return fmt.Errorf("PMEM %s mounted on %s without DAX (options %q): refusing to put guest RAM on it", dev, dir, opts)
	}
	return nil
}

// HasDAX tells whether mount options say DAX is always on.
func HasDAX(opts string) bool {
	for _, o := range strings.Split(opts, ",") {
		if o == "dax=always" || o == "dax" {
			return true
		}
	}
	return false
}

// Entry is one line of a mount table.
type Entry struct {
	Source, Dir, FSType, Opts string
}

// Table reads a mount table (/proc/mounts), in mount order.
func Table(mountsFile string) ([]Entry, error) {
	f, err := os.Open(mountsFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Entry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 4 {
			out = append(out, Entry{Source: unescape(fs[0]), Dir: unescape(fs[1]), FSType: fs[2], Opts: fs[3]})
		}
	}
	return out, sc.Err()
}

// MountOptions returns the options of the mount at dir from a mounts file
// (/proc/mounts); the last mount on dir wins.
func MountOptions(mountsFile, dir string) (string, error) {
	ms, err := Table(mountsFile)
	if err != nil {
		return "", err
	}
	opts, found := "", false
	for _, m := range ms {
		if m.Dir == dir {
			opts, found = m.Opts, true
		}
	}
	if !found {
		return "", fmt.Errorf("%s is not a mount point", dir)
	}
	return opts, nil
}

func unescape(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

// ResolveDevice turns UUID=…, LABEL=…, PARTUUID=…, PARTLABEL=… or /dev/… into
// a device path.
func ResolveDevice(spec string) (string, error) {
	switch {
	case strings.HasPrefix(spec, "/dev/"):
		return spec, nil
	case strings.HasPrefix(spec, "UUID="):
		devs, err := block.GetBlockDevices()
		if err != nil {
			return "", err
		}
		m := devs.FilterFSUUID(strings.ToLower(strings.TrimPrefix(spec, "UUID=")))
		if len(m) == 0 {
			return "", fmt.Errorf("no block device with filesystem %s", spec)
		}
		return m[0].DevicePath(), nil
	case strings.HasPrefix(spec, "LABEL="):
		devs, err := block.GetBlockDevices()
		if err != nil {
			return "", err
		}
		want := strings.TrimPrefix(spec, "LABEL=")
		for _, d := range devs {
			if l, err := ext4Label(d.DevicePath()); err == nil && l == want {
				return d.DevicePath(), nil
			}
		}
		return "", fmt.Errorf("no block device with ext4 filesystem %s", spec)
	case strings.HasPrefix(spec, "PARTUUID="), strings.HasPrefix(spec, "PARTLABEL="):
		devs, err := block.GetBlockDevices()
		if err != nil {
			return "", err
		}
		var m block.BlockDevices
		if id, ok := strings.CutPrefix(spec, "PARTUUID="); ok {
			m = devs.FilterPartID(id)
		} else {
			m = devs.FilterPartLabel(strings.TrimPrefix(spec, "PARTLABEL="))
		}
		if len(m) == 0 {
			return "", fmt.Errorf("no partition with %s", spec)
		}
		return m[0].DevicePath(), nil
	}
	return "", fmt.Errorf("device %q: want UUID=…, LABEL=…, PARTUUID=…, PARTLABEL=… or /dev/…", spec)
}

// ext4Label reads the volume label from an ext2/3/4 superblock.
func ext4Label(dev string) (string, error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return "", err
	}
	if sb[0x38] != 0x53 || sb[0x39] != 0xEF {
		return "", fmt.Errorf("%s: no ext superblock", dev)
	}
	return string(bytes.TrimRight(sb[0x78:0x88], "\x00")), nil
}

// MountRoot mounts the host root at dir.
func MountRoot(spec, fstype, data string, ro bool, dir string) (string, error) {
	dev, err := ResolveDevice(spec)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return dev, err
	}
	var flags uintptr
	if ro {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(dev, dir, fstype, flags, data); err != nil {
		return dev, fmt.Errorf("mounting host root %s (%s) on %s: %w", spec, dev, dir, err)
	}
	return dev, nil
}

// BindInto makes each path visible at the same path under root (recursive
// bind), so processes chrooted into root see them.
func BindInto(root string, paths ...string) error {
	for _, p := range paths {
		dst := filepath.Join(root, p)
		if _, err := os.Stat(dst); err != nil {
			return fmt.Errorf("host root has no %s to bind %s onto: %w", dst, p, err)
		}
		if err := unix.Mount(p, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("binding %s into %s: %w", p, root, err)
		}
	}
	return nil
}

// Unmount is the inverse of the mounts above: it syncs, then unmounts each
// path (deepest first), falling back to read-only remount when busy.
func Unmount(paths ...string) error {
	unix.Sync()
	var errs []error
	for i := len(paths) - 1; i >= 0; i-- {
		p := paths[i]
		if err := unix.Unmount(p, 0); err != nil {
			if err2 := unix.Mount("", p, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err2 != nil {
				errs = append(errs, fmt.Errorf("unmounting %s: %w (read-only remount: %v)", p, err, err2))
			}
		}
	}
	return errors.Join(errs...)
}

// Holding returns the mount that holds path (the longest mount point that
// contains it; the last one mounted there), from a mounts table file.
func Holding(mountsFile, path string) (Entry, error) {
	ms, err := Table(mountsFile)
	if err != nil {
		return Entry{}, err
	}
	path = filepath.Clean(path)
	best := Entry{}
	for _, m := range ms {
		inside := m.Dir == "/" || path == m.Dir || strings.HasPrefix(path, m.Dir+"/")
		if inside && len(m.Dir) >= len(best.Dir) {
			best = m
		}
	}
	if best.Dir == "" {
		return best, fmt.Errorf("no mount holds %s", path)
	}
	return best, nil
}

// VolatilePMEM tells whether a PMEM block device is memmap= "PMEM": DRAM
// the kernel was told to treat as persistent (the e820 provider), which
// survives a kexec but not a power-off. Real NVDIMMs come from ACPI NFIT.
func VolatilePMEM(dev string) bool {
	sys, err := filepath.EvalSymlinks(filepath.Join("/sys/block", filepath.Base(dev), "device"))
	if err != nil {
		return false
	}
	// …/ndbusN/regionM/namespaceM.K: the bus says who provides it.
	if p, err := os.ReadFile(filepath.Join(sys, "..", "..", "provider")); err == nil {
		return strings.TrimSpace(string(p)) == "e820"
	}
	return strings.Contains(sys, "e820_pmem")
}
