package cpr

import (
	"testing"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/guestagent"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// TestMonitorPathUnderRoot: the QMP socket's path is recorded as QEMU sees
// it and opened as we see it — with the root's prefix exactly once, a
// relative -qmp path included (PID 1's orderly stop and `save --root` run
// with the host root at /newroot; /proc shows QEMU's cwd with that prefix).
func TestMonitorPathUnderRoot(t *testing.T) {
	cases := []struct {
		root      hostpath.Root
		cwd, qmp  string
		wantQEMU  hostpath.QEMU
		wantLocal string
	}{
		{"", "/run/vm", "unix:qmp.sock,server,wait=off", "/run/vm/qmp.sock", "/run/vm/qmp.sock"},
		{"", "/run/vm", "unix:/tmp/q.sock,server,wait=off", "/tmp/q.sock", "/tmp/q.sock"},
		{"/newroot", "/newroot/run/vm", "unix:qmp.sock,server,wait=off", "/run/vm/qmp.sock", "/newroot/run/vm/qmp.sock"},
		{"/newroot", "/newroot/run/vm", "unix:/var/lib/vm/q.sock,server,wait=off", "/var/lib/vm/q.sock", "/newroot/var/lib/vm/q.sock"},
	}
	for _, c := range cases {
		cmd, err := qemuargv.Parse([]string{"qemu-system-x86_64", "-qmp", c.qmp})
		if err != nil {
			t.Fatal(err)
		}
		p := &discover.Process{PID: 42, Cmdline: cmd, Cwd: c.cwd}
		got, err := monitorPath(p, c.root)
		if err != nil {
			t.Fatal(err)
		}
		if got != c.wantQEMU {
			t.Errorf("root %q cwd %s -qmp %s: recorded %q, want QEMU's view %q", c.root, c.cwd, c.qmp, got, c.wantQEMU)
		}
		r := (&Engine{Root: c.root}).newRun()
		if l := r.local(got); l != c.wantLocal {
			t.Errorf("root %q cwd %s -qmp %s: dialled %q, want %q", c.root, c.cwd, c.qmp, l, c.wantLocal)
		}
	}
}

// TestAgentPathUnderRoot: the same for the guest agent's socket, which
// prepare records and restore's clock fix opens.
func TestAgentPathUnderRoot(t *testing.T) {
	argv := []string{"qemu-system-x86_64", "-name", "vm1", "-qmp", "unix:/run/q.sock,server,wait=off",
		"-chardev", "socket,id=qga0,path=agent.sock,server=on,wait=off",
		"-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=" + guestagent.AgentPortName}
	cmd, err := qemuargv.Parse(argv)
	if err != nil {
		t.Fatal(err)
	}
	p := &discover.Process{PID: 42, Cmdline: cmd, Argv: argv, Cwd: "/newroot/run/vm", Exe: "/newroot/usr/bin/qemu-system-x86_64"}
	r := (&Engine{Root: "/newroot", StateDir: "/mnt/pmem/lu"}).newRun()
	r.makeManifest(nil)
	rec, err := r.prepare(&Target{Proc: p}, SaveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Agent != "/run/vm/agent.sock" || rec.Cwd != "/run/vm" || rec.Binary != "/usr/bin/qemu-system-x86_64" {
		t.Errorf("recorded agent %q cwd %q binary %q, want QEMU's view /run/vm/agent.sock, /run/vm, /usr/bin/qemu-system-x86_64", rec.Agent, rec.Cwd, rec.Binary)
	}
	if got := r.local(rec.Agent); got != "/newroot/run/vm/agent.sock" {
		t.Errorf("agent opened at %q, want /newroot/run/vm/agent.sock", got)
	}
	vm := &manifest.VM{Cwd: rec.Cwd}
	if got := r.localIn(vm, "pid"); got != "/newroot/run/vm/pid" {
		t.Errorf("a relative path of the VM's command line opens at %q", got)
	}
}
