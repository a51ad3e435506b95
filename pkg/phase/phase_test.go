package phase

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestRunUndoes: for a failure at each step, the runner undoes exactly that
// step and those before it, newest first, and records every step it ran.
func TestRunUndoes(t *testing.T) {
	names := []string{"a", "b", "c", "d"}
	cases := []struct {
		failAt    string // "" = none
		optional  string // this step is Optional
		noUndo    string // this step has no undo
		wantUndo  []string
		wantRan   []string
		wantError string
	}{
		{failAt: "", wantRan: names},
		{failAt: "a", wantUndo: []string{"a"}, wantRan: []string{"a"}, wantError: "a: boom"},
		{failAt: "c", wantUndo: []string{"c", "b", "a"}, wantRan: []string{"a", "b", "c"}, wantError: "c: boom"},
		{failAt: "d", noUndo: "b", wantUndo: []string{"d", "c", "a"}, wantRan: names, wantError: "d: boom"},
		// An optional step's failure undoes nothing and the rest runs.
		{failAt: "b", optional: "b", wantRan: names, wantError: "b: boom"},
		// An optional step is not undone when a later one fails.
		{failAt: "d", optional: "b", wantUndo: []string{"d", "c", "a"}, wantRan: names, wantError: "d: boom"},
	}
	for _, c := range cases {
		t.Run("fail="+c.failAt+",optional="+c.optional, func(t *testing.T) {
			var undone, ran []string
			var steps []Step
			for _, n := range names {
				s := Step{Name: n, Optional: n == c.optional, Do: func(context.Context) error {
					if n == c.failAt {
						return errors.New("boom")
					}
					return nil
				}}
				if n != c.noUndo {
					s.Undo = func(context.Context) error { undone = append(undone, n); return nil }
				}
				steps = append(steps, s)
			}
			err := Run(context.Background(), func(name string, start, end time.Time, err error) {
				if end.Before(start) {
					t.Errorf("%s ends before it starts", name)
				}
				ran = append(ran, name)
			}, steps...)
			if !slices.Equal(undone, c.wantUndo) {
				t.Errorf("undone %v, want %v", undone, c.wantUndo)
			}
			if !slices.Equal(ran, c.wantRan) {
				t.Errorf("recorded %v, want %v", ran, c.wantRan)
			}
			switch {
			case c.wantError == "" && err != nil:
				t.Errorf("error %v, want none", err)
			case c.wantError != "" && (err == nil || !strings.Contains(err.Error(), c.wantError)):
				t.Errorf("error %v, want %q", err, c.wantError)
			}
		})
	}
}

// TestUndoErrorsKept: every undo runs even when one fails, and both the
// step's error and the undo's are in what Run returns.
func TestUndoErrorsKept(t *testing.T) {
	cause, undoErr := errors.New("cause"), errors.New("undo failed")
	ranA := false
	err := Run(context.Background(), nil,
		Step{Name: "a", Do: func(context.Context) error { return nil }, Undo: func(context.Context) error { ranA = true; return nil }},
		Step{Name: "b", Do: func(context.Context) error { return nil }, Undo: func(context.Context) error { return undoErr }},
		Step{Name: "c", Do: func(context.Context) error { return cause }},
	)
	var pe *Error
	if !errors.As(err, &pe) || pe.Step != "c" {
		t.Fatalf("error %v is not the failed step c", err)
	}
	if !errors.Is(err, cause) || !errors.Is(err, undoErr) || !ranA {
		t.Errorf("error %v: want both the cause and the undo's error, and a's undo run (%v)", err, ranA)
	}
}
