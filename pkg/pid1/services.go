package pid1

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/liveupdate/liveupdate/pkg/hoststate"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
)

// HostConfigPath is, inside the host root, what a host runs when no guest
// was restored — on a first boot, as a host's service manager would start
// its VMs: the host network and cgroups to build and the QEMUs to start.
const HostConfigPath = "/etc/liveupdate/host.json"

// HostConfig is the first-boot configuration.
type HostConfig struct {
	Network manifest.Network  `json:"network"`
	Cgroups []manifest.Cgroup `json:"cgroups,omitempty"`
	Guests  []Guest           `json:"guests"`
}

// Guest is one QEMU to start.
type Guest struct {
	Name   string   `json:"name"`
	Argv   []string `json:"argv"` // argv[0] is the binary inside the host root
	Cwd    string   `json:"cwd,omitempty"`
	Env    []string `json:"env,omitempty"`
	Cgroup string   `json:"cgroup,omitempty"` // cgroup v2 path to start it in
	// MemfdMiB are memfds of guest RAM made for it, of these sizes in MiB,
	// passed as fds 3, 4, … in order: argv gives each to QEMU as
	// -object memory-backend-file,mem-path=/proc/self/fd/N,share=on (the
	// LUO backend's guest, docs/luo.md).
	MemfdMiB []int `json:"memfd_mib,omitempty"`
}

// startServices starts the configured guests when the manifest restored
// none (first boot). Without a host root or a config it does nothing.
func (b *Boot) startServices(ctx context.Context) error {
	if b.Manifest != nil || b.Root == "" {
		return nil
	}
	raw, err := os.ReadFile(filepath.Join(b.Root, HostConfigPath))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var hc HostConfig
	if err := json.Unmarshal(raw, &hc); err != nil {
		return fmt.Errorf("%s: %w", HostConfigPath, err)
	}
	missing, err := hoststate.Build(hc.Network, hc.Cgroups)
	b.warnMissing(missing)
	if err != nil {
		return err
	}
	var errs []error
	var argvs [][]string
	for _, g := range hc.Guests {
		argvs = append(argvs, g.Argv)
	}
	if err := b.awaitKVMModules(ctx, argvs); err != nil {
		errs = append(errs, err) // the guests that need KVM fail saying so
	}
	for _, g := range hc.Guests {
		pid, err := b.startGuest(g)
		if err != nil {
			errs = append(errs, fmt.Errorf("guest %s: %w", g.Name, err))
			continue
		}
		b.Log.Info("guest started (first boot)", "vm", g.Name, "pid", pid)
		fmt.Fprintf(consoleOut(), "liveupdate: started guest %s pid %d\n", g.Name, pid)
	}
	return errors.Join(errs...)
}

// startGuest starts one QEMU chrooted in the host root, in its cgroup, in a
// session of its own, logging to /run/liveupdate/NAME.log, through PID 1's
// reaper.
func (b *Boot) startGuest(g Guest) (int, error) {
	if len(g.Argv) == 0 {
		return 0, fmt.Errorf("empty argv")
	}
	os.MkdirAll("/run/liveupdate", 0o700)
	log, err := os.OpenFile(filepath.Join("/run/liveupdate", g.Name+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer log.Close() // the QEMU has its copy
	cwd := g.Cwd
	if cwd == "" {
		cwd = "/"
	}
	var ram []*os.File
	defer func() {
		for _, f := range ram {
			f.Close() // the QEMU has its copy
		}
	}()
	for i, mib := range g.MemfdMiB {
		f, err := qemuproc.RAMMemfd(fmt.Sprintf("%s-ram%d", g.Name, i), int64(mib)<<20)
		if err != nil {
			return 0, err
		}
		ram = append(ram, f)
	}
	p, err := qemuproc.Start(qemuproc.Spec{
		Binary: g.Argv[0], Argv: g.Argv, Dir: cwd, Env: g.Env, Root: b.Root,
		Cgroup: g.Cgroup, CgroupRoot: hoststate.CgroupRoot, Log: log, ExtraFiles: ram,
	}, &b.reaper)
	if err != nil {
		return 0, err
	}
	if p.CgroupErr != nil {
		b.Log.Warn("starting guest outside its cgroup", "vm", g.Name, "err", p.CgroupErr)
	}
	go func() {
		<-p.Exited()
		b.Log.Warn("guest's QEMU exited (first boot)", "vm", g.Name, "pid", p.Pid, "how", p.ExitErr())
	}()
	return p.Pid, nil
}
