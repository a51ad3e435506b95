package timeline

import (
	"bytes"
	"encoding/xml"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/manifest"
)

var t0 = time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

// An update: save and quit on the old kernel, kexec, the new kernel's
// boot and PID 1 phases, the guest's restore.
func sample() (*manifest.Manifest, *manifest.Boot) {
	m := &manifest.Manifest{ID: "run1", Host: manifest.Host{Kernel: "6.1"},
		VMs: []manifest.VM{{Name: "vm1", Status: manifest.StatusRunning, Stopped: at(20), Resumed: at(2600), Clock: "corrected"}},
		Phases: []manifest.Phase{
			{Name: "kexec-load", Start: at(0), End: at(10)},
			{Name: "save", VM: "vm1", Start: at(12), End: at(40)},
			{Name: "quit", VM: "vm1", Start: at(40), End: at(55)},
			{Name: "kexec", Start: at(60)},
			{Name: "qemu-start", VM: "vm1", Start: at(2300), End: at(2500)},
			{Name: "load", VM: "vm1", Start: at(2500), End: at(2590)},
		}}
	b := &manifest.Boot{Kernel: "6.12", Start: at(2000), KernelBoot: 1800 * time.Millisecond, SinceKexec: 1940 * time.Millisecond,
		ClockSource: "tsc", Uncertainty: 40 * time.Microsecond,
		Phases: []manifest.Phase{{Name: "modules", Start: at(2000), End: at(2200)}, {Name: "restore", Start: at(2250), End: at(2600)}}}
	return m, b
}

func TestBuild(t *testing.T) {
	m, b := sample()
	tl := Build(m, b)
	if !tl.Kexec || tl.To != "6.12" || tl.ClockSource != "tsc" {
		t.Errorf("timeline header %+v", tl)
	}
	var kexec, boot *Span
	for i, s := range tl.Spans {
		if i > 0 && s.Start.Before(tl.Spans[i-1].Start) {
			t.Errorf("spans not in order at %d", i)
		}
		switch s.Name {
		case "kexec":
			kexec = &tl.Spans[i]
		case "kernel boot":
			boot = &tl.Spans[i]
		}
	}
	if kexec == nil || boot == nil {
		t.Fatalf("kexec or kernel boot missing: %+v", tl.Spans)
	}
	// The kexec ends where the new kernel starts: PID 1 start − kernel boot.
	if !kexec.End.Equal(at(200)) || !boot.End.Equal(at(2000)) {
		t.Errorf("kexec ends %s, kernel boot ends %s", kexec.End.Sub(t0), boot.End.Sub(t0))
	}
	if g := tl.Guests[0]; g.Blackout != 2580*time.Millisecond {
		t.Errorf("blackout %s", g.Blackout)
	}
	a, z := tl.Bounds()
	if !a.Equal(at(0)) || !z.Equal(at(2600)) {
		t.Errorf("bounds %s – %s", a.Sub(t0), z.Sub(t0))
	}

	// Without a boot record the kexec's end is unknown: not drawn.
	tl = Build(m, nil)
	for _, s := range tl.Spans {
		if s.Name == "kexec" || s.Name == "kernel boot" {
			t.Errorf("span %s drawn without a boot record", s.Name)
		}
	}
}

func TestRender(t *testing.T) {
	m, b := sample()
	tl := Build(m, b)

	var tab bytes.Buffer
	tl.Table(&tab)
	for _, want := range []string{"update 6.1 → 6.12", "vm1", "2580.0 ms", "kernel boot", "±40µs"} {
		if !strings.Contains(tab.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, tab.String())
		}
	}

	var svg bytes.Buffer
	tl.SVG(&svg)
	d := xml.NewDecoder(&svg)
	rects := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			rects++
		}
	}
	// background + one blackout + one per span
	if want := 2 + len(tl.Spans); rects != want {
		t.Errorf("SVG has %d rects, want %d", rects, want)
	}

	var prom bytes.Buffer
	tl.Prom(&prom)
	line := regexp.MustCompile(`^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+]+$`)
	for _, l := range strings.Split(strings.TrimSpace(prom.String()), "\n") {
		if !strings.HasPrefix(l, "#") && !line.MatchString(l) {
			t.Errorf("not a textfile metric line: %q", l)
		}
	}
	if !strings.Contains(prom.String(), `liveupdate_guest_blackout_seconds{vm="vm1"} 2.580000`) {
		t.Errorf("prom lacks the blackout:\n%s", prom.String())
	}
}
