package cpr

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/libvirt"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// Plan discovers QEMU processes (all, or those named), connects to each one's
// QMP socket, gathers facts and gives a verdict. It changes nothing.
func (e *Engine) Plan(ctx context.Context, names []string) ([]*Target, error) {
	return e.newRun().plan(ctx, names, false)
}

// plan is Plan; twins allows two QEMUs of one name (recover looks for the
// new QEMU an interrupted restart started beside the old one). Without
// twins, QEMUs sharing a name are each refused, naming all their pids,
// and the others planned as usual.
func (r *run) plan(ctx context.Context, names []string, twins bool) ([]*Target, error) {
	procs, err := discover.All(r.ProcRoot)
	if err != nil {
		return nil, err
	}
	var sel []*discover.Process
	pids := map[string][]int{} // name → the pids of the QEMUs called so
	for _, p := range procs {
		n := p.Name()
		if len(names) > 0 && !slices.Contains(names, n) && !slices.Contains(names, fmt.Sprint(p.PID)) {
			continue
		}
		pids[n] = append(pids[n], p.PID)
		sel = append(sel, p)
	}
	for _, n := range names {
		found := false
		for _, p := range sel {
			found = found || p.Name() == n || fmt.Sprint(p.PID) == n
		}
		if !found {
			return nil, fmt.Errorf("no running QEMU is called %q (see 'liveupdate plan')", n)
		}
	}
	free := stateDirFree(r.local(r.stateDir))
	daemons := libvirt.Daemons(r.ProcRoot)
	ts := make([]*Target, len(sel))
	var wg sync.WaitGroup
	for i, p := range sel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := &Target{Proc: p}
			if ps := pids[p.Name()]; len(ps) > 1 && !twins {
				// Refused, not asked: twins may share one monitor
				// socket, and which is the guest's cannot be told.
				t.Verdict = preflight.Verdict{VM: p.Name(), PID: p.PID, Problems: []string{fmt.Sprintf(
					"QEMU processes %s are all called %q: give each VM a unique -name (or, if a restart was interrupted, run 'liveupdate recover')",
					joinPIDs(ps), p.Name())}}
				ts[i] = t
				return
			}
			lvRecord := libvirt.Find(r.local(hostpath.QEMU(libvirt.RunDir)), p.PID)
			t.Libvirt = lvRecord
			if lvRecord != "" && len(daemons) > 0 {
				// The daemon holds the guest's monitor: a dial would wait
				// for a greeting that never comes.
				t.Facts.QMPErr = fmt.Errorf("%s holds this guest's monitor: %w", daemons[0], libvirt.ErrDaemonRuns)
			} else {
				t.QMP, t.Facts = r.gatherFacts(ctx, p)
			}
			var nsErr error
			t.NetNS, nsErr = tapdev.NamedNetNS(p.NetNS)
			maps, _ := os.ReadFile(filepath.Join(r.ProcRoot, strconv.Itoa(p.PID), "maps"))
			t.Verdict = preflight.Check(preflight.Input{Proc: p, Facts: t.Facts, StateDir: r.local(r.stateDir), StateDirFree: free, Maps: string(maps),
				Libvirt: lvRecord, LibvirtDaemons: daemons,
				NetNSErr: nsErr, ProcRoot: filepath.Join(r.ProcRoot, fmt.Sprint(p.PID), "root")})
			ts[i] = t
		}()
	}
	wg.Wait()
	matchAnswers(ts)
	return ts, nil
}

// twinOf: QEMU pid is another QEMU of p's guest (same -name).
func (r *run) twinOf(pid int, p *discover.Process) bool {
	q, err := discover.Inspect(r.ProcRoot, pid)
	return err == nil && q.Name() == p.Name()
}

// ownerOf is the pid of the process vCPU threads vcpus belong to (0 if
// it cannot be told): the QEMU that answered on a monitor.
func (r *run) ownerOf(vcpus map[int]int) int {
	for _, tid := range vcpus {
		b, err := os.ReadFile(filepath.Join(r.ProcRoot, strconv.Itoa(tid), "status"))
		if err != nil {
			return 0
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "Tgid:"); ok {
				pid, _ := strconv.Atoi(strings.TrimSpace(v))
				return pid
			}
		}
	}
	return 0
}

// matchAnswers gives each target the monitor connection of its own QEMU
// where two QEMUs of one guest share a listening socket passed by fd and
// the connections were accepted the other way round.
func matchAnswers(ts []*Target) {
	for _, a := range ts {
		if a.Facts.AnsweredBy == 0 || a.Facts.AnsweredBy == a.Proc.PID {
			continue
		}
		for _, b := range ts {
			if b != a && b.Name() == a.Name() && b.Proc.PID == a.Facts.AnsweredBy && b.Facts.AnsweredBy == a.Proc.PID {
				// Swap what each monitor said, not who each process is.
				a.QMP, b.QMP = b.QMP, a.QMP
				a.Facts, b.Facts = b.Facts, a.Facts
			}
		}
	}
}

func joinPIDs(ps []int) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = fmt.Sprint(p)
	}
	return strings.Join(s, ", ")
}

func stateDirFree(dir string) uint64 {
	var st unix.Statfs_t
	for d := dir; ; d = filepath.Dir(d) {
		if unix.Statfs(d, &st) == nil {
			return st.Bavail * uint64(st.Bsize)
		}
		if d == "/" || d == "." {
			return 0
		}
	}
}

// gatherFacts connects to a QEMU's QMP socket and asks what preflight needs.
func (r *run) gatherFacts(ctx context.Context, p *discover.Process) (*qmp.Client, preflight.Facts) {
	var f preflight.Facts
	qmpPath, err := monitorPath(p, r.Root)
	if err != nil {
		f.QMPErr = err
		return nil, f
	}
	f.QMPPath = string(qmpPath)
	// Only a socket of our own user is trusted: whoever owns it could pose
	// as QEMU, and we would hand it guests' state.
	var sst unix.Stat_t
	if err := unix.Stat(r.local(hostpath.QEMU(f.QMPPath)), &sst); err == nil && sst.Uid != uint32(os.Geteuid()) {
		f.QMPErr = fmt.Errorf("QMP socket %s is owned by uid %d, not by uid %d: not trusted", f.QMPPath, sst.Uid, os.Geteuid())
		return nil, f
	}
	cctx, cancel := context.WithTimeout(ctx, r.QMPTimeout)
	defer cancel()
	// And only the QEMU itself may serve it (SO_PEERCRED: the pid that
	// last called listen() on it). A monitor passed by fd that this QEMU
	// holds may have been listened on last by a QEMU since gone (the new
	// QEMU of an interrupted early start, killed): the socket then has
	// no other live server than the QEMU holding it.
	fdMonitor := p.Cmdline.QMPEndpoints()[0].FD >= 0
	// QEMU calls listen() again on a socket passed by fd, so an early twin
	// that still lives is the last listener of its old QEMU's monitor
	// too: which of the two answered is then told by its vCPU threads
	// (AnsweredBy).
	c, err := qmp.DialPeerCheck(cctx, r.local(hostpath.QEMU(f.QMPPath)), p.PID, func(peer int) bool {
		return fdMonitor && (unix.Kill(peer, 0) == unix.ESRCH || r.twinOf(peer, p))
	})
	if err != nil {
		f.QMPErr = err
		return nil, f
	}
	fail := func(err error) (*qmp.Client, preflight.Facts) {
		c.Close()
		f.QMPErr = err
		return nil, f
	}
	var ver struct {
		QEMU    struct{ Major, Minor, Micro int } `json:"qemu"`
		Package string                            `json:"package"`
	}
	if err := c.Execute(cctx, "query-version", nil, &ver); err != nil {
		return fail(err)
	}
	f.Version = [3]int{ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro}
	if f.Vcpus, err = vcpuThreads(cctx, c); err != nil {
		return fail(err)
	}
	if fdMonitor {
		f.AnsweredBy = r.ownerOf(f.Vcpus)
	}
	f.Package = ver.Package
	if err := c.Execute(cctx, "qom-get", map[string]any{"path": "/machine", "property": "type"}, &f.MachineType); err != nil {
		return fail(err)
	}
	var st struct{ Status string }
	if err := c.Execute(cctx, "query-status", nil, &st); err != nil {
		return fail(err)
	}
	f.Status = st.Status
	var kvm struct{ Enabled bool }
	if err := c.Execute(cctx, "query-kvm", nil, &kvm); err != nil {
		return fail(err)
	}
	f.KVM = kvm.Enabled
	if err := c.Execute(cctx, "query-memdev", nil, &f.Memdevs); err != nil {
		return fail(err)
	}
	if len(p.Cmdline.Find("vnc")) > 0 {
		var vnc struct {
			Enabled       bool
			Host, Service string
			Family        string
		}
		if err := c.Execute(cctx, "query-vnc", nil, &vnc); err != nil {
			return fail(err)
		}
		if port, err := strconv.Atoi(vnc.Service); err == nil && vnc.Enabled && (vnc.Family == "ipv4" || vnc.Family == "ipv6") {
			f.VNC = &qemuargv.VNCAddr{Host: vnc.Host, Port: port}
		}
	}
	if len(p.Cmdline.Find("add-fd")) > 0 {
		fds, err := r.fdsets(cctx, c, p.PID)
		if err != nil {
			return fail(err)
		}
		f.Fdsets = fds
	}
	f.Runtime, f.RuntimeErr = runtimeConfig(cctx, c)
	return c, f
}

// runtimeConfig asks QEMU for its devices and block graph, which preflight
// compares with the command line (hot-plug, external snapshots, jobs).
func runtimeConfig(ctx context.Context, c *qmp.Client) (*preflight.Runtime, error) {
	rt := &preflight.Runtime{}
	for _, q := range []struct {
		cmd  string
		args any
		out  any
	}{
		{"query-block", nil, &rt.Block},
		{"query-named-block-nodes", map[string]any{"flat": true}, &rt.BlockNodes},
		{"qom-list", map[string]any{"path": "/machine/peripheral"}, &rt.Peripheral},
		{"qom-list", map[string]any{"path": "/machine/peripheral-anon"}, &rt.PeripheralAnon},
		{"query-block-jobs", nil, &rt.BlockJobs},
		{"query-memory-devices", nil, &rt.MemoryDevices},
	} {
		if err := c.Execute(ctx, q.cmd, q.args, q.out); err != nil {
			return nil, fmt.Errorf("%s: %w", q.cmd, err)
		}
	}
	return rt, nil
}

// monitorPath is the path of the QEMU's QMP socket, as the QEMU sees it: a
// relative -qmp/-chardev path is relative to its working directory, which
// /proc shows us with the root's prefix.
func monitorPath(p *discover.Process, root hostpath.Root) (hostpath.QEMU, error) {
	eps := p.Cmdline.QMPEndpoints()
	if len(eps) == 0 {
		return "", fmt.Errorf("no QMP unix socket")
	}
	ep := eps[0]
	path := ep.Path
	if ep.FD >= 0 {
		path = p.Fds[ep.FD].SocketPath
	}
	if path == "" {
		return "", fmt.Errorf("cannot find the path of QMP socket fd %d", ep.FD)
	}
	return hostpath.Arg(root.QEMU(hostpath.Local(p.Cwd)), path), nil
}

// fdsets reads which fds QEMU holds in its -add-fd sets now, and what each
// is (QEMU dups the fds it is given and closes their numbers).
func (r *run) fdsets(ctx context.Context, c *qmp.Client, pid int) ([]preflight.FdsetFd, error) {
	var sets []struct {
		ID  int `json:"fdset-id"`
		Fds []struct {
			Fd     int    `json:"fd"`
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	if err := c.Execute(ctx, "query-fdsets", nil, &sets); err != nil {
		return nil, fmt.Errorf("query-fdsets: %w", err)
	}
	var out []preflight.FdsetFd
	dir := filepath.Join(r.ProcRoot, fmt.Sprint(pid))
	for _, s := range sets {
		for _, f := range s.Fds {
			x := preflight.FdsetFd{Set: s.ID, Fd: f.Fd, Opaque: f.Opaque, Flags: -1}
			x.Target, _ = os.Readlink(filepath.Join(dir, "fd", fmt.Sprint(f.Fd)))
			if b, err := os.ReadFile(filepath.Join(dir, "fdinfo", fmt.Sprint(f.Fd))); err == nil {
				x.Flags = discover.ParseFdinfoFlags(string(b))
			}
			out = append(out, x)
		}
	}
	return out, nil
}
