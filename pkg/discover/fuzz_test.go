package discover

import (
	"strings"
	"testing"
)

// FuzzProcFiles feeds the /proc parsers arbitrary file contents: none may
// panic, and what they return must come from their input.
func FuzzProcFiles(f *testing.F) {
	f.Add("0::/machine.slice/vm1\n")
	f.Add("pos:\t0\nflags:\t0100002\nmnt_id:\t15\nino:\t1057\niff:\tvnet0\n")
	f.Add("Num       RefCount Protocol Flags    Type St Inode Path\n0000000000000000: 00000002 00000000 00010000 0001 01 23456 /run/vm1.qmp\n")
	f.Add("1234 (qemu-system-x86) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20\n")
	f.Add("Name:\tqemu\nUid:\t0\t0\t0\t0\nGid:\t107\t107\t107\t107\nGroups:\t36 107 \n")
	f.Add("qemu\x00-name\x00vm1\x00")
	f.Fuzz(func(t *testing.T, s string) {
		if c := ParseCgroup(s); c != "" && !strings.Contains(s, "0::"+c) {
			t.Errorf("cgroup %q not in input", c)
		}
		if iff := ParseTunFdinfo(s); iff != "" && !strings.Contains(s, iff) {
			t.Errorf("iff %q not in input", iff)
		}
		for ino, path := range ParseNetUnix(s) {
			if !strings.Contains(s, ino) || !strings.Contains(s, path) {
				t.Errorf("socket %s %s not in input", ino, path)
			}
		}
		parseStartTime(s)
		if args := splitNul([]byte(s)); len(args) > 0 && strings.Join(args, "\x00") != strings.TrimSuffix(s, "\x00") {
			t.Errorf("argv %q does not rebuild %q", args, s)
		}
		var p Process
		p.parseStatus(s)
	})
}
