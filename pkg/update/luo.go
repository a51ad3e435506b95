package update

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/liveupdate/liveupdate/kernelconfig"
	"github.com/liveupdate/liveupdate/pkg/bootparams"
	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/luo"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// The LUO backend's share of an update: guests whose RAM is a memfd their
// QEMU inherited (memory-backend-file,mem-path=/proc/self/fd/N) have it
// kept across the kexec by the kernel's Live Update Orchestrator. One
// session per update holds every such memfd under a token of its own
// (recorded with the guest's fds in the manifest); this process holds the
// session until reboot(KEXEC), and closing it — the undo of every failure
// before — drops what it kept. PID 1 of the new kernel retrieves them
// (package pid1).

// memfdGuests names the targets with RAM in an inherited memfd (one
// that is another file, plan refuses).
func memfdGuests(ts []*cpr.Target) []string {
	var out []string
	for _, t := range ts {
		for _, r := range t.Proc.Cmdline.FdRefs() {
			if r.Kind == qemuargv.FdMemfd && t.Proc.Fds[r.Num].Memfd() {
				out = append(out, t.Name())
				break
			}
		}
	}
	return out
}

// luoProblems says what keeps an update from carrying memfd RAM across the
// kexec: no /dev/liveupdate here (device: its path), a new kernel without
// LUO (cfg: its config, nil when none was found beside it), or a new
// command line without kho=on liveupdate=on. guests are those with memfd
// RAM; with none, nothing is asked of the kernels.
func luoProblems(guests []string, device string, cfg map[string]string, cfgPath, cmdline string) []string {
	if len(guests) == 0 {
		return nil
	}
	who := strings.Join(guests, ", ")
	var probs []string
	if _, err := os.Stat(device); err != nil {
		probs = append(probs, fmt.Sprintf("guests %s have RAM in memfds, which only the kernel's Live Update Orchestrator keeps across a kexec, and the running kernel has no %s (%v): it needs CONFIG_LIVEUPDATE and CONFIG_LIVEUPDATE_MEMFD and the boot parameters kho=on liveupdate=on", who, device, err))
	}
	switch {
	case cfg == nil:
		probs = append(probs, fmt.Sprintf("guests %s have RAM in memfds, and the new kernel's config is not beside it (/boot/config-VERSION next to /boot/vmlinuz-VERSION): nothing tells whether it takes LUO sessions, and a kernel that does not would lose their RAM. Install its config", who))
	default:
		for _, pr := range kernelconfig.Check(cfg, kernelconfig.LUO()) {
			probs = append(probs, fmt.Sprintf("guests %s have RAM in memfds and the new kernel's config %s cannot take them: %s", who, cfgPath, pr))
		}
	}
	for _, p := range []string{"kho", "liveupdate"} {
		if !bootFlagOn(cmdline, p) {
			probs = append(probs, fmt.Sprintf("guests %s have RAM in memfds and the new command line lacks %s=on: the new kernel would not take the LUO session that keeps it. Boot the running kernel with kho=on liveupdate=on (the new one inherits them), or pass them in --append", who, p))
		}
	}
	return probs
}

// bootFlagOn tells whether the last name=value of a boot parameter on the
// command line is true as the kernel reads it (kstrtobool: on, y, 1, …).
func bootFlagOn(cmdline, name string) bool {
	on := false
	for _, w := range bootparams.Split(cmdline) {
		k, v, _ := strings.Cut(w, "=")
		if k != name {
			continue
		}
		switch strings.ToLower(v) {
		case "on", "y", "yes", "1", "true":
			on = true
		default:
			on = false
		}
	}
	return on
}

// luoKeeper is an update's LUO session, the cpr.RAMKeeper of its save.
type luoKeeper struct {
	o    *luo.Orchestrator
	s    *luo.Session
	next uint64 // the last token given
}

// openLUO opens the LUO session of an update, named after the moment.
func openLUO() (*luoKeeper, error) {
	o, err := luo.Open()
	if err != nil {
		return nil, err
	}
	s, err := o.CreateSession(fmt.Sprintf("liveupdate-%d", time.Now().UnixNano()))
	if err != nil {
		o.Close()
		return nil, err
	}
	return &luoKeeper{o: o, s: s}, nil
}

func (k *luoKeeper) Session() string { return k.s.Name }

// Keep preserves one memfd of guest RAM under the next token (from 1: the
// manifest's 0 means none).
func (k *luoKeeper) Keep(vm, backend string, f *os.File) (uint64, error) {
	k.next++
	if err := k.s.Preserve(int(f.Fd()), k.next); err != nil {
		return 0, fmt.Errorf("guest %s, backend %s: %w", vm, backend, err)
	}
	return k.next, nil
}

// close drops the session, and with it everything it kept: before the
// kexec, the undo.
func (k *luoKeeper) close() error {
	err := k.s.Close()
	k.o.Close()
	return err
}

// openSession is the step that opens the session when a guest needs it.
func (u *updateRun) openSession(context.Context) error {
	if len(memfdGuests(u.p.targets)) == 0 {
		return nil
	}
	k, err := openLUO()
	if err != nil {
		return fmt.Errorf("opening the LUO session that keeps the guests' memfd RAM: %w", err)
	}
	u.keeper = k
	return nil
}

// closeSession is openSession's undo: the session dropped, the memfds back
// to being the old QEMUs' alone.
func (u *updateRun) closeSession(context.Context) error {
	if u.keeper == nil {
		return nil
	}
	err := u.keeper.close()
	u.keeper = nil
	if err != nil {
		return fmt.Errorf("closing the LUO session: %w", err)
	}
	return nil
}
