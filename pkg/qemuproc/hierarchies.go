package qemuproc

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Hierarchies is a process's cgroup membership as /proc/PID/cgroup lists
// it, one "ID:CONTROLLERS:PATH" line per hierarchy: on a cgroup v1 or
// hybrid host (no systemd, older distributions) libvirt places its QEMUs
// in each v1 controller's hierarchy, which Spec.Cgroup (v2 only) does not
// reach.
func Hierarchies(procCgroup string) []string {
	var out []string
	for _, l := range strings.Split(procCgroup, "\n") {
		if strings.Count(l, ":") >= 2 {
			out = append(out, l)
		}
	}
	return out
}

// JoinHierarchies moves process pid into the cgroup of every hierarchy
// line names, each found by its mount in mountinfo (/proc/self/mountinfo's
// contents); root prefixes the mount points (the host root as we see it).
// A hierarchy that is not mounted here is skipped: nothing to join.
// Writing to cgroup.procs moves every thread of the process.
func JoinHierarchies(pid int, lines []string, mountinfo, root string) error {
	return join(pid, lines, mountinfo, root, "cgroup.procs", "cgroup.procs")
}

// MoveThread moves one thread (tid) into the cgroup of every hierarchy
// lines names: libvirt keeps each vCPU thread in a cgroup of its own
// (…/vcpuN: its CPU quota, its cpuset). cgroup v2 takes threads in
// cgroup.threads (threaded cgroups), v1 in tasks.
func MoveThread(tid int, lines []string, mountinfo, root string) error {
	return join(tid, lines, mountinfo, root, "cgroup.threads", "tasks")
}

func join(id int, lines []string, mountinfo, root, v2file, v1file string) error {
	mnts := cgroupMounts(mountinfo)
	var errs []string
	for _, l := range lines {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) != 3 {
			continue
		}
		mnt, ok := mnts[controllerKey(parts[1])]
		if !ok || parts[2] == "" {
			continue
		}
		dir := filepath.Join(root, mnt, filepath.Clean("/"+parts[2]))
		file := v1file
		if parts[1] == "" {
			file = v2file
		}
		if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.Itoa(id)), 0); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", dir, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("joining the old QEMU's cgroups: %s", strings.Join(errs, "; "))
	}
	return nil
}

// controllerKey names a hierarchy by its sorted controllers ("" for the
// v2 hierarchy), as /proc/PID/cgroup and a mount's options both give them.
func controllerKey(s string) string {
	if s == "" {
		return ""
	}
	c := strings.Split(s, ",")
	sort.Strings(c)
	return strings.Join(c, ",")
}

// notControllers are the options of a cgroup v1 mount that name no
// controller.
var notControllers = map[string]bool{"rw": true, "ro": true, "xattr": true, "noprefix": true, "clone_children": true,
	"cpuset_v2_mode": true, "none": true, "favordynmods": true}

// cgroupMounts maps each cgroup hierarchy mounted per mountinfo to its
// mount point (the first one listed).
func cgroupMounts(mountinfo string) map[string]string {
	out := map[string]string{}
	for _, l := range strings.Split(mountinfo, "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL…] - FSTYPE SOURCE SUPEROPTS
		pre, post, ok := strings.Cut(l, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 || f[3] != "/" {
			continue // a bind mount of a sub-cgroup is not the hierarchy's root
		}
		var key string
		switch g[0] {
		case "cgroup2":
			key = ""
		case "cgroup":
			var cs []string
			for _, o := range strings.Split(g[2], ",") {
				if !notControllers[o] && !strings.HasPrefix(o, "release_agent=") {
					cs = append(cs, o)
				}
			}
			key = controllerKey(strings.Join(cs, ","))
			if key == "" {
				continue
			}
		default:
			continue
		}
		if _, seen := out[key]; !seen {
			out[key] = unescapeMount(f[4])
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
