// Package hostpath keeps apart the two views of one file. A guest's QEMU
// sees the host's files from the host root; this process may see that root
// mounted elsewhere (PID 1 after kexec has it at /newroot; `--root` from
// its rescue shell). QEMU's command line and the manifest hold QEMU's view;
// opening, renaming or stat'ing a file needs ours. The two are distinct
// types, so the compiler stops them being mixed, and a path from QEMU's
// command line is resolved in one place (Root.Arg).
package hostpath

import (
	"path/filepath"
	"strings"
)

// QEMU is a path as the guest's QEMU sees it: what its command line and the
// manifest hold.
type QEMU string

// Local is a path as this process sees it: what it opens.
type Local string

// Root is the directory QEMU runs chrooted in, as this process sees it; ""
// or "/" when QEMU shares our root.
type Root string

func (r Root) none() bool { return r == "" || r == "/" }

// Local turns a path as QEMU sees it into the path as we see it.
func (r Root) Local(p QEMU) Local {
	if r.none() || p == "" {
		return Local(p)
	}
	return Local(filepath.Join(string(r), string(p)))
}

// QEMU turns a path as we see it into the path as QEMU sees it (Local's
// inverse). A path outside the root has no QEMU view; it is returned as it
// is, which Within checks then refuse.
func (r Root) QEMU(p Local) QEMU {
	if r.none() || p == "" {
		return QEMU(p)
	}
	rel, err := filepath.Rel(string(r), string(p))
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return QEMU(p)
	}
	return QEMU(filepath.Join("/", rel))
}

// Arg resolves a path from QEMU's command line: relative paths are relative
// to QEMU's working directory, cwd, which is in QEMU's view too.
func Arg(cwd QEMU, p string) QEMU {
	if p == "" || filepath.IsAbs(p) {
		return QEMU(p)
	}
	return QEMU(filepath.Join(string(cwd), p))
}

// Join is filepath.Join in QEMU's view.
func Join(dir QEMU, elem ...string) QEMU {
	return QEMU(filepath.Join(append([]string{string(dir)}, elem...)...))
}

// String is the path.
func (p QEMU) String() string { return string(p) }
