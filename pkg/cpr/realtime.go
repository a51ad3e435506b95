package cpr

import (
	"context"
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
	b, err := rtboost.Threads(r.ProcRoot, pid, threadSet(vcpus), inherit)
	if err != nil {
		r.realtimeFailed(vm, err)
	}
	return b
}

// threadSet is the set of the thread ids of vcpus (index → thread id).
func threadSet(vcpus map[int]int) map[int]bool {
	set := make(map[int]bool, len(vcpus))
	for _, tid := range vcpus {
		set[tid] = true
	}
	return set
}

// raiseStoppedVCPUs raises the vCPU threads of a QEMU whose guest does
// not run: a new QEMU's from its load to just before its cont, an old
// QEMU's from its STOP to the end of its save (raiseVCPUsAtStop). The
// load and the save hand them work and wait for it, and a vCPU thread at
// normal priority waits for a CPU behind every busy guest of the host:
// with them raised, 16 guests' loads took 2–3 ms where they took up to
// 84 ms (docs/benchmarks.md, P2e). Lowered again before the guest runs,
// so that no guest code ever runs at real-time priority. nil if off or
// not possible.
func (r *run) raiseStoppedVCPUs(vm string, pid int, vcpus map[int]int) *rtboost.Raised {
	if !r.realtime || r.NoRealtime || pid <= 0 || len(vcpus) == 0 {
		return nil
	}
	b, err := rtboost.Only(r.ProcRoot, pid, threadSet(vcpus))
	if err != nil {
		r.realtimeFailed(vm, err)
	}
	return b
}

// raiseVCPUsAtStop raises the old QEMU's vCPU threads once its guest has
// stopped for the save (its STOP event, at or after event index from of
// t's monitor) and returns what lowers them again, which the save calls
// before anything may continue the guest. Should the migration fail after
// the STOP, QEMU continues the guest by itself; its vCPUs are raised until
// the save returns that failure.
func (r *run) raiseVCPUsAtStop(ctx context.Context, t *Target, from int) (lower func()) {
	if !r.realtime || r.NoRealtime || len(t.Facts.Vcpus) == 0 || t.QMP == nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	var raised *rtboost.Raised
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, _, err := t.QMP.WaitEvent(ctx, "STOP", from, nil); err == nil {
			raised = r.raiseStoppedVCPUs(t.Name(), t.Proc.PID, t.Facts.Vcpus)
		}
	}()
	return func() {
		cancel()
		<-done
		r.lower(t.Name(), raised)
	}
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
// the QEMU that runs a guest now (recover): every thread at SCHED_FIFO
// priority 1 gets the scheduling the guest's old QEMU had it at (manifest
// placement: each vCPU its own where recorded, the main thread's for the
// others; without a placement, ours). Not a thread whose recorded
// scheduling is FIFO 1 itself (libvirt's <emulatorsched> or <vcpusched>:
// ours cannot be told apart), and nothing when the vCPU threads are not
// known. A new QEMU's vCPUs are raised too between its load and its cont
// (raiseStoppedVCPUs): a run cut off there leaves them so, and they must
// not run the guest at real-time priority.
func (r *run) lowerLeftRaised(t *Target, vm *manifest.VM) {
	if len(t.Facts.Vcpus) == 0 {
		return
	}
	base := readSched(os.Getpid())
	if vm.Placement != nil && vm.Placement.Sched != nil {
		base = vm.Placement.Sched
	}
	if base == nil {
		return
	}
	isFIFO1 := func(s *manifest.Sched) bool { return s.Policy == unix.SCHED_FIFO && s.Priority == 1 }
	tasks, _ := os.ReadDir(filepath.Join(r.ProcRoot, strconv.Itoa(t.Proc.PID), "task"))
	n := 0
	for _, e := range tasks {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		want := base
		if idx := vcpuIndex(t.Facts.Vcpus, tid); idx >= 0 && vm.Placement != nil {
			if tp, ok := vm.Placement.Vcpus[idx]; ok && tp.Sched != nil {
				want = tp.Sched
			}
		}
		if isFIFO1(want) {
			continue
		}
		if s := readSched(tid); s != nil && isFIFO1(s) {
			if err := setSched(tid, *want); err != nil {
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
