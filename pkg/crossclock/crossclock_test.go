package crossclock

import (
	"strings"
	"testing"
	"time"
)

// The rate calibrated over 200 ms predicts a later span to well under a
// millisecond (both stamps are on this kernel, so the truth is known).
func TestRateAndSince(t *testing.T) {
	a := Now()
	if a.TSC == 0 {
		t.Skip("no TSC on this architecture")
	}
	time.Sleep(200 * time.Millisecond)
	b := Now()
	hz, err := Rate(a, b)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	c := Now()
	d, err := Since(b, c, hz)
	if err != nil {
		t.Fatal(err)
	}
	truth := time.Duration(c.RawNs - b.RawNs)
	if diff := (d - truth).Abs(); diff > time.Millisecond {
		t.Errorf("Since = %s, CLOCK_MONOTONIC_RAW says %s (off by %s)", d, truth, diff)
	}
	// Same kernel, same wall clock: no error beyond the pairing's.
	if we, _ := WallError(a, c, hz); we.Abs() > 5*time.Millisecond {
		t.Errorf("WallError on one kernel = %s", we)
	}
	u := Uncertainty(a, b, c, hz)
	if u <= 0 || u > time.Millisecond {
		t.Errorf("Uncertainty = %s, want a positive bound under 1 ms", u)
	}
	t.Logf("TSC %.0f Hz; 300 ms span measured as %s ± %s", hz, d, u)
}

// A new kernel whose wall clock started 700 ms behind (an RTC read) is
// found out.
func TestWallError(t *testing.T) {
	hz := 1e9
	a := Stamp{TSC: 1_000_000_000, Wall: time.Unix(1000, 0)}
	b := Stamp{TSC: 11_000_000_000, Wall: time.Unix(1009, 300_000_000)} // 10 s later by the TSC
	we, err := WallError(a, b, hz)
	if err != nil || we != -700*time.Millisecond {
		t.Errorf("WallError = %s, %v; want -700ms", we, err)
	}
}

func TestRefusals(t *testing.T) {
	a := Stamp{TSC: 5_000, RawNs: 0}
	for _, tc := range []struct {
		name string
		err  func() error
		want string
	}{
		{"no tsc", func() error { _, err := Rate(Stamp{}, a); return err }, "no time stamp counter"},
		{"too close", func() error { _, err := Rate(a, Stamp{TSC: 6_000, RawNs: 1000}); return err }, "too close"},
		{"backwards", func() error { _, err := Since(a, Stamp{TSC: 10}, 1e9); return err }, "backwards"},
		{"no rate", func() error { _, err := Since(a, a, 0); return err }, "no TSC rate"},
		{"a week", func() error { _, err := Since(a, Stamp{TSC: 5_000 + 7*24*3600*1e9}, 1e9); return err }, "not believable"},
	} {
		if err := tc.err(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}
