package cpr

import (
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/rtboost"
)

// In a restart-qemu the threads a guest's blackout waits on run at
// real-time priority for its milliseconds (package rtboost says why): the
// old QEMU's threads but its vCPUs, with the migration thread it starts,
// over the save (saveOne); the new QEMU's threads but its vCPUs from its
// load to its cont (restoreOne); our own threads from the first save to the
// last cont. On a host whose CPUs are busy with other guests, that takes a
// 16-guest restart's loads from 60–110 ms back to the 6–9 ms of CPU they
// need (docs/benchmarks.md, P2e). Engine.NoRealtime turns it off.
//
// Not in an update (run.realtime unset): its blackout is the kexec and the
// boot, and PID 1 restores with no other guest running. With the loads in
// PID 1 raised, two of five nested updates' loads took 0.83–0.86 s, where
// ten updates without took 69–129 ms — close to the kernel's real-time
// throttling (normal threads get 0.05 s of each second); what would have
// spun was not found, so nothing is raised there.

// raiseQEMU raises every thread of QEMU pid but its vCPU threads (inherit:
// and the threads it starts meanwhile); nil if off, if its vCPU threads
// are not known (a vCPU must never be raised), or if not possible (logged
// once per run).
func (r *run) raiseQEMU(vm string, pid int, vcpus map[int]int, inherit bool) *rtboost.Raised {
	if !r.realtime || r.NoRealtime || pid <= 0 || len(vcpus) == 0 {
		return nil
	}
	skip := map[int]bool{}
	for _, tid := range vcpus {
		skip[tid] = true
	}
	b, err := rtboost.Threads(r.ProcRoot, pid, skip, inherit)
	if err != nil {
		r.realtimeFailed(vm, err)
	}
	return b
}

// raiseSelf raises our own threads (never inherited by what we start).
func (r *run) raiseSelf() *rtboost.Raised {
	if !r.realtime || r.NoRealtime {
		return nil
	}
	b, err := rtboost.Self()
	if err != nil {
		r.realtimeFailed("", err)
	}
	return b
}

// lower gives raised threads back their scheduling.
func (r *run) lower(vm string, b *rtboost.Raised) {
	if err := b.Restore(); err != nil {
		r.Log.Warn("giving threads back their scheduling after the blackout", "vm", vm, "err", err)
	}
}

func (r *run) realtimeFailed(vm string, err error) {
	r.rtWarn.Do(func() {
		r.Log.Warn("blackout threads not raised to real-time priority (needs CAP_SYS_NICE); blackouts are longer on a busy host", "vm", vm, "err", err)
	})
}

// lowerLeftRaised lowers what a run cut off mid-blackout left raised in
// the QEMU that runs a guest now (recover): every thread but its vCPUs at
// SCHED_FIFO priority 1 gets the scheduling the guest's old QEMU had
// (manifest placement; without one, ours). Not when that scheduling is
// FIFO 1 itself (libvirt's <emulatorsched>: ours cannot be told apart), nor
// when the vCPU threads are not known (a vCPU may be FIFO 1 by its owner).
func (r *run) lowerLeftRaised(t *Target, vm *manifest.VM) {
	if len(t.Facts.Vcpus) == 0 {
		return
	}
	base := readSched(os.Getpid())
	if vm.Placement != nil && vm.Placement.Sched != nil {
		base = vm.Placement.Sched
	}
	if base == nil || base.Policy == unix.SCHED_FIFO && base.Priority == 1 {
		return
	}
	vcpu := map[int]bool{}
	for _, tid := range t.Facts.Vcpus {
		vcpu[tid] = true
	}
	tasks, _ := os.ReadDir(filepath.Join(r.ProcRoot, strconv.Itoa(t.Proc.PID), "task"))
	n := 0
	for _, e := range tasks {
		tid, err := strconv.Atoi(e.Name())
		if err != nil || vcpu[tid] {
			continue
		}
		if s := readSched(tid); s != nil && s.Policy == unix.SCHED_FIFO && s.Priority == 1 {
			if err := setSched(tid, *base); err != nil {
				r.Log.Warn("lowering a thread an interrupted run left at real-time priority", "vm", vm.Name, "tid", tid, "err", err)
				continue
			}
			n++
		}
	}
	if n > 0 {
		r.Log.Info("lowered threads an interrupted run left at real-time priority", "vm", vm.Name, "pid", t.Proc.PID, "threads", n)
	}
}
