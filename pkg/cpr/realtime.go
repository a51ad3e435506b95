package cpr

import (
	"github.com/liveupdate/liveupdate/pkg/rtboost"
)

// The threads a guest's blackout waits on run at real-time priority for its
// milliseconds (package rtboost says why): the old QEMU's threads but its
// vCPUs, with the migration thread it starts, over the save (saveOne); the
// new QEMU's threads but its vCPUs from its load to its cont (restoreOne);
// and, in a restart-qemu, our own threads from the first save to the last
// cont. On a host whose CPUs are busy with other guests, that takes a
// 16-guest restart's loads from 60–110 ms back to the 6–9 ms of CPU they
// need (docs/benchmarks.md, P2e). Engine.NoRealtime turns it off.

// raiseQEMU raises every thread of QEMU pid but its vCPU threads (inherit:
// and the threads it starts meanwhile); nil if off, if its vCPU threads
// are not known (a vCPU must never be raised), or if not possible (logged
// once per run).
func (r *run) raiseQEMU(vm string, pid int, vcpus map[int]int, inherit bool) *rtboost.Raised {
	if r.NoRealtime || pid <= 0 || len(vcpus) == 0 {
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
	if r.NoRealtime {
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
