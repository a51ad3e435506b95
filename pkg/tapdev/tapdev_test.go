package tapdev

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestPersistAcrossClose creates a tap in a throwaway network namespace,
// makes it persistent, closes every fd, and attaches to it again by name.
func TestPersistAcrossClose(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for tap devices")
	}
	ns := "lu-tapdev-test"
	exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	defer exec.Command("ip", "netns", "del", ns).Run()
	path := "/run/netns/" + ns
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	err := InNetNS(path, func() error {
		f, err := Open("lutap0", flags)
		if err != nil {
			return err
		}
		name, got, err := Info(f)
		if err != nil {
			return err
		}
		if name != "lutap0" || got&unix.IFF_PERSIST != 0 || got&unix.IFF_VNET_HDR == 0 {
			t.Errorf("Info = %q %#x", name, got)
		}
		if err := SetPersist(f, true); err != nil {
			return err
		}
		f.Close()
		g, err := Open("lutap0", got)
		if err != nil {
			t.Fatalf("tap did not survive its fd: %v", err)
		}
		_, got, _ = Info(g)
		if got&unix.IFF_PERSIST == 0 {
			t.Errorf("IFF_PERSIST not reported: %#x", got)
		}
		if err := SetPersist(g, false); err != nil {
			return err
		}
		return g.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "-n", ns, "link", "show", "lutap0").CombinedOutput(); len(out) > 0 && !strings.Contains(string(out), "does not exist") {
		t.Errorf("tap still exists after un-persisting and closing: %s", out)
	}
	if _, err := NamedNetNS("net:[1]"); err == nil {
		t.Error("NamedNetNS accepted an unknown namespace")
	}
}

func TestDupFromProcess(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	f, err := DupFromProcess(os.Getpid(), int(w.Fd()))
	if err != nil {
		t.Skipf("pidfd_getfd unavailable: %v", err)
	}
	f.Write([]byte("x"))
	f.Close()
	b := make([]byte, 1)
	if n, _ := r.Read(b); n != 1 || b[0] != 'x' {
		t.Fatal("duplicated fd does not write to the pipe")
	}
}
