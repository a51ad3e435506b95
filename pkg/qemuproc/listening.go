package qemuproc

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// soAcceptCon is /proc/net/unix's flag of a listening socket (the
// kernel's __SO_ACCEPTCON).
const soAcceptCon = 0x10000

// UnixListening tells whether process pid (seen under procRoot) has a unix
// socket bound to path that listens, from /proc/PID/net/unix (its network
// namespace's sockets; path as it was bound). QEMU binds, then listens: a
// socket file that exists may still refuse connections ("Connection
// refused"), seen under load between the two.
func UnixListening(procRoot string, pid int, path string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "net", "unix"))
	if err != nil {
		return false, err
	}
	return listensIn(b, path), nil
}

// listensIn reads /proc/net/unix's table: "Num RefCount Protocol Flags
// Type St Inode Path", numbers in hex, the path last (it may hold spaces).
func listensIn(table []byte, path string) bool {
	sc := bufio.NewScanner(bytes.NewReader(table))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	first := true
	for sc.Scan() {
		if first { // the header
			first = false
			continue
		}
		f := strings.Fields(sc.Text())
		if len(f) < 8 {
			continue // no path: unbound, or abstract-less
		}
		flags, err := strconv.ParseUint(f[3], 16, 32)
		if err != nil || flags&soAcceptCon == 0 {
			continue
		}
		// The path: everything after the inode column.
		line := sc.Text()
		i := strings.Index(line, " "+f[6]+" ")
		if i < 0 {
			continue
		}
		if strings.TrimSpace(line[i+len(f[6])+2:]) == path {
			return true
		}
	}
	return false
}
