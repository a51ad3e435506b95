package cpr

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// readPlacement records where the old QEMU's threads run beyond its
// command line: its main thread's CPUs and scheduling, and each vCPU
// thread's CPUs, scheduling and cgroups where they are its own. Nil when
// nothing differs from what a new QEMU started by us gets anyway (our CPUs
// and scheduling, the process's cgroups).
func (r *run) readPlacement(pid int, vcpus map[int]int, procCgroup []string) *manifest.Placement {
	ours, err := qemuproc.Affinity(0)
	if err != nil {
		return nil
	}
	main, err := qemuproc.Affinity(pid)
	if err != nil {
		return nil
	}
	pl := &manifest.Placement{Vcpus: map[int]manifest.ThreadPlace{}}
	special := false
	if !slices.Equal(main, ours) {
		pl.CPUs, special = main, true
	}
	ourSched, mainSched := readSched(os.Getpid()), readSched(pid)
	if mainSched != nil && ourSched != nil && *mainSched != *ourSched {
		pl.Sched, special = mainSched, true
	}
	for idx, tid := range vcpus {
		var tp manifest.ThreadPlace
		if cpus, err := qemuproc.Affinity(tid); err == nil && !slices.Equal(cpus, main) {
			tp.CPUs = cpus
		}
		if s := readSched(tid); s != nil && mainSched != nil && *s != *mainSched {
			tp.Sched = s
		}
		cg, err := os.ReadFile(filepath.Join(r.ProcRoot, strconv.Itoa(pid), "task", strconv.Itoa(tid), "cgroup"))
		if hs := qemuproc.Hierarchies(string(cg)); err == nil && !slices.Equal(hs, procCgroup) {
			tp.Hierarchies = hs
		}
		if tp.CPUs != nil || tp.Sched != nil || tp.Hierarchies != nil {
			pl.Vcpus[idx] = tp
			special = true
		}
	}
	if !special {
		return nil
	}
	return pl
}

// place puts a new QEMU's threads where its old QEMU's ran (readPlacement):
// every thread on the main thread's CPUs, each vCPU thread on its own and
// into its own cgroups (cgroups only on the boot they were read on). It
// runs before the new QEMU runs the guest; what fails is logged — the
// guest runs regardless, with the host's defaults. vcpus are its vCPU
// threads if already asked (nil: asked here).
func (r *run) place(ctx context.Context, c *qmp.Client, vm *manifest.VM, pid int, sameBoot bool, vcpus map[int]int) {
	pl := vm.Placement
	if pl == nil {
		return
	}
	warn := func(what string, err error) {
		r.Log.Warn("new QEMU's threads not placed as the old one's", "vm", vm.Name, "what", what, "err", err)
	}
	if pl.CPUs != nil {
		tasks, _ := os.ReadDir(filepath.Join(r.ProcRoot, strconv.Itoa(pid), "task"))
		for _, t := range tasks {
			tid, _ := strconv.Atoi(t.Name())
			if err := qemuproc.SetAffinity(tid, pl.CPUs); err != nil {
				warn("CPUs", err)
			}
		}
	}
	if len(pl.Vcpus) == 0 && pl.Sched == nil {
		return
	}
	if vcpus == nil { // not asked yet
		var err error
		if vcpus, err = vcpuThreads(ctx, c); err != nil {
			warn("vCPU threads", err)
			return
		}
	}
	if pl.Sched != nil {
		// The main thread's scheduling: every thread's but the vCPUs'
		// (which get their own below, or the main thread's).
		tasks, _ := os.ReadDir(filepath.Join(r.ProcRoot, strconv.Itoa(pid), "task"))
		for _, t := range tasks {
			tid, _ := strconv.Atoi(t.Name())
			if tp, ok := pl.Vcpus[vcpuIndex(vcpus, tid)]; ok && tp.Sched != nil {
				continue
			}
			if err := setSched(tid, *pl.Sched); err != nil {
				warn("scheduling", err)
			}
		}
	}
	mountinfo, _ := os.ReadFile(filepath.Join(r.ProcRoot, "self/mountinfo"))
	for idx, tp := range pl.Vcpus {
		tid, ok := vcpus[idx]
		if !ok {
			continue
		}
		if tp.CPUs != nil {
			if err := qemuproc.SetAffinity(tid, tp.CPUs); err != nil {
				warn("vCPU "+strconv.Itoa(idx)+" CPUs", err)
			}
		}
		if tp.Sched != nil {
			if err := setSched(tid, *tp.Sched); err != nil {
				warn("vCPU "+strconv.Itoa(idx)+" scheduling", err)
			}
		}
		if tp.Hierarchies != nil && sameBoot {
			if err := qemuproc.MoveThread(tid, tp.Hierarchies, string(mountinfo), ""); err != nil {
				warn("vCPU "+strconv.Itoa(idx)+" cgroups", err)
			}
		}
	}
}

// vcpuIndex is the index of vCPU thread tid, -1 if tid is not one.
func vcpuIndex(vcpus map[int]int, tid int) int {
	for idx, t := range vcpus {
		if t == tid {
			return idx
		}
	}
	return -1
}

// readSched is a thread's scheduling, nil if it cannot be read.
func readSched(tid int) *manifest.Sched {
	a, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return nil
	}
	return &manifest.Sched{Policy: a.Policy, Priority: a.Priority, Nice: a.Nice}
}

// setSched gives a thread a scheduling readSched read.
func setSched(tid int, s manifest.Sched) error {
	return unix.SchedSetAttr(tid, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: s.Policy, Priority: s.Priority, Nice: s.Nice}, 0)
}
