package cpr

import (
	"context"
	"fmt"
	"os"

	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// handBackToLibvirt rewrites libvirt's record of a guest whose QEMU this
// run replaced, so that libvirt's daemon, started after the run, reconnects
// to the QEMU that runs the guest (pid, vCPU threads, mount namespace)
// instead of finding its recorded QEMU gone and cleaning up after the
// guest. c is the QMP connection of the QEMU that runs the guest now.
//
// A failure leaves the guest running but its record wrong: the VM's error
// says so, and recover (which reconciles every record) is the way out —
// libvirt's daemon must not be started before.
func (r *run) handBackToLibvirt(ctx context.Context, c *qmp.Client, vm *manifest.VM, pid int) error {
	if vm.Libvirt == nil {
		return nil
	}
	err := r.timed("libvirt-record", vm.Name, func() error {
		vcpus, err := vcpuThreads(ctx, c)
		if err != nil {
			return err
		}
		return r.rewriteLibvirt(vm, pid, vcpus)
	})
	if err != nil {
		return fmt.Errorf("the guest runs on QEMU pid %d, but libvirt's record of it still names the old QEMU: %w. Do not start libvirt's daemon (it would take the guest for stopped and remove its RAM file) before 'liveupdate recover' has rewritten the record", pid, err)
	}
	if back, err := libvirt.ReleaseAutostart(string(r.Root.Local("/")), vm.Name); err != nil {
		r.Log.Warn("libvirt's autostart of the guest stays held", "vm", vm.Name, "err", err)
	} else if back {
		r.Log.Info("libvirt's autostart of the guest given back", "vm", vm.Name)
	}
	return nil
}

// holdLibvirtAutostart keeps libvirt's daemon from starting afresh a guest
// whose restore failed (err): started by the host's init after a kexec, it
// finds no record of the guest running and would boot it over the RAM the
// restore kept (and delete that RAM file when that QEMU stops). The
// returned error says what was done; recover gives the link back once the
// guest runs.
func (r *run) holdLibvirtAutostart(vm *manifest.VM, err error) error {
	if vm.Libvirt == nil {
		return err
	}
	held, herr := libvirt.HoldAutostart(string(r.Root.Local("/")), vm.Name)
	switch {
	case herr != nil:
		return fmt.Errorf("%w; and %v: do not start libvirt's daemon before 'liveupdate recover' has brought the guest back", err, herr)
	case held:
		return fmt.Errorf("%w (libvirt's autostart of the guest is held, %s/%s.xml%s, until 'liveupdate recover' brings it back: do not 'virsh start' it meanwhile, that would boot it over its kept RAM)", err, libvirt.AutostartDir, vm.Name, libvirt.HeldSuffix)
	}
	return fmt.Errorf("%w (do not 'virsh start' the guest before 'liveupdate recover' has brought it back: that would boot it over its kept RAM)", err)
}

// rewriteLibvirt names pid and its vCPU threads in the guest's status
// file. The record written back is the one on /run; if /run lost it (a
// kexec) the copy carried in the manifest is used.
func (r *run) rewriteLibvirt(vm *manifest.VM, pid int, vcpus map[int]int) error {
	path := r.local(vm.Libvirt.Status)
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		b, err = []byte(vm.Libvirt.Record), nil
	}
	if err != nil {
		return fmt.Errorf("reading libvirt's record: %w", err)
	}
	old, err := libvirt.ParseStatus(b)
	if err != nil {
		return err
	}
	if old.PID == pid {
		return nil // already names it (a repeated recover)
	}
	out, err := libvirt.Rewrite(b, libvirt.Change{PID: pid, Vcpus: vcpus,
		// The new QEMU was started in our mount namespace, not in the
		// private one libvirt made for the old QEMU: libvirt must not
		// look for that one when it adds device nodes.
		DropMountNS: old.MountNS && !r.privateMountNS(pid)})
	if err != nil {
		return err
	}
	if err := libvirt.WriteStatus(r.ProcRoot, path, out, pid); err != nil {
		return err
	}
	r.Log.Info("libvirt's record names the new QEMU", "vm", vm.Name, "status", path, "pid", pid, "was", old.PID)
	return nil
}

// privateMountNS tells whether QEMU pid runs in a mount namespace other
// than ours.
func (r *run) privateMountNS(pid int) bool {
	theirs, err1 := os.Readlink(fmt.Sprintf("%s/%d/ns/mnt", r.ProcRoot, pid))
	ours, err2 := os.Readlink(r.ProcRoot + "/self/ns/mnt")
	return err1 == nil && err2 == nil && theirs != ours
}

// vcpuThreads is each vCPU's thread id in the QEMU c talks to.
func vcpuThreads(ctx context.Context, c *qmp.Client) (map[int]int, error) {
	var cpus []struct {
		CPUIndex int `json:"cpu-index"`
		ThreadID int `json:"thread-id"`
	}
	if err := c.Execute(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return nil, fmt.Errorf("query-cpus-fast: %w", err)
	}
	out := map[int]int{}
	for _, cpu := range cpus {
		out[cpu.CPUIndex] = cpu.ThreadID
	}
	return out, nil
}

// libvirtFdsetFile is the file libvirt's record names behind the -add-fd
// set with this opaque (a pipe to virtlogd), "" if none.
func libvirtFdsetFile(vm *manifest.VM, opaque string) string {
	if vm.Libvirt == nil {
		return ""
	}
	return libvirt.FdsetFile([]byte(vm.Libvirt.Record), opaque)
}

// LibvirtFdsetFile is, for a target libvirt manages, the file behind the
// -add-fd set with this opaque (see libvirt.FdsetFile), "" if none.
func (t *Target) LibvirtFdsetFile(opaque string) string {
	if t.Libvirt == "" {
		return ""
	}
	b, err := os.ReadFile(t.Libvirt)
	if err != nil {
		return ""
	}
	return libvirt.FdsetFile(b, opaque)
}
