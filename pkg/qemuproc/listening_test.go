package qemuproc

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

const unixTable = `Num       RefCount Protocol Flags    Type St Inode Path
ffff8f0a01c5e000: 00000002 00000000 00010000 0001 01 30975 /run/lu/vm1.cpr.sock
ffff8f0a01c5e400: 00000002 00000000 00000000 0001 01 30976 /run/lu/vm2.cpr.sock
ffff8f0a01c5e800: 00000003 00000000 00000000 0001 03 30977
ffff8f0a01c5ec00: 00000002 00000000 00010000 0001 01 30978 /run/lu/with space.sock
ffff8f0a01c5f000: 00000002 00000000 00010000 0001 01 30979 @abstract
`

func TestListensIn(t *testing.T) {
	for _, c := range []struct {
		path string
		want bool
	}{
		{"/run/lu/vm1.cpr.sock", true},
		{"/run/lu/vm2.cpr.sock", false}, // bound, not listening yet
		{"/run/lu/with space.sock", true},
		{"/run/lu/vm3.cpr.sock", false},
		{"/run/lu/vm1.cpr", false},
		{"", false},
	} {
		if got := listensIn([]byte(unixTable), c.path); got != c.want {
			t.Errorf("listensIn(%q) = %v, want %v", c.path, got, c.want)
		}
	}
}

// A real socket: bound, not listening, then listening.
func TestUnixListening(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if ok, err := UnixListening("/proc", os.Getpid(), path); err != nil || ok {
		t.Fatalf("bound only: listening %v, %v", ok, err)
	}
	if err := syscall.Listen(fd, 1); err != nil {
		t.Fatal(err)
	}
	if ok, err := UnixListening("/proc", os.Getpid(), path); err != nil || !ok {
		t.Fatalf("listening: %v, %v", ok, err)
	}
	if _, err := net.Dial("unix", path); err != nil {
		t.Fatal(err)
	}
}

func FuzzListensIn(f *testing.F) {
	f.Add([]byte(unixTable), "/run/lu/vm1.cpr.sock")
	f.Add([]byte("Num\n: 1 2 zz 4 5 6 /x\n"), "/x")
	f.Fuzz(func(t *testing.T, table []byte, path string) {
		listensIn(table, path)
	})
}
