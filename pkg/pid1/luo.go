package pid1

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"

	"github.com/liveupdate/liveupdate/pkg/luo"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// guestRAM is the guests' memfd RAM the update's LUO session handed to this
// kernel: retrieved before the restore, given to each guest's new QEMU (as
// the fd its command line names), and the session finished only once every
// such guest runs. Until then PID 1 holds the session and the memfds — the
// only holders of a guest's RAM whose restore failed — and does not hand
// over to the host's init, whose start would close them.
type guestRAM struct {
	o     *luo.Orchestrator
	s     *luo.Session
	held  map[string]map[int]*os.File // by VM and fd number in its restart argv
	lost  map[string]error            // VMs whose RAM could not be retrieved
	done  bool                        // the session is finished: nothing left to hold
	owner []string                    // VMs with memfd RAM
}

// retrieveRAM retrieves every memfd the manifest's LUO session keeps. nil
// when the manifest names no session. A memfd that cannot be had (or is not
// the size the update recorded) leaves its VM out of held, and the restore
// fails for that VM alone, saying so.
func retrieveRAM(m *manifest.Manifest, log *slog.Logger) (*guestRAM, error) {
	if m.LUO == nil {
		return nil, nil
	}
	g := &guestRAM{held: map[string]map[int]*os.File{}, lost: map[string]error{}}
	for _, v := range m.VMs {
		if memfdFds(v) != nil {
			g.owner = append(g.owner, v.Name)
		}
	}
	o, err := luo.Open()
	if err != nil {
		return nil, fmt.Errorf("the guests' RAM is in LUO session %q: %w", m.LUO.Name, err)
	}
	s, err := o.RetrieveSession(m.LUO.Name)
	if err != nil {
		o.Close()
		return nil, fmt.Errorf("the guests' RAM is in LUO session %q: %w", m.LUO.Name, err)
	}
	g.o, g.s = o, s
	for _, v := range m.VMs {
		for _, fd := range memfdFds(v) {
			f, err := s.Retrieve(fd.Token)
			if err == nil {
				err = checkSize(f, fd)
				if err != nil {
					f.Close()
				}
			}
			if err != nil {
				g.lost[v.Name] = errors.Join(g.lost[v.Name], err)
				log.Error("guest RAM not retrieved from the LUO session", "vm", v.Name, "backend", fd.Backend, "token", fd.Token, "err", err)
				continue
			}
			if g.held[v.Name] == nil {
				g.held[v.Name] = map[int]*os.File{}
			}
			g.held[v.Name][fd.Num] = f
			log.Info("guest RAM retrieved from the LUO session", "vm", v.Name, "backend", fd.Backend, "token", fd.Token, "bytes", fd.Size)
		}
	}
	for name := range g.lost {
		delete(g.held, name) // all of a guest's RAM, or none of it
	}
	return g, nil
}

// memfdFds are a VM's fds of RAM kept by a LUO token.
func memfdFds(v manifest.VM) []manifest.Fd {
	var out []manifest.Fd
	for _, fd := range v.Fds {
		if fd.Kind == qemuargv.FdMemfd && fd.Token != 0 {
			out = append(out, fd)
		}
	}
	return out
}

// checkSize refuses a retrieved memfd that is not the size the update
// recorded: some other RAM than the guest's.
func checkSize(f *os.File, fd manifest.Fd) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != fd.Size {
		return fmt.Errorf("token %d of backend %q is %d bytes, the update recorded %d: not the guest's RAM", fd.Token, fd.Backend, st.Size(), fd.Size)
	}
	return nil
}

// finish ends the session once every VM with memfd RAM runs — its new QEMU
// holds the RAM — and closes PID 1's copies. Otherwise it keeps all of it
// and says which guests' RAM PID 1 alone holds.
func (g *guestRAM) finish(m *manifest.Manifest, log *slog.Logger) {
	var waiting []string
	for _, v := range m.VMs {
		if slices.Contains(g.owner, v.Name) && v.Status != manifest.StatusRunning {
			waiting = append(waiting, v.Name)
		}
	}
	if len(waiting) > 0 {
		log.Error("guests not running whose RAM PID 1 alone holds (memfds from the LUO session): the session stays open, and PID 1 stays init (the host's init would close them)", "vms", waiting)
		return
	}
	if err := g.s.Finish(); err != nil {
		log.Error("finishing the LUO session (every guest runs)", "err", err)
		return
	}
	for _, fs := range g.held {
		for _, f := range fs {
			f.Close() // its QEMU has its own
		}
	}
	g.s.Close()
	g.o.Close()
	g.done = true
	log.Info("LUO session finished: every guest with memfd RAM runs", "session", m.LUO.Name, "vms", g.owner)
}

// holding tells whether PID 1 is the only holder of some guest's RAM.
func (g *guestRAM) holding() bool { return g != nil && !g.done }
