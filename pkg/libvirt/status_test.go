package libvirt

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The status files real libvirt 11.3 wrote, captured by
// qemu-tests TestLibvirtFacts (LIVEUPDATE_WRITE_FIXTURES=1).
const fixtures = "../../qemu-tests/testdata/libvirt"

func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtures, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseStatusFixtures(t *testing.T) {
	for _, f := range []string{"status.xml", "status-after-reconnect.xml"} {
		t.Run(f, func(t *testing.T) {
			s, err := ParseStatus(fixture(t, f))
			if err != nil {
				t.Fatal(err)
			}
			if s.Name != "lu-lv-facts" || s.UUID != "fac8c2cb-fb5f-4ce4-b50f-740b3077c0cd" || s.PID != 2086 || s.Monitor != "/var/lib/libvirt/qemu/domain-1-lu-lv-facts/monitor.sock" ||
				!s.MountNS || len(s.Vcpus) != 1 || s.Vcpus[0] != 2094 {
				t.Errorf("parsed %+v", s)
			}
		})
	}
}

func TestRewriteFixture(t *testing.T) {
	b := fixture(t, "status.xml")
	for _, drop := range []bool{false, true} {
		out, err := Rewrite(b, Change{PID: 31337, Vcpus: map[int]int{0: 31340}, DropMountNS: drop})
		if err != nil {
			t.Fatal(err)
		}
		s, err := ParseStatus(out)
		if err != nil {
			t.Fatalf("the rewritten record does not parse: %v", err)
		}
		if s.PID != 31337 || s.Vcpus[0] != 31340 || s.MountNS == drop || s.Name != "lu-lv-facts" {
			t.Errorf("DropMountNS=%v: rewritten record says %+v", drop, s)
		}
		// Nothing else changed: the same edits done by hand give the same bytes.
		want := strings.Replace(string(b), "<domstatus state='running' reason='booted' pid='2086'>", "<domstatus state='running' reason='booted' pid='31337'>", 1)
		want = strings.Replace(want, "<vcpu id='0' pid='2094'/>", "<vcpu id='0' pid='31340'/>", 1)
		if drop {
			want = strings.Replace(want, "  <namespaces>\n    <mount/>\n  </namespaces>\n", "", 1)
		}
		if string(out) != want {
			t.Errorf("DropMountNS=%v: the rewrite changed more than the pids", drop)
		}
	}
}

func TestRewriteRefuses(t *testing.T) {
	b := fixture(t, "status.xml")
	for _, c := range []struct {
		name string
		ch   Change
		want string
	}{
		{"no pid", Change{Vcpus: map[int]int{0: 5}}, "no new pid"},
		{"fewer vcpus", Change{PID: 5, Vcpus: map[int]int{}}, "lists 1 vCPU threads, the new QEMU has 0"},
		{"more vcpus", Change{PID: 5, Vcpus: map[int]int{0: 6, 1: 7}}, "lists 1 vCPU threads, the new QEMU has 2"},
		{"other vcpu", Change{PID: 5, Vcpus: map[int]int{1: 7}}, "the new QEMU has no vCPU 0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Rewrite(b, c.ch)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want an error saying %q", err, c.want)
			}
		})
	}
}

func TestParseStatusBad(t *testing.T) {
	for _, c := range []struct{ name, xml, want string }{
		{"empty", "", "no <domstatus>"},
		{"not xml", "<domstatus pid='1'", "XML"},
		{"no pid", "<domstatus state='running'><domain><name>a</name></domain></domstatus>", "not a number"},
		{"bad pid", "<domstatus pid='x'><domain><name>a</name></domain></domstatus>", "not a number"},
		{"no name", "<domstatus pid='4'></domstatus>", "no <domain><name>"},
		{"vcpu without pid", "<domstatus pid='4'><vcpus><vcpu id='0'/></vcpus><domain><name>a</name></domain></domstatus>", "<vcpu id='0'>"},
		{"a domain, not a status", "<domain><name>a</name></domain>", "no <domstatus>"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseStatus([]byte(c.xml))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want an error saying %q", err, c.want)
			}
		})
	}
}

func TestFindAndWrite(t *testing.T) {
	dir := t.TempDir()
	st := filepath.Join(dir, "lu-lv-facts.xml")
	os.WriteFile(st, fixture(t, "status.xml"), 0o600)
	os.WriteFile(PidFile(st), []byte("2086"), 0o644)
	os.WriteFile(filepath.Join(dir, "junk.xml"), []byte("<domain/>"), 0o600)
	if got := Find(dir, 2086); got != st {
		t.Errorf("Find(2086) = %q", got)
	}
	if got := Find(dir, 2094); got != "" { // a vCPU thread's pid is in the file too
		t.Errorf("Find(2094) = %q, want none", got)
	}
	if got := Find(dir, 2087); got != "" {
		t.Errorf("Find(2087) = %q, want none", got)
	}
	out, _ := Rewrite(fixture(t, "status.xml"), Change{PID: 9, Vcpus: map[int]int{0: 10}})
	noDaemons := t.TempDir() // a /proc with no libvirt daemon
	if err := WriteStatus(noDaemons, st, out, 9); err != nil {
		t.Fatal(err)
	}
	if got := Find(dir, 9); got != st {
		t.Errorf("after the rewrite Find(9) = %q", got)
	}
	if b, _ := os.ReadFile(PidFile(st)); string(b) != "9" {
		t.Errorf("pid file says %q", b)
	}
	if fi, _ := os.Stat(st); fi.Mode().Perm() != 0o600 {
		t.Errorf("status file mode %v, libvirt wrote 0600", fi.Mode())
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*"))
	if len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
	// With a daemon running nothing is written.
	proc := fakeProc(t, map[int]string{77: "libvirtd|S"})
	if err := WriteStatus(proc, st, fixture(t, "status.xml"), 2086); err == nil || !strings.Contains(err.Error(), "libvirtd (pid 77)") {
		t.Errorf("WriteStatus with libvirtd running: %v", err)
	}
	if got := Find(dir, 9); got != st {
		t.Errorf("a refused write changed the record")
	}
}

// fakeProc makes a /proc with the given processes: pid → "comm|state".
func fakeProc(t testing.TB, ps map[int]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, v := range ps {
		comm, state, _ := strings.Cut(v, "|")
		d := filepath.Join(root, strconv.Itoa(pid))
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "comm"), []byte(comm+"\n"), 0o644)
		os.WriteFile(filepath.Join(d, "stat"), []byte(strconv.Itoa(pid)+" ("+comm+") "+state+" 1 1 1"), 0o644)
	}
	os.MkdirAll(filepath.Join(root, "self"), 0o755)
	return root
}

func TestDaemons(t *testing.T) {
	proc := fakeProc(t, map[int]string{10: "libvirtd|S", 11: "libvirtd|Z", 12: "virtqemud|R", 13: "bash|S", 14: "virtlogd|S"})
	got := Daemons(proc)
	if len(got) != 2 || got[0] != (Daemon{"libvirtd", 10}) || got[1] != (Daemon{"virtqemud", 12}) {
		t.Errorf("Daemons = %v", got)
	}
	stop, start := StopHint(got[:1])
	if stop != "systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket" ||
		start != "systemctl start libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket libvirtd.service" {
		t.Errorf("StopHint: %q / %q", stop, start)
	}
}

func FuzzRewrite(f *testing.F) {
	f.Add(fixture(f, "status.xml"), 7, 8, true)
	f.Add([]byte("<domstatus pid='4'><vcpus><vcpu id='0' pid='5'/></vcpus><namespaces><mount/></namespaces><domain><name>a</name></domain></domstatus>"), 1, 2, false)
	f.Fuzz(func(t *testing.T, b []byte, pid, tid int, drop bool) {
		FdsetFile(b, "serial0-source")
		s, err := ParseStatus(b)
		if err != nil {
			return
		}
		vc := map[int]int{}
		for id := range s.Vcpus {
			vc[id] = tid
		}
		out, err := Rewrite(b, Change{PID: pid, Vcpus: vc, DropMountNS: drop})
		if err != nil {
			return
		}
		s2, err := ParseStatus(out)
		if err != nil {
			t.Fatalf("a rewrite of a record that parsed does not parse: %v", err)
		}
		if s2.PID != pid || s2.Name != s.Name || len(s2.Vcpus) != len(s.Vcpus) {
			t.Fatalf("rewrite gave %+v from %+v", s2, s)
		}
	})
}

// TestGuard: while the guard is held a second holder (a daemon starting)
// cannot take the pid file's lock; after Release it can, and a pid file the
// guard made is gone.
func TestGuard(t *testing.T) {
	root := t.TempDir()
	if g, err := Hold(root); err != nil || len(g.files) != 0 {
		t.Fatalf("no libvirt on the host: %v %+v", err, g)
	}
	os.MkdirAll(filepath.Join(root, "run/libvirt"), 0o755)
	g, err := Hold(root)
	if err != nil || len(g.files) != 2 || len(g.Busy) != 0 {
		t.Fatalf("Hold: %v %+v", err, g)
	}
	// fcntl locks are per process: the daemon is a child holding a lock.
	p := filepath.Join(root, PidFiles[0])
	try := func() error {
		// A child process takes the lock as libvirt's daemon does.
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperLock$")
		cmd.Env = append(os.Environ(), "LU_LOCK_PATH="+p)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := try(); err == nil {
		t.Errorf("a daemon could take its pid file while the guard is held")
	}
	g.Release()
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("the pid file the guard made is still there: %v", err)
	}
	if err := try(); err != nil {
		t.Errorf("after Release a daemon cannot take its pid file: %v", err)
	}
}

// TestHelperLock is the "daemon" of TestGuard: it takes the lock libvirt's
// daemons take and fails if it cannot.
func TestHelperLock(t *testing.T) {
	p := os.Getenv("LU_LOCK_PATH")
	if p == "" {
		t.Skip("helper of TestGuard")
	}
	g, err := Hold(filepath.Dir(filepath.Dir(p)))
	if err != nil || len(g.Busy) > 0 {
		t.Fatalf("pid file busy: %v %v", err, g.Busy)
	}
}

func TestFdsetFile(t *testing.T) {
	b := fixture(t, "status.xml")
	for _, c := range []struct{ opaque, want string }{
		{"serial0-source", "/tmp/TestLibvirtFacts3702040685/002/serial.log"},
		{"serial0-log", ""},
		{"serial1-source", ""},
		{"serial0", ""},
		{"", ""},
	} {
		if got := FdsetFile(b, c.opaque); got != c.want {
			t.Errorf("FdsetFile(%q) = %q, want %q", c.opaque, got, c.want)
		}
	}
}
