package update

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/mounts"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// guestFiles lists the files a guest's QEMU opens that must be there again
// after the kexec, as its QEMU names them (absolute): those of its command
// line but its RAM (checked on its own: it must be on PMEM), and every
// image of its block graph as QEMU reports it (backing files, images
// hot-plugged or snapshotted at run time).
func guestFiles(p *discover.Process, rt *preflight.Runtime) []qemuargv.FileRef {
	var out []qemuargv.FileRef
	seen := map[string]bool{}
	add := func(opt, path string) {
		if !filepath.IsAbs(path) {
			path = filepath.Join(p.Cwd, path)
		}
		if path = filepath.Clean(path); !seen[path] {
			seen[path] = true
			out = append(out, qemuargv.FileRef{Option: opt, Path: path})
		}
	}
	for _, f := range p.Cmdline.InputFiles() {
		if !strings.HasPrefix(f.Option, "-object ") {
			add(f.Option, f.Path)
		}
	}
	if rt != nil {
		for _, n := range rt.BlockNodes {
			switch n.Drv {
			case "file", "host_device", "host_cdrom":
				if n.File != "" {
					add("block node "+n.NodeName, n.File)
				}
			}
		}
	}
	return out
}

// unreachable names the files on filesystems PID 1 of the new kernel does
// not mount: it mounts the host root (lu.root), PMEM and the local disk
// filesystems of the host's fstab (mounts.FstabEntry.NotMounted), so a
// file on LVM, MD, NFS, a tmpfs or a disk fstab does not list is not there
// for the restored guest's QEMU. local turns QEMU's path into ours;
// rootDir is the host root as we see it; pmemDev the PMEM device ("" if
// unknown); fstab the host's; resolve follows a path's symbolic links (for
// /dev/VG/LV → /dev/dm-N). Files on tmpfs that kexecLosses already reports
// are left to it (skip).
func unreachable(files []qemuargv.FileRef, mountsFile string, local func(string) string, rootDir, pmemDev string, fstab []mounts.FstabEntry, resolve func(string) string, skip func(qemuargv.FileRef) bool) []string {
	var out []string
	root, err := mounts.Holding(mountsFile, rootDir)
	if err != nil {
		return []string{fmt.Sprintf("cannot tell which filesystem the host root %s is: %v", rootDir, err)}
	}
	for _, f := range files {
		if skip != nil && skip(f) {
			continue
		}
		l := local(f.Path)
		m, err := mounts.Holding(mountsFile, l)
		if err != nil {
			out = append(out, fmt.Sprintf("%s %s: %v", f.Option, f.Path, err))
			continue
		}
		switch {
		case m.FSType == "devtmpfs" || m.FSType == "devfs":
			// A device node: PID 1 has devtmpfs too, but assembles no
			// device-mapper (LVM) or MD device.
			dev := filepath.Base(f.Path)
			if r := resolve(l); r != "" {
				dev = filepath.Base(r)
			}
			if isMapped("/dev/"+dev) || strings.Contains(f.Path, "/mapper/") {
				out = append(out, fmt.Sprintf("%s %s is a device-mapper or MD device (%s), which PID 1 of the new kernel does not assemble: the guest could not start again after the kexec. Move the image to the root filesystem or PMEM (assembling LVM and MD from PID 1 is planned)", f.Option, f.Path, dev))
			}
		case m.Dir == root.Dir:
		case pmemDev != "" && m.Source == pmemDev:
		default:
			var entry *mounts.FstabEntry
			for i := range fstab {
				if filepath.Join(rootDir, fstab[i].Dir) == m.Dir {
					entry = &fstab[i]
				}
			}
			switch {
			case entry != nil && isMapped(m.Source):
				out = append(out, fmt.Sprintf("%s %s is on the filesystem mounted on %s (%s, %s), a device-mapper (LVM) or MD device, which PID 1 of the new kernel does not assemble: the guest could not start again after the kexec. Move the file to the root filesystem, PMEM or a plain disk partition listed in /etc/fstab",
					f.Option, f.Path, m.Dir, m.Source, m.FSType))
			case entry == nil:
				out = append(out, fmt.Sprintf("%s %s is on the filesystem mounted on %s (%s, %s), which the host's /etc/fstab does not list, so PID 1 of the new kernel does not mount it (it mounts the host root, PMEM and the local filesystems of /etc/fstab): the guest could not start again after the kexec. Add it to /etc/fstab, or move the file to the root filesystem or PMEM",
					f.Option, f.Path, m.Dir, m.Source, m.FSType))
			case entry.NotMounted() != "":
				out = append(out, fmt.Sprintf("%s %s is on the filesystem mounted on %s (%s, %s), which PID 1 of the new kernel does not mount before the guests start: /etc/fstab line %d is %s. Move the file to the root filesystem, PMEM or a local disk filesystem listed in /etc/fstab",
					f.Option, f.Path, m.Dir, m.Source, m.FSType, entry.Line, entry.NotMounted()))
			}
		}
	}
	return out
}

// inMemory tells whether kexecLosses reports the file (a command-line file
// on tmpfs or ramfs).
func inMemory(p *discover.Process, mountsFile string, local func(string) string) func(qemuargv.FileRef) bool {
	var argv []string
	for _, f := range p.Cmdline.InputFiles() {
		path := f.Path
		if !filepath.IsAbs(path) {
			path = filepath.Join(p.Cwd, path)
		}
		argv = append(argv, filepath.Clean(path))
	}
	return func(f qemuargv.FileRef) bool {
		m, err := mounts.Holding(mountsFile, local(f.Path))
		return err == nil && (m.FSType == "tmpfs" || m.FSType == "ramfs") && slices.Contains(argv, f.Path)
	}
}

// isMapped tells whether a device is assembled by device-mapper or MD.
func isMapped(dev string) bool {
	return strings.HasPrefix(dev, "/dev/mapper/") || strings.HasPrefix(dev, "/dev/dm-") || strings.HasPrefix(dev, "/dev/md")
}

// pmemFilesystems are the filesystems guest RAM may be on for a kernel
// update, as QEMU names their mount points: the state directory's PMEM
// filesystem (primary), and every other DAX filesystem on a PMEM device
// that the host's fstab lists by its mount point — PID 1 mounts those
// before the restore (one PMEM region per NUMA node, for one). view turns
// a mount point of the table into QEMU's view.
func pmemFilesystems(table []mounts.Entry, fstab []mounts.FstabEntry, primary string, view func(string) string) []string {
	out := []string{primary}
	for _, m := range table {
		dir := view(m.Dir)
		if dir == primary || slices.Contains(out, dir) || !strings.HasPrefix(m.Source, "/dev/pmem") || !mounts.HasDAX(m.Opts) {
			continue
		}
		if slices.ContainsFunc(fstab, func(e mounts.FstabEntry) bool { return filepath.Clean(e.Dir) == dir }) {
			out = append(out, dir)
		}
	}
	return out
}
