package timeline

import (
	"fmt"
	"html"
	"io"
	"math"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Table writes the run as people read it: each guest's blackout, then every
// phase with its start (from the run's start) and its length.
func (t *Timeline) Table(w io.Writer) {
	t0, t1 := t.Bounds()
	kind := "restart-qemu (no kexec)"
	if t.Kexec {
		kind = "update " + t.From + " → " + orDash(t.To)
	}
	fmt.Fprintf(w, "run %s: %s, %.1f ms from first phase to last\n", t.ID, kind, ms(t1.Sub(t0)))
	if t.Kexec {
		switch {
		case t.To == "":
			fmt.Fprintln(w, "no boot record from the new kernel's PID 1: the spans after the kexec are unknown")
		case t.ClockSource == "tsc":
			fmt.Fprintf(w, "spans across the kexec measured by the TSC, good to ±%s\n", t.Uncertainty.Round(time.Microsecond))
		default:
			fmt.Fprintf(w, "spans across the kexec on the new kernel's RTC-seeded clock, good to ±%s only\n", t.Uncertainty)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nGUEST\tSTATUS\tBLACKOUT\tCLOCK")
	for _, g := range t.Guests {
		bo := "-"
		if g.Blackout > 0 {
			bo = fmt.Sprintf("%.1f ms", ms(g.Blackout))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", g.Name, g.Status, bo, orDash(g.Clock))
	}
	tw.Flush()
	for _, g := range t.Guests {
		if g.Error != "" {
			fmt.Fprintf(w, "%s: %s\n", g.Name, g.Error)
		}
	}
	fmt.Fprintln(w)
	t.PhaseTable(w)
}

// PhaseTable writes every phase with its start (from the run's start) and
// its length.
func (t *Timeline) PhaseTable(w io.Writer) {
	t0, _ := t.Bounds()
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PHASE\tROW\tAT\tTOOK")
	for _, s := range t.Spans {
		fmt.Fprintf(tw, "%s\t%s\t+%.1f ms\t%.1f ms\t%s\n", s.Name, s.Row, ms(s.Start.Sub(t0)), ms(s.Took()), s.Error)
	}
	tw.Flush()
}

// Prom writes node_exporter textfile metrics of the run.
func (t *Timeline) Prom(w io.Writer) {
	kind := "restart"
	if t.Kexec {
		kind = "update"
	}
	_, t1 := t.Bounds()
	fmt.Fprintln(w, "# HELP liveupdate_last_run_info The last run of liveupdate.")
	fmt.Fprintln(w, "# TYPE liveupdate_last_run_info gauge")
	fmt.Fprintf(w, "liveupdate_last_run_info{id=%q,kind=%q,from_kernel=%q,to_kernel=%q,clock_source=%q} 1\n", t.ID, kind, t.From, t.To, t.ClockSource)
	fmt.Fprintln(w, "# HELP liveupdate_last_run_end_timestamp_seconds When the last run's last phase ended.")
	fmt.Fprintln(w, "# TYPE liveupdate_last_run_end_timestamp_seconds gauge")
	fmt.Fprintf(w, "liveupdate_last_run_end_timestamp_seconds %.3f\n", float64(t1.UnixMilli())/1000)
	fmt.Fprintln(w, "# HELP liveupdate_guest_blackout_seconds Guest blackout of the last run: old QEMU's STOP to new QEMU's RESUME.")
	fmt.Fprintln(w, "# TYPE liveupdate_guest_blackout_seconds gauge")
	for _, g := range t.Guests {
		if g.Blackout > 0 {
			fmt.Fprintf(w, "liveupdate_guest_blackout_seconds{vm=%q} %.6f\n", g.Name, g.Blackout.Seconds())
		}
	}
	fmt.Fprintln(w, "# HELP liveupdate_guest_running Whether the guest runs after the last run (1) or not (0).")
	fmt.Fprintln(w, "# TYPE liveupdate_guest_running gauge")
	for _, g := range t.Guests {
		v := 0
		if g.Status == "running" {
			v = 1
		}
		fmt.Fprintf(w, "liveupdate_guest_running{vm=%q,status=%q} %d\n", g.Name, g.Status, v)
	}
	fmt.Fprintln(w, "# HELP liveupdate_phase_seconds Length of each phase of the last run.")
	fmt.Fprintln(w, "# TYPE liveupdate_phase_seconds gauge")
	for _, s := range t.Spans {
		fmt.Fprintf(w, "liveupdate_phase_seconds{phase=%q,row=%q} %.6f\n", s.Name, s.Row, s.Took().Seconds())
	}
	fmt.Fprintln(w, "# HELP liveupdate_kexec_span_uncertainty_seconds Error bound of spans across the kexec.")
	fmt.Fprintln(w, "# TYPE liveupdate_kexec_span_uncertainty_seconds gauge")
	fmt.Fprintf(w, "liveupdate_kexec_span_uncertainty_seconds %.6f\n", t.Uncertainty.Seconds())
}

// Colours of the waterfall, by kind of phase.
func colour(name string) string {
	switch {
	case name == "kexec" || name == "kernel boot":
		return "#8c6bb1"
	case strings.HasPrefix(name, "pid1 "):
		return "#41ab5d"
	case name == "migrate-setup" || name == "save" || name == "quit" || name == "remount-ro" || name == "kexec-load" || name == "plan":
		return "#4292c6"
	case name == "clock-fix":
		return "#bdbdbd"
	default: // qemu-start, load, cont, restore
		return "#fd8d3c"
	}
}

// SVG writes a waterfall of the run: one row per guest and one for the
// host, the kexec and the new kernel's boot visible as their own bars, each
// guest's blackout shaded red behind its row.
func (t *Timeline) SVG(w io.Writer) {
	const (
		left, right, top = 150.0, 20.0, 40.0
		width            = 1100.0
		laneH            = 16.0
	)
	t0, t1 := t.Bounds()
	total := t1.Sub(t0)
	if total <= 0 {
		total = time.Millisecond
	}
	x := func(at time.Time) float64 { return left + (width-left-right)*float64(at.Sub(t0))/float64(total) }
	// Spans of one row that overlap go to separate lanes.
	type placed struct {
		s    Span
		lane int
	}
	rows := t.Rows()
	byRow := map[string][]placed{}
	lanes := map[string]int{}
	for _, r := range rows {
		var ends []time.Time
		for _, s := range t.Spans {
			if s.Row != r {
				continue
			}
			l := 0
			for l < len(ends) && s.Start.Before(ends[l]) {
				l++
			}
			if l == len(ends) {
				ends = append(ends, s.End)
			} else {
				ends[l] = s.End
			}
			byRow[r] = append(byRow[r], placed{s, l})
		}
		lanes[r] = max(len(ends), 1)
	}
	y := top
	rowY := map[string]float64{}
	for _, r := range rows {
		rowY[r] = y
		y += float64(lanes[r])*laneH + 14
	}
	height := y + 40
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="11">`+"\n", width, height)
	fmt.Fprintf(w, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	title := "restart-qemu " + t.ID
	if t.Kexec {
		title = fmt.Sprintf("update %s → %s (%s)", t.From, orDash(t.To), t.ID)
	}
	fmt.Fprintf(w, `<text x="10" y="20" font-size="14">%s</text>`+"\n", html.EscapeString(title))
	// Axis with round ticks.
	step := niceStep(total)
	for d := time.Duration(0); d <= total; d += step {
		xx := x(t0.Add(d))
		fmt.Fprintf(w, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#eee"/>`+"\n", xx, top-6, xx, y)
		fmt.Fprintf(w, `<text x="%.1f" y="%.0f" text-anchor="middle" fill="#666">%s</text>`+"\n", xx, y+14, fmtDur(d))
	}
	for _, g := range t.Guests {
		if g.Blackout <= 0 {
			continue
		}
		ry := rowY[g.Name]
		fmt.Fprintf(w, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#e31a1c" fill-opacity="0.18"><title>%s blackout %.1f ms</title></rect>`+"\n",
			x(g.Stopped), ry-3, max(x(g.Resumed)-x(g.Stopped), 1), float64(lanes[g.Name])*laneH+6, html.EscapeString(g.Name), ms(g.Blackout))
	}
	for _, r := range rows {
		label := r
		for _, g := range t.Guests {
			if g.Name == r && g.Blackout > 0 {
				label = fmt.Sprintf("%s (%.0f ms)", r, ms(g.Blackout))
			}
		}
		fmt.Fprintf(w, `<text x="10" y="%.1f">%s</text>`+"\n", rowY[r]+12, html.EscapeString(label))
		for _, p := range byRow[r] {
			x0, x1 := x(p.s.Start), x(p.s.End)
			py := rowY[r] + float64(p.lane)*laneH
			fmt.Fprintf(w, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.0f" fill="%s"><title>%s %s: %.1f ms</title></rect>`+"\n",
				x0, py, max(x1-x0, 1), laneH-2, colour(p.s.Name), html.EscapeString(r), html.EscapeString(p.s.Name), ms(p.s.Took()))
			if x1-x0 > float64(7*len(p.s.Name)) {
				fmt.Fprintf(w, `<text x="%.1f" y="%.1f" fill="white">%s</text>`+"\n", x0+3, py+11, html.EscapeString(p.s.Name))
			}
		}
	}
	if t.Kexec && t.Uncertainty > 0 {
		fmt.Fprintf(w, `<text x="10" y="%.0f" fill="#666">spans across the kexec: ±%s (%s)</text>`+"\n", height-8, t.Uncertainty.Round(time.Microsecond), t.ClockSource)
	}
	fmt.Fprintln(w, "</svg>")
}

// niceStep picks a tick interval giving about ten ticks.
func niceStep(total time.Duration) time.Duration {
	raw := float64(total) / 10
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	steps := []float64{1, 2, 5, 10}
	i := sort.SearchFloat64s(steps, raw/mag)
	return max(time.Duration(steps[min(i, 3)]*mag), time.Microsecond)
}

func fmtDur(d time.Duration) string {
	if d >= time.Second {
		return fmt.Sprintf("%gs", d.Seconds())
	}
	return fmt.Sprintf("%gms", float64(d)/1e6)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
