package hostpath

import "testing"

func TestResolve(t *testing.T) {
	cases := []struct {
		root      Root
		cwd       Local // QEMU's working directory, as /proc shows it to us
		arg       string
		wantQEMU  QEMU
		wantLocal Local
	}{
		{"", "/run/vm", "qmp.sock", "/run/vm/qmp.sock", "/run/vm/qmp.sock"},
		{"", "/run/vm", "/tmp/qmp.sock", "/tmp/qmp.sock", "/tmp/qmp.sock"},
		{"/", "/run/vm", "../qmp.sock", "/run/qmp.sock", "/run/qmp.sock"},
		// Under a root: /proc shows the cwd with the root's prefix; QEMU
		// sees it without. A relative path is prefixed exactly once.
		{"/newroot", "/newroot/run/vm", "qmp.sock", "/run/vm/qmp.sock", "/newroot/run/vm/qmp.sock"},
		{"/newroot", "/newroot/run/vm", "/var/lib/x/qmp.sock", "/var/lib/x/qmp.sock", "/newroot/var/lib/x/qmp.sock"},
		{"/newroot/", "/newroot", "sub/agent.sock", "/sub/agent.sock", "/newroot/sub/agent.sock"},
	}
	for _, c := range cases {
		got := Arg(c.root.QEMU(c.cwd), c.arg)
		if got != c.wantQEMU {
			t.Errorf("root %q cwd %q arg %q: QEMU's view %q, want %q", c.root, c.cwd, c.arg, got, c.wantQEMU)
		}
		if l := c.root.Local(got); l != c.wantLocal {
			t.Errorf("root %q cwd %q arg %q: our view %q, want %q", c.root, c.cwd, c.arg, l, c.wantLocal)
		}
		if back := c.root.QEMU(c.root.Local(got)); back != got {
			t.Errorf("QEMU(Local(%q)) = %q", got, back)
		}
	}
	// Outside the root there is no QEMU view: the path stays as it is.
	if got := Root("/newroot").QEMU("/etc/x"); got != "/etc/x" {
		t.Errorf("outside the root: %q", got)
	}
}
