package qemuproc

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Affinity is the CPUs thread tid may run on (sched_getaffinity).
func Affinity(tid int) ([]int, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(tid, &set); err != nil {
		return nil, fmt.Errorf("sched_getaffinity(%d): %w", tid, err)
	}
	var cpus []int
	for c := 0; c < len(set)*64; c++ {
		if set.IsSet(c) {
			cpus = append(cpus, c)
		}
	}
	return cpus, nil
}

// SetAffinity pins thread tid to cpus (sched_setaffinity): libvirt's
// <vcpupin>/<emulatorpin> live there, not in the command line.
func SetAffinity(tid int, cpus []int) error {
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	if err := unix.SchedSetaffinity(tid, &set); err != nil {
		return fmt.Errorf("sched_setaffinity(%d, %v): %w", tid, cpus, err)
	}
	return nil
}
