// Package crossclock measures time across a kexec.
//
// Neither of the kernel's usual clocks survives a kexec: CLOCK_MONOTONIC
// and CLOCK_BOOTTIME start again from zero, and CLOCK_REALTIME is seeded
// again from the RTC, which counts whole seconds (the new kernel's wall
// clock is off by up to a second, plus the RTC's drift). The x86 time
// stamp counter does survive: kexec resets no CPU, and on every CPU this
// product targets (constant_tsc, nonstop_tsc) it ticks at a fixed rate. So
// a span that crosses the kexec is measured in TSC ticks, converted with a
// rate calibrated on the old kernel against CLOCK_MONOTONIC_RAW over the
// seconds an update takes anyway.
//
// A Stamp pairs the TSC with both kernel clocks at one instant. Two stamps
// on the old kernel give the rate; one more on the new kernel gives the
// exact time since the kexec stamp and how far the new kernel's wall clock
// is off. Where there is no TSC (other architectures) Stamp.TSC is 0 and
// callers fall back to the wall clock, saying so.
package crossclock

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Stamp is one instant on the TSC, CLOCK_MONOTONIC_RAW and the wall clock.
type Stamp struct {
	TSC    uint64    `json:"tsc"`
	RawNs  int64     `json:"raw_ns"` // CLOCK_MONOTONIC_RAW of the kernel that took it
	Wall   time.Time `json:"wall"`
	Kernel string    `json:"kernel,omitempty"` // uname -r, to tell the two sides apart
	// Window is how many ticks the clock reads took: the pairing of TSC and
	// clocks is exact to within it.
	Window uint64 `json:"window"`
}

// Now takes a stamp. The TSC is read on both sides of the clock reads and
// averaged; of a few tries the one with the narrowest window is kept (a
// try can be stretched by an interrupt or, under emulation, a slow
// syscall), so that the pairing is good to a few microseconds.
func Now() Stamp {
	var u unix.Utsname
	unix.Uname(&u)
	best := Stamp{Kernel: unix.ByteSliceToString(u.Release[:])}
	for i := 0; i < 5; i++ {
		var ts unix.Timespec
		t0 := rdtsc()
		unix.ClockGettime(unix.CLOCK_MONOTONIC_RAW, &ts)
		wall := time.Now()
		t1 := rdtsc()
		if i == 0 || t1-t0 < best.Window {
			best.TSC, best.RawNs, best.Wall, best.Window = t0+(t1-t0)/2, ts.Nano(), wall.Round(0), t1-t0
		}
	}
	return best
}

// Uncertainty bounds the error of Since(a, b, hz) when hz came from
// Rate(start, a): the pairing windows of the stamps, and the rate's own
// error (from the calibration stamps' windows) grown over the span.
func Uncertainty(start, a, b Stamp, hz float64) time.Duration {
	if hz <= 0 || a.TSC <= start.TSC || b.TSC < a.TSC {
		return 0
	}
	rel := float64(start.Window+a.Window) / float64(a.TSC-start.TSC)
	span := float64(b.TSC - a.TSC)
	return time.Duration((span*rel + float64(a.Window+b.Window)) / hz * 1e9)
}

// Rate is the TSC's ticks per second between two stamps of one kernel.
func Rate(a, b Stamp) (float64, error) {
	if a.TSC == 0 || b.TSC == 0 {
		return 0, errors.New("no time stamp counter on this machine")
	}
	dn := b.RawNs - a.RawNs
	if dn < int64(50*time.Millisecond) {
		return 0, fmt.Errorf("stamps %s apart: too close to calibrate the TSC", time.Duration(dn))
	}
	if b.TSC <= a.TSC {
		return 0, errors.New("the TSC did not advance between the stamps")
	}
	return float64(b.TSC-a.TSC) / (float64(dn) / 1e9), nil
}

// Since is the time from stamp a (taken on the old kernel) to stamp b
// (taken on the new one), from the TSC at rate hz. It refuses spans that
// cannot be right (the TSC went backwards — e.g. a firmware reset it — or
// more than a day passed), so that callers fall back to the wall clock.
func Since(a, b Stamp, hz float64) (time.Duration, error) {
	if hz <= 0 || a.TSC == 0 || b.TSC == 0 {
		return 0, errors.New("no TSC rate: the span cannot be measured across the kexec")
	}
	if b.TSC < a.TSC {
		return 0, errors.New("the TSC went backwards across the kexec (reset by firmware?)")
	}
	d := time.Duration(float64(b.TSC-a.TSC) / hz * 1e9)
	if d > 24*time.Hour {
		return 0, fmt.Errorf("the TSC says %s passed across the kexec: not believable", d)
	}
	return d, nil
}

// WallError is how far b's wall clock is off from a's, carried across by
// the TSC: positive when the new kernel's clock is ahead.
func WallError(a, b Stamp, hz float64) (time.Duration, error) {
	d, err := Since(a, b, hz)
	if err != nil {
		return 0, err
	}
	return b.Wall.Sub(a.Wall.Add(d)), nil
}
