package update

import (
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
)

// kexecLosses names what a guest needs to start again that a kexec loses:
// files its QEMU opens at start that live in memory (tmpfs, ramfs: a disk
// image on /run, a kernel on /tmp), and a named network namespace, which
// the new kernel's PID 1 does not re-create. root is the QEMU's root
// directory as seen from here (/proc/PID/root). Guest RAM is checked on
// its own (it must be on the PMEM filesystem).
func kexecLosses(p *discover.Process, netns, root string) []string {
	var out []string
	for _, f := range p.Cmdline.InputFiles() {
		if strings.HasPrefix(f.Option, "-object ") {
			continue // guest RAM
		}
		path := f.Path
		if !filepath.IsAbs(path) {
			path = filepath.Join(p.Cwd, path)
		}
		var st unix.Statfs_t
		if unix.Statfs(filepath.Join(root, path), &st) != nil {
			continue // preflight reports files that cannot be found
		}
		switch st.Type {
		case unix.TMPFS_MAGIC, unix.RAMFS_MAGIC:
			out = append(out, fmt.Sprintf("%s %s is in memory (tmpfs): the kexec loses it and the guest could not start again. Move it to a disk or the PMEM filesystem", f.Option, f.Path))
		}
	}
	if netns != "" {
		out = append(out, fmt.Sprintf("it runs in network namespace %s, which the new kernel's PID 1 does not re-create: its restore would fail", netns))
	}
	return out
}
