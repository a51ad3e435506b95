package qemuproc

import (
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestCodeFiles(t *testing.T) {
	maps := `55d0c0a00000-55d0c0c00000 r--p 00000000 fd:01 1234   /usr/bin/qemu-system-x86_64
55d0c0c00000-55d0c1800000 r-xp 00200000 fd:01 1234   /usr/bin/qemu-system-x86_64
55d0c1800000-55d0c1a00000 r--p 00e00000 fd:01 1234   /usr/bin/qemu-system-x86_64
7f0000000000-7f0010000000 rw-s 00000000 103:00 12     /mnt/pmem/vm1.ram
7f0010000000-7f0010100000 rw-s 00000000 00:01 77     /memfd:guest-ram (deleted)
7f0020000000-7f0020001000 r-xp 00000000 00:05 9      /dev/zero
7f0030000000-7f0030100000 r-xp 00000000 fd:01 55     /usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6
7f0030100000-7f0030200000 r-xp 00000000 fd:01 56     /usr/lib/x86_64-linux-gnu/qemu/hw-display virtio.so
7f0040000000-7f0040100000 r-xp 00000000 fd:01 57     /usr/lib/x86_64-linux-gnu/libold.so (deleted)
7f0050000000-7f0050021000 rw-p 00000000 00:00 0      [heap]
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0      [vdso]
7f0060000000-7f0060100000 r-xp 00000000 fd:01 58     /usr/lib/x86_64-linux-gnu/libc.so.6
7f0060100000-7f0060200000 r-xp 00100000 fd:01 55     /usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6
7f0070000000-7f0070001000 ---p 00000000 00:00 0
garbage
`
	want := []string{"/usr/bin/qemu-system-x86_64", "/usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6",
		"/usr/lib/x86_64-linux-gnu/qemu/hw-display virtio.so", "/usr/lib/x86_64-linux-gnu/libc.so.6"}
	if got := CodeFiles(maps); !reflect.DeepEqual(got, want) {
		t.Fatalf("CodeFiles =\n%q\nwant\n%q", got, want)
	}
	if got := CodeFiles(""); got != nil {
		t.Fatalf("CodeFiles of nothing = %q", got)
	}
}

// TestCodeFilesSelf: this test's own process runs code from its binary.
func TestCodeFilesSelf(t *testing.T) {
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Skip(err)
	}
	exe, _ := os.Readlink("/proc/self/exe")
	if got := CodeFiles(string(maps)); !slices.Contains(got, exe) {
		t.Fatalf("CodeFiles of /proc/self/maps = %q, without the test binary %s", got, exe)
	}
}

func FuzzCodeFiles(f *testing.F) {
	f.Add("55d0c0c00000-55d0c1800000 r-xp 00200000 fd:01 1234   /usr/bin/qemu-system-x86_64\n")
	f.Add("7f0010000000-7f0010100000 rw-s 00000000 00:01 77     /memfd:guest-ram (deleted)\n")
	f.Add("a b c d e f\n\n r-xp")
	f.Fuzz(func(t *testing.T, maps string) {
		got := CodeFiles(maps)
		for i, p := range got {
			if !strings.HasPrefix(p, "/") || strings.HasPrefix(p, "/dev/") || slices.Contains(got[:i], p) {
				t.Fatalf("CodeFiles(%q) gave %q", maps, p)
			}
		}
	})
}
