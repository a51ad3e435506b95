// Package timeline puts one run's phases on one time axis and shows them
// (table, SVG, metrics).
//
// The phases before the kexec come from the manifest (the old kernel's
// clock); those after it from the boot record PID 1 writes next to the
// manifest (manifest.Boot). PID 1 steps the new kernel's wall clock onto
// the old one's, carried across the kexec by the TSC (package crossclock),
// before it restores any guest, so both halves — and the QMP event times
// that give each guest's blackout — share one axis. How exact the spans across the
// kexec are is recorded, not assumed: to microseconds through the TSC, to
// about a second when the wall clock had to come from the RTC.
package timeline

import (
	"sort"
	"time"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

// Span is one bar of the timeline.
type Span struct {
	Row   string    `json:"row"` // "host" or a VM's name
	Name  string    `json:"name"`
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	Error string    `json:"error,omitempty"`
}

// Took is the span's length.
func (s Span) Took() time.Duration { return s.End.Sub(s.Start) }

// Guest is one VM's outcome.
type Guest struct {
	Name     string          `json:"name"`
	Status   manifest.Status `json:"status"`
	Blackout time.Duration   `json:"blackout_ns"`
	Stopped  time.Time       `json:"stopped,omitzero"`
	Resumed  time.Time       `json:"resumed,omitzero"`
	Clock    string          `json:"clock,omitempty"`
	Error    string          `json:"error,omitempty"`
	// PID is the QEMU that runs the guest after the run (a fleet engine
	// checks libvirt's record names the same one).
	PID int `json:"pid,omitempty"`
}

// Timeline is one run on one axis.
type Timeline struct {
	ID     string  `json:"id"`
	Kexec  bool    `json:"kexec"` // an update (else a QEMU-only restart)
	From   string  `json:"from_kernel"`
	To     string  `json:"to_kernel,omitempty"`
	Spans  []Span  `json:"spans"`
	Guests []Guest `json:"guests"`
	// Uncertainty bounds spans that cross the kexec (blackouts of an
	// update among them); zero for a restart on one kernel.
	Uncertainty time.Duration `json:"uncertainty_ns"`
	ClockSource string        `json:"clock_source,omitempty"`
}

// Build lays out the run recorded in m (and b, the boot record, when the
// run crossed a kexec and PID 1 got as far as writing it).
func Build(m *manifest.Manifest, b *manifest.Boot) *Timeline {
	t := &Timeline{ID: m.ID, From: m.Host.Kernel}
	var kexecAt time.Time
	for _, p := range m.Phases {
		row := "host"
		if p.VM != "" {
			row = p.VM
		}
		end := p.End
		if p.Name == "kexec" {
			t.Kexec, kexecAt = true, p.Start
			if b == nil {
				continue // it never ended as far as the manifest knows
			}
			end = b.Start.Add(-b.KernelBoot) // the new kernel starts
		}
		if end.IsZero() {
			continue
		}
		t.Spans = append(t.Spans, Span{Row: row, Name: p.Name, Start: p.Start, End: end, Error: p.Error})
	}
	if b != nil {
		t.To, t.ClockSource, t.Uncertainty = b.Kernel, b.ClockSource, b.Uncertainty
		if !kexecAt.IsZero() {
			t.Spans = append(t.Spans, Span{Row: "host", Name: "kernel boot", Start: b.Start.Add(-b.KernelBoot), End: b.Start})
		}
		for _, p := range b.Phases {
			t.Spans = append(t.Spans, Span{Row: "host", Name: "pid1 " + p.Name, Start: p.Start, End: p.End, Error: p.Error})
		}
	}
	sort.SliceStable(t.Spans, func(i, j int) bool { return t.Spans[i].Start.Before(t.Spans[j].Start) })
	for _, v := range m.VMs {
		t.Guests = append(t.Guests, Guest{Name: v.Name, Status: v.Status, Blackout: v.Blackout(),
			Stopped: v.Stopped, Resumed: v.Resumed, Clock: v.Clock, Error: v.Error, PID: v.NewPID})
	}
	return t
}

// Bounds returns the first start and the last end of the timeline.
func (t *Timeline) Bounds() (time.Time, time.Time) {
	var a, z time.Time
	for _, s := range t.Spans {
		if a.IsZero() || s.Start.Before(a) {
			a = s.Start
		}
		if s.End.After(z) {
			z = s.End
		}
	}
	for _, g := range t.Guests {
		if !g.Stopped.IsZero() && (a.IsZero() || g.Stopped.Before(a)) {
			a = g.Stopped
		}
		if g.Resumed.After(z) {
			z = g.Resumed
		}
	}
	return a, z
}

// Rows are the row names in display order: host first, then the guests.
func (t *Timeline) Rows() []string {
	rows := []string{"host"}
	for _, g := range t.Guests {
		rows = append(rows, g.Name)
	}
	return rows
}
