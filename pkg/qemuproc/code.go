package qemuproc

import (
	"slices"
	"strings"
)

// CodeFiles are the files a process runs code from, from its
// /proc/PID/maps: those with an executable mapping — a QEMU's binary, its
// shared libraries and the QEMU modules it loaded — each once, in the order
// maps gives them. Guest RAM files are never mapped executable, nor are
// devices, memfds ("/memfd:…"), or files deleted since ("… (deleted)").
func CodeFiles(maps string) []string {
	var files []string
	for _, l := range strings.Split(maps, "\n") {
		// address perms offset dev inode pathname (which may hold spaces)
		f := strings.SplitN(strings.TrimSpace(l), " ", 6)
		if len(f) < 6 || len(f[1]) != 4 || f[1][2] != 'x' {
			continue
		}
		p := strings.TrimLeft(f[5], " ")
		if !strings.HasPrefix(p, "/") || strings.HasPrefix(p, "/dev/") || strings.HasPrefix(p, "/memfd:") ||
			strings.HasSuffix(p, " (deleted)") || slices.Contains(files, p) {
			continue
		}
		files = append(files, p)
	}
	return files
}
